"""Build script: packages ``ctal`` (and the Triton kernels in ``kernels/`` as ``ctal.kernels``) and
compiles ``csrc/`` into ``ctal._C`` with torch's cpp_extension and ninja.

    pip install --no-build-isolation --no-deps -e .

builds the CUDA kernels when a CUDA toolkit (nvcc) is found, the C++ CPU kernels otherwise.
CUDA headers and libraries that pip's ``nvidia-*`` packages ship (cuBLAS headers, for example)
are found without any environment setup. Environment flags:

    CTAL_SKIP_EXT=1           package only, no compiled extension (ctal then runs without it)
    CTAL_NO_CUDA=1            CPU-only extension even when a CUDA toolkit is present
    CTAL_FORCE_CUDA=1         fail instead of falling back to CPU-only when no toolkit is found
    CTAL_CUDA_ARCH_LIST=...   GPU targets, default "8.0;9.0+PTX" (TORCH_CUDA_ARCH_LIST syntax)
    CTAL_DEBUG=1              -O0 -g, and device line info
    MAX_JOBS=n                parallel compile jobs (default: this machine's CPU count)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
packages = find_packages(include=["ctal", "ctal.*"]) + ["ctal.kernels"]
common = dict(packages=packages, package_dir={"ctal.kernels": "kernels"},
              package_data={"ctal": ["configs/*.yaml"]})


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"[ctal setup] {msg}", file=sys.stderr)


def _pip_nvidia_roots() -> list[str]:
    """Folders of pip's nvidia-* CUDA packages (nvidia/cu13, nvidia/cublas, ...) that hold headers."""
    roots = []
    for entry in sys.path:
        base = os.path.join(entry, "nvidia")
        if os.path.isdir(base):
            roots += sorted(d for d in glob.glob(os.path.join(base, "*")) if os.path.isdir(d))
    return roots


def _find_cuda_home() -> str | None:
    """CUDA_HOME / CUDA_PATH, else nvcc on PATH, else /usr/local/cuda, else a pip-shipped nvcc."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        # A wrapper script (e.g. /usr/local/bin/nvcc exec-ing the real one) has no include/ beside it.
        for cand in (os.path.dirname(os.path.dirname(real)), "/usr/local/cuda"):
            if os.path.exists(os.path.join(cand, "include", "cuda_runtime.h")):
                return cand
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    for root in _pip_nvidia_roots():  # nvidia-cuda-nvcc wheels
        if os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def _extensions():
    if _flag("CTAL_SKIP_EXT"):
        _log("CTAL_SKIP_EXT=1: building no extension")
        return [], {}
    cuda_home = None if _flag("CTAL_NO_CUDA") else _find_cuda_home()
    if cuda_home is None and _flag("CTAL_FORCE_CUDA"):
        raise RuntimeError("CTAL_FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to the "
                           "folder holding bin/nvcc, or install nvidia-cuda-nvcc")
    if cuda_home is not None:
        # torch.utils.cpp_extension reads these when it is first imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("CTAL_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = _flag("CTAL_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    sources = [os.path.join("csrc", f) for f in ("ops.cpp", "linear.cpp", "linear_cpu.cpp")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if cuda_home is None:
        _log(f"no CUDA toolkit found: building the CPU-only extension (MAX_JOBS={os.environ['MAX_JOBS']})")
        ext = CppExtension("ctal._C", sources, include_dirs=include_dirs,
                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
        return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}

    # Headers the toolkit lacks (cuBLAS, cuRAND, ... that ATen's CUDA headers include) may come
    # from pip's nvidia packages; the toolkit's own folder stays first on the search path.
    pip_inc = [os.path.join(r, "include") for r in _pip_nvidia_roots()
               if os.path.isdir(os.path.join(r, "include"))]
    pip_lib = [os.path.join(r, "lib") for r in _pip_nvidia_roots() if os.path.isdir(os.path.join(r, "lib"))]
    nvcc = opt + ["--expt-relaxed-constexpr", "-Xptxas=-warn-spills",
                  "--threads=1", "-DCTAL_WITH_CUDA"]
    if debug:
        nvcc += ["-lineinfo"]
    _log(f"CUDA toolkit at {cuda_home}; arch list {os.environ['TORCH_CUDA_ARCH_LIST']}; "
         f"MAX_JOBS={os.environ['MAX_JOBS']}; pip CUDA include dirs: {len(pip_inc)}")
    ext = CUDAExtension(
        "ctal._C", sources + [os.path.join("csrc", f) for f in ("linear_cuda.cu", "fused_cuda.cu")],
        include_dirs=include_dirs + [os.path.join(cuda_home, "include")] + pip_inc,
        library_dirs=pip_lib,
        extra_compile_args={"cxx": cxx + ["-DCTAL_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, **common)
