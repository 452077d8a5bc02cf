#!/usr/bin/env bash
# The benchmark's GPU mode: everything this project checks on a lent GPU machine, in one call of the
# device tool (the machine is bare, without network, and goes back after each session):
#   env      nvidia-smi, versions                                  -> $OUT/env.txt
#   tests    the gpu-marked tests (CUDA kernels vs numpy)           -> $OUT/pytest_gpu.txt
#   dali     the DALI GPU path against its CPU path (tests), DALI loader figures at hw_decoder_load
#            0.65 / 0 / 1                                          -> $OUT/pytest_dali_gpu.txt, loaders_gpu*.json
#   bench    python -m benchmarks with ResNet-50 at 224, bf16, channels_last, batches on the GPU: loaders,
#            kernel, and the MoCo v2 + MixMask step fed from the synthetic batch, DALI (nvJPEG) and the
#            torchvision loader with each step option on/off (batch_views, compile, cudagraphs), its host
#            overhead and share of the model-only ceiling  -> $OUT/bench/bench.json, bench.png
#            (`make bench-readme BENCH=<that bench.json>` renders it into docs/performance.md's GPU section)
#   kernels  the kernel benchmark alone, 15 rounds                 -> $OUT/kernels.json, kernels.txt
#   demo     the demo recipe trained on the GPU in bf16            -> $OUT/demo_gpu_summary.json, demo_gpu.txt
#   cmae     the CMAE demo with ContrastiveCrop on the GPU in bf16 -> $OUT/cmae_gpu_summary.json, cmae_gpu.txt
#   cudagraphs  the same step with torch.compile's CUDA graphs (model.compile=reduce-overhead) against eager,
#            synthetic feed                                        -> $OUT/cudagraphs.json
# Usage there: OUT=DIR bash benchmarks/gpu_session.sh [steps...]   (default: env tests dali bench cudagraphs)
# Dry run (CI, no GPU): DRY=1 OUT=DIR PY=.venv/bin/python bash benchmarks/gpu_session.sh env tests dali bench
# runs every step on the CPU at tiny sizes (the gpu-marked tests are collected and skip), installs nothing.
# The wheels shipped beside it are installed first: make them with benchmarks/gpu_wheels.sh, which also
# lists the device calls that carry them.
# Runs with the machine's python3 (torch 2.11 cu130, numba-cuda). Its numpy 2.5 lacks np.row_stack,
# which its numba-cuda still registers at import, so every CUDA kernel compile fails (seen
# 2026-11-22): carry a numpy <= 2.4 wheel in .whl/ (see the device README) and it is put first on
# PYTHONPATH here.
set -u -o pipefail
DRY=${DRY:-}
if [ -n "$DRY" ]; then  # every step on the CPU at tiny sizes: the script's own check, without a device
  DEV=cpu BENCH_ARGS="--quick --images 64 --precision no"
  VARIANTS=mixmask,plain,mixmask+batch_views,mixmask+compile LOADER_ARGS="--images 64 --size 64 --batch 16 --repeats 1"
  CG_ARGS="--arch resnet10 --size 32 --batch 8 --precision no --steps 2 --repeats 1"
else
  DEV=cuda BENCH_ARGS="--images ${BENCH_IMAGES:-4096} --repeats 3 --arch resnet50 --train-size 224 --train-batch 128 \
--steps 10 --train-repeats 3 --precision bf16"
  VARIANTS=mixmask,plain,mixmask+batch_views,mixmask+compile,mixmask+compile+batch_views
  LOADER_ARGS="--images 1024"
  CG_ARGS="--arch resnet50 --size 224 --batch 128 --precision bf16 --steps 10 --repeats 3"
fi
# DALI and its libraries (~270 MB, over one call's 64 MiB) arrive in parts copied to /tmp/wh by earlier
# calls while the machine is warm; the DALI wheel is split in dali.part* and joined here.
if [ -z "$DRY" ] && ls /tmp/wh/dali.part* >/dev/null 2>&1; then
  cat /tmp/wh/dali.part* > /tmp/wh/nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl && rm /tmp/wh/dali.part*
fi
if [ -z "$DRY" ] && ls /tmp/wh/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site /tmp/wh/*.whl
fi
if [ -z "$DRY" ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
OUT=${OUT:-bench-out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}
steps=${*:-env tests dali bench cudagraphs}
failed=""
for step in $steps; do
  echo "=== $step $(date -u +%H:%M:%S)"
  st=0  # the step's status: the first failing command's (pipefail: a pipeline fails with its command)
  case $step in
    env)
      { nvidia-smi || [ -n "$DRY" ]; nproc; free -g | head -2
        $PY -c "import sys, torch, torchvision, numba, numpy, accelerate; from numba import cuda; \
print(sys.version.split()[0], 'torch', torch.__version__, 'tv', torchvision.__version__, 'numba', numba.__version__, \
'numpy', numpy.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '-', 'numba.cuda', cuda.is_available())"
      } 2>&1 | tee "$OUT/env.txt" || st=$? ;;
    tests)
      $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25 || st=$? ;;
    kernels)
      $PY -m benchmarks.kernels --json "$OUT/kernels.json" --repeats 15 --torch-repeats 2 2>&1 \
        | tee "$OUT/kernels.txt" || st=$? ;;
    demo)
      MIXMASK_DATA_DIR=/tmp/mixmask-data timeout 400 $PY -m accelerate.commands.launch --num_processes 1 \
        --num_machines 1 --mixed_precision bf16 --dynamo_backend no train.py \
        run.out_dir=/tmp/runs run.name=demo_gpu run.progress=false data.workers=12 2>&1 | tail -40 \
        | tee "$OUT/demo_gpu.txt" || st=$?
      cp /tmp/runs/demo_gpu/summary.json "$OUT/demo_gpu_summary.json" 2>/dev/null ;;
    cmae)  # the ablation's last row (benchmarks/methods.py, suite cmae) on the GPU: timm ViT, bf16 autocast
      MIXMASK_DATA_DIR=/tmp/mixmask-data timeout 400 $PY -m accelerate.commands.launch --num_processes 1 \
        --num_machines 1 --mixed_precision bf16 --dynamo_backend no train.py model.framework=cmae \
        ccrop.enabled=true ccrop.alpha=0.1 ccrop.warmup=2 ccrop.interval=2 \
        run.out_dir=/tmp/runs run.name=cmae_gpu run.progress=false data.workers=12 2>&1 | tail -40 \
        | tee "$OUT/cmae_gpu.txt" || st=$?
      cp /tmp/runs/cmae_gpu/summary.json "$OUT/cmae_gpu_summary.json" 2>/dev/null ;;
    dali)  # the DALI GPU path against its CPU path, then loader throughput on the GPU
      $PY -m pytest -q -m "gpu and dali" -p no:cacheprovider tests/loaders 2>&1 | tee "$OUT/pytest_dali_gpu.txt" | tail -15 || st=$?
      n=$(nproc)
      $PY -m benchmarks.loaders --json "$OUT/loaders_gpu.json" --device $DEV $LOADER_ARGS --cores "$n" 2>&1 \
        | tee "$OUT/loaders_gpu.txt" || st=$?
      if [ -z "$DRY" ]; then  # the hardware decoder's share means nothing on the CPU
        $PY -m benchmarks.loaders --json "$OUT/loaders_gpu_hw0.json" --device cuda --images 1024 --cores "$n" \
          --backends dali --hw-decoder-load 0 2>&1 | tail -4 || st=$?
        $PY -m benchmarks.loaders --json "$OUT/loaders_gpu_hw1.json" --device cuda --images 1024 --cores "$n" \
          --backends dali --hw-decoder-load 1 2>&1 | tail -4 || st=$?
      fi ;;
    bench)  # the benchmark's GPU mode: ResNet-50 at 224, bf16, channels_last, batches on the GPU
      # 4096 JPEGs: an epoch of a GPU loader at ~5k img/s must last longer than its start-up
      $PY -m benchmarks --device $DEV $BENCH_ARGS --variants "$VARIANTS" --cores "$(nproc)" \
        --cache "${CACHE:-/tmp/bench-data}" --out "$OUT/bench" 2>&1 | { grep -v -i "warn" || true; } | tail -60 || st=$? ;;
    cudagraphs)  # torch.compile mode reduce-overhead on the synthetic feed, apart: a failure costs only this step
      $PY -m benchmarks.training --device $DEV $CG_ARGS --backends '' --variants mixmask,mixmask+cudagraphs \
        --json "$OUT/cudagraphs.json" 2>&1 \
        | { grep -v -i "warn" || true; } | tail -20 || st=$? ;;
    *) echo "unknown step $step"; st=2 ;;
  esac
  [ $st -ne 0 ] && failed="$failed $step($st)"
done
echo "=== done $(date -u +%H:%M:%S)${failed:+, failed:$failed}"
[ -z "$failed" ]
