# mixmask: two commands do everything on a fresh machine.
#   make train   set up .venv, then train MoCo v2 + MixMask on the embedded demo dataset
#                (ARGS="model.framework=simclr|byol|simsiam|barlow_twins" for the other frameworks)
#   make test    set up .venv, then run the test suite
# Set-up is done once (a stamp file records it) and redone when pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
APT_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev
ARGS   ?=
PYTEST_ARGS ?=
NPROC  ?= 1

.PHONY: setup apt train test bench bench-readme bench-kernels bench-loaders bench-frameworks compare ablate-cmae compare-ccrop evaluate clean

setup: $(STAMP)

# System libraries (FFCV compiles against them). Installed only when running as root and missing.
apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then echo "apt: installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "apt: missing$$missing (not root: install them yourself for the ffcv backend)"; fi; \
	fi

$(STAMP): pyproject.toml
	$(MAKE) apt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,dali,ffcv]'
	touch $@

# No GPU: accelerate's --cpu launcher (train.py fans out to NPROC gloo processes); GPUs: --multi_gpu.
DEVICE_FLAG = $(shell $(PY) -c "import torch; n = torch.cuda.device_count(); print('--cpu' if n == 0 else ('--multi_gpu' if $(NPROC) > 1 else ''))")

train: setup
	$(VENV)/bin/accelerate launch $(DEVICE_FLAG) --num_processes $(NPROC) --num_machines 1 --mixed_precision no \
	  --dynamo_backend no train.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench-kernels: setup
	$(PY) -m benchmarks.kernels --json bench-out/kernels.json

# Every throughput figure: loaders, kernel, training step -> bench-out/bench.json + bench.png.
# QUICK=1: tiny sizes (the CI smoke variant).
QUICK ?=
bench: setup
	$(PY) -m benchmarks --out bench-out $(if $(QUICK),--quick,)

# docs/performance.md's benchmark section from a `make bench` run (copies its chart to docs/); a run on a GPU
# (BENCH=<the bench.json of benchmarks/gpu_session.sh>) goes to the GPU section and docs/bench-gpu.png.
BENCH ?= bench-out/bench.json
bench-readme: setup
	$(PY) -m benchmarks.report $(BENCH) --readme docs/performance.md --copy-chart $(if $(EPOCHS),--epochs $(EPOCHS))

bench-loaders: setup
	$(PY) -m benchmarks.loaders --json bench-out/loaders.json

# The demo of every framework with MixMask on and off (kNN, linear probe, img/s): docs/results.md's framework table.
SEEDS ?= 0
bench-frameworks: setup
	$(PY) -m benchmarks.frameworks --seeds $(SEEDS) --out bench-out/frameworks --readme docs/results.md

# The seed papers' comparison in miniature (MoCo v2 + each masking method, 3 seeds): docs/results.md's methods table + plot.
COMPARE_SEEDS ?= 0,1,2
compare: setup
	$(PY) -m benchmarks.methods --seeds $(COMPARE_SEEDS) --out bench-out/methods --readme docs/results.md

# The CMAE ablation (MAE -> + small decoder -> + contrastive -> + position -> + ContrastiveCrop, 3 seeds).
ablate-cmae: setup
	$(PY) -m benchmarks.methods --suite cmae --seeds $(COMPARE_SEEDS) --readme docs/results.md

# MoCo v2 + MixMask with and without ContrastiveCrop (3 seeds).
compare-ccrop: setup
	$(PY) -m benchmarks.methods --suite ccrop --seeds $(COMPARE_SEEDS) --readme docs/results.md

# Every evaluation protocol (kNN, linear, semi-supervised 1% / 10%, fine-tuning) on the demo checkpoint through
# every backend: README's first table.
evaluate: setup
	$(PY) -m benchmarks.evaluations --readme README.md

clean:
	rm -rf runs bench-out .pytest_cache
