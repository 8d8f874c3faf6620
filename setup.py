"""Builds regdrop_ext._C from csrc/: the CPU kernels always, the CUDA kernels
when torch has CUDA and a CUDA toolkit is found.

Environment:
  REGDROP_CUDA=1 / 0    force the CUDA kernels on or off (default: auto).
  REGDROP_SANITIZE=1    CPU build with AddressSanitizer and UndefinedBehaviorSanitizer
                        (see .ci/sanitize.sh for how to run it).
  TORCH_CUDA_ARCH_LIST  GPU architectures; without it and without a visible
                        GPU, DEFAULT_CUDA_ARCHS is used.
  MAX_JOBS              parallel compile jobs (ninja).
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# Ampere and Hopper, plus PTX so newer GPUs can JIT-compile the kernels.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def build_cuda() -> bool:
    forced = os.environ.get("REGDROP_CUDA")
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"REGDROP_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if forced == "1" and not available:
        raise SystemExit(
            "REGDROP_CUDA=1 needs a CUDA build of torch and a CUDA toolkit "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME})"
        )
    return available


def extension():
    cuda = build_cuda()
    # One source list for every build; CMakeLists.txt globs the same folders.
    # csrc/cuda/ is the CUDA backend: its .cpp includes CUDA headers too.
    sources = sorted(f for f in glob.glob("csrc/**/*.cpp", recursive=True) if not f.startswith("csrc/cuda/"))
    # Results must not depend on the compiler fusing a * b + c: the CPU copies
    # for each instruction set and the CUDA kernels agree bit for bit.
    cxx = ["-O3", "-ffp-contract=off", "-Wno-psabi"]
    link = []
    # at::parallel_for is inlined into this library: it runs on torch's OpenMP
    # threads only if compiled with OpenMP (and libgomp is torch's own, by soname).
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if os.environ.get("REGDROP_SANITIZE") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        cxx += sanitize + ["-O1", "-g", "-fno-omit-frame-pointer"]
        link += sanitize
    if not cuda:
        return CppExtension(
            "regdrop_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "--fmad=false", "-lineinfo"]
    return CUDAExtension(
        "regdrop_ext._C",
        sources,
        define_macros=[("REGDROP_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    packages=find_packages(include=["regdrop_ext", "regdrop_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
