"""Builds regdrop_ext._C from csrc/: the CPU kernels always, the CUDA kernels
when torch has CUDA and a CUDA toolkit is found.

Environment:
  REGDROP_CUDA=1 / 0    force the CUDA kernels on or off (default: on when torch has CUDA).
  CUDA_HOME             the CUDA toolkit; without it, the one the `nvcc` on PATH
                        belongs to (nvcc may be a wrapper script elsewhere), else
                        /usr/local/cuda. Checked (cuda_runtime_api.h) before
                        anything compiles: a CUDA torch without a toolkit stops at
                        once and says to set CUDA_HOME or REGDROP_CUDA=0.
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
isolation. The wheel's local version names that torch (0.1.0+torch2.13.0cpu);
its requirement is any torch, so that installing it never replaces yours:

  pip install --no-build-isolation .       (-e . for development)

torch is deliberately not a build requirement: a build-isolated `pip install .`
would download a different torch to build against. Without torch importable
this script stops at once and says so. Objects live in
build/temp-<python>-torch-<version>/, which ninja updates incrementally, for
editable installs too: only changed sources are recompiled.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
from typing import Optional

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
import torch.utils.cpp_extension
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

VERSION = "0.1.0"
# Ampere and Hopper, plus PTX so newer GPUs can JIT-compile the kernels.
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
CUDA_HEADER = os.path.join("include", "cuda_runtime_api.h")


def find_cuda_toolkit(environ=os.environ, fallback: str = "/usr/local/cuda") -> str:
    """The CUDA toolkit's root, found as .ci/cuda_compile_check.sh finds it:
    CUDA_HOME; else ask the `nvcc` on PATH where its toolkit is (it may be a
    wrapper script, in /usr/local/bin say, where torch would guess /usr/local);
    else ``fallback``. Raises SystemExit, naming CUDA_HOME and REGDROP_CUDA=0,
    unless that root has cuda_runtime_api.h: seconds in, before any compile."""
    tried = []
    home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    if home:
        tried.append(f"CUDA_HOME={home}")
    else:
        nvcc = shutil.which("nvcc", path=environ.get("PATH", ""))
        if nvcc:
            dryrun = subprocess.run([nvcc, "--dryrun", "-c", "/dev/null"], capture_output=True, text=True, timeout=60)
            top = re.search(r"^#\$ TOP=(.*)$", dryrun.stdout + dryrun.stderr, re.M)
            home = os.path.realpath(top.group(1).strip()) if top else None
            tried.append(f"{nvcc} --dryrun: " + (f"TOP={home}" if home else "no TOP= line"))
        else:
            tried.append("no nvcc on PATH")
        if home is None:
            home = fallback
            tried.append(fallback)
    if home and os.path.isfile(os.path.join(home, CUDA_HEADER)):
        return home
    raise SystemExit(
        f"\nregdrop_ext: torch {torch.__version__} has CUDA {torch.version.cuda}, but no CUDA toolkit with "
        f"{CUDA_HEADER} was found (tried: {'; '.join(tried)}).\n"
        "Either point CUDA_HOME at the toolkit (the folder with bin/nvcc and include/), or build the\n"
        "CPU kernels only:\n\n"
        "    CUDA_HOME=/path/to/cuda pip install --no-build-isolation .\n"
        "    REGDROP_CUDA=0 pip install --no-build-isolation .\n"
    )


def cuda_toolkit_to_build_with(environ=os.environ, torch_cuda=torch.version.cuda, fallback="/usr/local/cuda"):
    """The toolkit to compile the CUDA kernels with, or None for a CPU-only build."""
    forced = environ.get("REGDROP_CUDA")
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"REGDROP_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return None
    if torch_cuda is None:
        if forced == "1":
            raise SystemExit(f"REGDROP_CUDA=1 needs a CUDA build of torch; torch {torch.__version__} has no CUDA")
        return None
    return find_cuda_toolkit(environ, fallback)


def wheel_version(cuda: Optional[str], torch_version: str = torch.__version__) -> str:
    """VERSION with a local label naming the torch _C is compiled against, as
    PyTorch's own packages label their builds: 0.1.0+torch2.13.0cpu, or
    0.1.0+torch2.14.1cu130 with CUDA kernels (``cuda``: their CUDA version)."""
    build = f"cu{cuda.replace('.', '')}" if cuda else "cpu"
    return f"{VERSION}+torch{torch_version.split('+')[0]}{build}"


def extension(cuda_home):
    cuda = cuda_home is not None
    if cuda:
        # torch guessed its CUDA_HOME when imported; its compile and link steps read it there.
        torch.utils.cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"] = cuda_home
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
            f"VERSION = {wheel_version(torch.version.cuda if cuda else None)!r}\n"
        )
        # In place (editable installs): _C was copied into the source tree.
        for folder in [self.build_lib] + (["."] if self.inplace else []):
            path = os.path.join(folder, BUILT_AGAINST)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(record)


if __name__ == "__main__":  # tests run this file for its functions alone
    cuda_home = cuda_toolkit_to_build_with()
    setup(
        version=wheel_version(torch.version.cuda if cuda_home is not None else None),
        packages=find_packages(include=["regdrop_ext", "regdrop_ext.*"]),
        package_data={"regdrop_ext": ["py.typed"]},
        ext_modules=[strip_unless_debug(extension(cuda_home))],
        cmdclass={"build_ext": BuildAgainstInstalledTorch},
        # Any torch: pip must never replace the user's torch to satisfy this
        # package (a pinned torch==2.13.0 made pip swap a 2.14.1+cu130 for a
        # 2.13.0+cpu). The local version names the torch _C needs, and
        # `import regdrop_ext` checks it, saying what to rebuild.
        install_requires=["torch", "numpy"],
    )
