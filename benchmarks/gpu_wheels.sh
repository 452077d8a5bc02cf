#!/usr/bin/env bash
# Prepares, on a machine with PyPI access, the wheels that benchmarks/gpu_session.sh installs on a bare
# GPU machine without network (Python 3.12 there; PYV=311 etc. for another):
#   .whl/              numpy 2.4.6 (the machine's numpy 2.5 breaks its numba-cuda): carried in every call
#   .gpuwhl/p1 .. pN   DALI cuda130 2.4.0 split in 56 MB parts (dali.part0, ...) and the wheels it needs
#                      that the machine lacks, packed so that one folder fits one call's 64 MiB carry
# Both folders are git-ignored. Then, with the device tool, one call per part while the machine stays
# warm (it goes back 30 s after a call, so make the calls back to back):
#   run(carry=[".gpuwhl/p1"], command="mkdir -p /tmp/wh && cp .gpuwhl/p1/* /tmp/wh/")   ... up to pN
#   run(carry=[".whl"], command="OUT=$OUT bash benchmarks/gpu_session.sh")   (joins, installs, runs)
# Usage: bash benchmarks/gpu_wheels.sh        (DEST=DIR to write elsewhere than the repo root)
set -euo pipefail
PYV=${PYV:-312}
DEST=${DEST:-$(cd "$(dirname "$0")/.." && pwd)}
PART=56000000   # bytes per part; one call carries 64 MiB (67108864) with the working tree (~2 MB)
PLAT=(--only-binary=:all: --python-version "$PYV" --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64)
# on the GPU machine's image already (torch, numba and friends pull them in): not carried
PRESENT='^(numpy|packaging|six|typing_extensions|pyyaml|wheel|setuptools)-'

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q "${PLAT[@]}" --no-deps -d "$tmp/numpy" "numpy==2.4.6"
python3 -m pip download -q "${PLAT[@]}" -d "$tmp/dali" "nvidia-dali-cuda130==2.4.0"
rm -rf "$DEST/.whl" "$DEST/.gpuwhl"
mkdir -p "$DEST/.whl" "$DEST/.gpuwhl"
cp "$tmp"/numpy/*.whl "$DEST/.whl/"
dali=$(ls "$tmp"/dali/nvidia_dali_cuda130-*.whl)
split -b "$PART" -d -a 1 "$dali" "$tmp/dali.part"
rm "$dali"
# first fit, largest first: every file into the first folder with room left
python3 - "$tmp" "$DEST/.gpuwhl" "$PRESENT" "$PART" <<'EOF'
import re, shutil, sys
from pathlib import Path

tmp, dest, present, part = Path(sys.argv[1]), Path(sys.argv[2]), re.compile(sys.argv[3], re.I), int(sys.argv[4])
files = sorted(tmp.glob("dali.part*")) + [f for f in (tmp / "dali").glob("*.whl") if not present.match(f.name)]
folders: list[list] = []  # [bytes used, [files]]
for f in sorted(files, key=lambda f: -f.stat().st_size):
    size = f.stat().st_size
    slot = next((s for s in folders if s[0] + size <= part + 4_000_000), None)
    if slot is None:
        slot = [0, []]
        folders.append(slot)
    slot[0] += size
    slot[1].append(f)
for k, (used, fs) in enumerate(folders, 1):
    d = dest / f"p{k}"
    d.mkdir()
    for f in fs:
        shutil.copy2(f, d / f.name)
    print(f"{d}: {used / 1e6:.1f} MB, {', '.join(f.name for f in fs)}")
EOF
echo "numpy for every call: $(ls "$DEST/.whl")"
