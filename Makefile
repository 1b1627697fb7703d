# Developer shortcuts for the compiled extension (csrc/). Everything goes through the venv.
#   make ext             build ctal._C (CUDA when nvcc is found, CPU-only otherwise)
#   make ext-cpu         CPU-only build (fast; no nvcc)
#   make test-ext        the extension's tests
#   make bench-cpu       every CPU backend (C++, PyTorch linear/quadratic, reference) side by side
#   make resource-usage  nvcc -Xptxas -v for every CUDA kernel: registers, shared memory, spills
#   make static-report   every Triton launch compiled for sm_90 as the JIT would (paper shapes, TF32
#                        and bf16) plus the CUDA kernels: the tables of benchmarks/RESOURCES.md
#   make sanitize        (GPU) compute-sanitizer memcheck + racecheck on small cases of both CUDA
#                        backends, fp32 and bf16 (the case scripts/gpu_session.sh runs)
#   make gpu-prebuild    ctal._C for the GPU machine (torch 2.11 / CUDA 13 / sm_90) into build/gpu
#   make gpu-dry-run     the GPU session's plan on this CPU (OUT=build/gpu-session-dry)
PY ?= .venv/bin/python
NVCC ?= nvcc
ARCHS ?= 80 90
JOBS ?= $(shell nproc)
CU ?= csrc/linear_cuda.cu csrc/fused_cuda.cu

.PHONY: ext ext-cpu test-ext bench-cpu resource-usage static-report sanitize gpu-prebuild gpu-dry-run clean-ext

ext:
	MAX_JOBS=$(JOBS) $(PY) -m pip install --no-build-isolation --no-deps -e .

ext-cpu:
	CTAL_NO_CUDA=1 MAX_JOBS=$(JOBS) $(PY) -m pip install --no-build-isolation --no-deps -e .

test-ext:
	$(PY) -m pytest -q tests/ops/test_extension.py

bench-cpu:
	$(PY) -m benchmarks.bench_ops --device cpu --shapes cpu

# Include paths and C++ standard exactly as torch's cpp_extension would use them, plus the
# headers pip's nvidia-* packages ship (cuBLAS etc.).
NVCC_FLAGS = $(shell $(PY) -c "import glob, inspect, os, sys, sysconfig, torch, torch.utils.cpp_extension as c; \
t = os.path.join(os.path.dirname(torch.__file__), 'include'); \
std = 'c++20' if '-std=c++20' in inspect.getsource(c) else 'c++17'; \
inc = [t, os.path.join(t, 'torch/csrc/api/include'), sysconfig.get_paths()['include'], 'csrc']; \
inc += sorted(glob.glob(os.path.join(sys.prefix, 'lib/python*/site-packages/nvidia/*/include'))); \
print(' '.join(['-std=' + std] + ['-I' + i for i in inc]))")
DEFINES = -DCTAL_WITH_CUDA -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
	-D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_EXTENSION_NAME=_C

resource-usage:
	@for arch in $(ARCHS); do for f in $(CU); do \
	  echo "== $$f sm_$$arch"; \
	  $(NVCC) -O3 --expt-relaxed-constexpr $(DEFINES) $(NVCC_FLAGS) -Xcompiler -fPIC \
	    -gencode=arch=compute_$$arch,code=sm_$$arch -Xptxas -v -c $$f -o /dev/null 2>&1 \
	  | grep -E "Compiling entry|registers|spill|stack frame" \
	  | sed -E 's/.*Compiling entry function .(_Z[^ ]*). for .(sm_[0-9]+)./\1 \2/' \
	  | while read -r line; do \
	      case "$$line" in _Z*) echo "  $$(echo "$$line" | cut -d' ' -f1 | c++filt -p | sed -E 's/ctal_ext::\(anonymous namespace\):://')";; \
	      *) echo "      $$line" | sed -E 's/ptxas info *: //';; esac; done; \
	done; done

# The static kernel report (kernels/compile_check.py); REPORT_ARGS adds options, e.g.
# REPORT_ARGS="--dtypes fp32 tf32 bf16 fp64" or "--shapes small".
REPORT_ARGS ?=
static-report:
	env -u TRITON_INTERPRET $(PY) -m ctal.kernels.compile_check --markdown --cuda $(REPORT_ARGS)

# Without the caching allocator each tensor is its own allocation, so memcheck also sees a read
# past a tensor's end that would land inside a cached block.
SANITIZE_CASE = $(PY) -m benchmarks.gpu_check sanitize-case --dtypes fp32,bf16

sanitize:
	PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 $(SANITIZE_CASE)
	PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck --racecheck-report all \
	  --error-exitcode 1 $(SANITIZE_CASE)

gpu-prebuild:
	scripts/gpu_prebuild.sh

gpu-dry-run:
	GPU_SESSION_DRY_RUN=1 PY=$(PY) OUT=$${OUT:-build/gpu-session-dry} scripts/gpu_session.sh

clean-ext:
	rm -rf build/lib* build/temp* ctal/_C*.so
