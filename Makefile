# The README's commands. Each does its own set-up on a fresh machine:
#   make test    venv + pinned CPU torch + triton, build fastdl._C, run the tests
#   make bench   same set-up, then `python -m fastdl.bench` (tables, JSON, plots)
#
# On a machine whose python3 already has a CUDA torch (the H100 image) use
# scripts/gpu_check.sh instead: it builds against that torch, no venv, no network.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned for development and CI (see ../shared/NOTES-ENV.md): the CPU wheel of torch,
# the Triton the H100 image has, and numpy < 2.4 for Triton 3.6's interpreter; a setuptools
# that builds editable wheels itself (a venv's own may be too old, e.g. 65 on Python 3.11).
TORCH_PIN ?= torch==2.13.0
DEV_REQS = $(TORCH_PIN) triton==3.6.0 "numpy<2.4" "setuptools>=70.1" wheel pytest pytest-xdist pytest-benchmark \
  ninja tqdm matplotlib
# The CUDA 13 build of torch that lies on the dev machine's disk: used only to
# compile-check the torch-facing CUDA code (csrc/ops) without a GPU.
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_PIN ?= torch==2.14.1
# The torch of the lent GPU machine's image (../shared/NOTES-ENV.md; downloaded, ~1 min):
# the CUDA part is built against it too, so that a GPU's short loan is not spent on a build
# that fails there.
GPU_IMAGE_VENV ?= .venv-cuda-image
GPU_IMAGE_TORCH_PIN ?= torch==2.11.0
# The 25 slowest tests at the end of each run (where CI's time goes), and two pytest-xdist
# workers where the venv has it (a venv made before it was in DEV_REQS runs them in one):
# on the 2-core CI machine the suite took 23 min in one process, 20 in two (c7563c4).
# worksteal: a worker that runs out of tests takes queued ones from the other. With the
# default (load) the worker that drew tests/test_build.py's builds kept ~450 queued tests
# to run alone after them; the other had none left for the run's last 17 min, where the
# builds' own jobs kept both cores busy only part of the time (a 7f1025e CI run).
PYTEST_ARGS ?= --durations=25 $(shell $(PY) -c "import xdist" 2>/dev/null && printf '%s' '-n 2 --dist worksteal')

.PHONY: test bench venv build check-cuda-build clean

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(DEV_REQS)
	touch $@

venv: $(VENV)/.installed

build: venv
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

test: build
	FASTDL_CUDA_VENV=$(CUDA_VENV) FASTDL_CUDA_TORCH_PIN=$(CUDA_TORCH_PIN) \
	  FASTDL_GPU_IMAGE_VENV=$(GPU_IMAGE_VENV) FASTDL_GPU_IMAGE_TORCH_PIN=$(GPU_IMAGE_TORCH_PIN) \
	  $(PY) -m pytest -q -rs $(PYTEST_ARGS)

bench: build
	$(PY) -m fastdl.bench

# Builds fastdl._C CPU-only and with its CUDA part against a CUDA torch, in a separate venv
# (for the default architectures), and against the GPU image's torch for its sm_90a, as
# scripts/gpu_check.sh builds there. tests/test_build.py's CUDA builds link kernels/ as its
# nvcc check built it, build the CPU kernels for one ISA level, and leave the CPU-only build
# to its fallback test.
check-cuda-build:
	bash scripts/check_cuda_build.sh $(CUDA_VENV) $(CUDA_TORCH_PIN)
	TORCH_CUDA_ARCH_LIST=9.0a bash scripts/check_cuda_build.sh $(GPU_IMAGE_VENV) $(GPU_IMAGE_TORCH_PIN) cuda-only

clean:
	rm -rf build fastdl/_C*.so *.egg-info
