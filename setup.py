"""Builds regdrop_ext._C from csrc/: the CPU kernels always, the CUDA kernels
when torch has CUDA and a CUDA toolkit is found.

Environment:
  REGDROP_CUDA=1 / 0    force the CUDA kernels on or off (default: auto).
  REGDROP_SANITIZE=1    CPU build with AddressSanitizer and UndefinedBehaviorSanitizer
                        (see .ci/sanitize.sh for how to run it).
  TORCH_CUDA_ARCH_LIST  GPU architectures; without it and without a visible
                        GPU, DEFAULT_CUDA_ARCHS is used.
  MAX_JOBS              parallel compile jobs (ninja).
  REGDROP_DEBUG=1       keep debug info and symbols in _C. By default _C ships
                        stripped: Python's CFLAGS carry -g, which makes it
                        about 16 MB instead of 1 MB.

_C links against the torch it is compiled with and loads into no other, so it
is built against the torch installed in the environment, without pip's build
isolation, and its wheel requires exactly that torch version:

  pip install --no-build-isolation .       (-e . for development)

torch is deliberately not a build requirement: a build-isolated `pip install .`
would download a different torch to build against. Without torch importable
this script stops at once and says so. Objects live in
build/temp-<python>-torch-<version>/, which ninja updates incrementally, for
editable installs too: only changed sources are recompiled.
"""

import glob
import os
import sys

try:
    import torch
except ImportError:
    raise SystemExit(
        "\nregdrop_ext compiles against the torch it will run with, and no torch is importable here.\n"
        "A plain `pip install .` builds in an isolated environment that hides your torch\n"
        "(and would fetch another one: the result would not load into yours).\n"
        "Install torch first, then build without build isolation:\n\n"
        "    pip install torch\n"
        "    pip install --no-build-isolation .        # or -e . for development\n"
    ) from None
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
    # No --fmad=false: the kernels round every product and sum explicitly
    # (csrc/epilogue.h), so that nvcc's flags cannot change their results.
    nvcc = ["-O3", "-lineinfo"]
    return CUDAExtension(
        "regdrop_ext._C",
        sources,
        define_macros=[("REGDROP_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


def strip_unless_debug(ext):
    """No debug info in _C unless REGDROP_DEBUG=1 (or a sanitizer build, which
    needs it for its reports): -g0 after Python's -g, and the linker strips."""
    debug = os.environ.get("REGDROP_DEBUG", "0")
    if debug not in ("0", "1"):
        raise SystemExit(f"REGDROP_DEBUG must be 0 or 1, got {debug!r}")
    if debug == "1":
        ext.extra_compile_args["cxx"].append("-g")
        if "nvcc" in ext.extra_compile_args:
            ext.extra_compile_args["nvcc"].append("-g")
    elif os.environ.get("REGDROP_SANITIZE") != "1":
        ext.extra_compile_args["cxx"].append("-g0")
        ext.extra_link_args.append("-s")
    return ext


BUILT_AGAINST = os.path.join("regdrop_ext", "_built_against.py")


class BuildAgainstInstalledTorch(BuildExtension):
    """torch's BuildExtension, plus two things:

    - objects go to one folder per Python and torch version that outlives the
      build, so ninja recompiles only changed sources (torch's headers
      included); an editable install would otherwise compile everything in a
      fresh temporary folder. One folder per torch version keeps each one's
      objects when switching (make test TORCH=...), and never links objects
      of one torch against another, whatever the file times say.
    - BUILT_AGAINST, written beside _C, names the torch it was compiled
      against; regdrop_ext checks it before loading _C.
    """

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join("build", f"temp-{sys.implementation.cache_tag}-torch-{torch.__version__}")

    def run(self):
        super().run()
        cuda = any(source.endswith(".cu") for ext in self.extensions for source in ext.sources)
        record = (
            "# Written by setup.py when _C was built: the torch it was compiled against.\n"
            f"TORCH_VERSION = {str(torch.__version__)!r}\n"
            f"TORCH_CUDA = {torch.version.cuda if cuda else None!r}  # None: _C has no CUDA kernels\n"
        )
        # In place (editable installs): _C was copied into the source tree.
        for folder in [self.build_lib] + (["."] if self.inplace else []):
            path = os.path.join(folder, BUILT_AGAINST)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(record)


setup(
    packages=find_packages(include=["regdrop_ext", "regdrop_ext.*"]),
    ext_modules=[strip_unless_debug(extension())],
    cmdclass={"build_ext": BuildAgainstInstalledTorch},
    # The torch release _C was compiled against (without the local label:
    # a CPU-only _C also loads into the CUDA build of the same release).
    install_requires=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
)
