# Sourced by .ci/run: a compile cache (ccache) kept between CI runs on this
# machine, so that a run compiles again only what changed since the last one.
# Every build and check still runs; ccache answers only a compile whose
# preprocessed source, flags and compiler it has seen. Without ccache, and no
# apt to install it, the builds run uncached.
#   CCACHE_DIR  where the cache lives (default: ~/.cache/regdrop_ext/ccache)
if ! command -v ccache > /dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get install -y -qq ccache || { apt-get update -qq && apt-get install -y -qq ccache; }; } > /dev/null 2>&1 || true
fi
if command -v ccache > /dev/null; then
  export CCACHE_DIR=${CCACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/regdrop_ext/ccache}
  # Absolute paths inside the checkout are hashed relative to the compiler's
  # working directory, so a clone in a new temporary folder hits what the last
  # one stored (the scratch trees live in the checkout: .ci/scratch.sh). The
  # working directory itself would differ in every run's debug information.
  export CCACHE_BASEDIR=$PWD CCACHE_NOHASHDIR=1
  # The C++ tests' precompiled header (tests/cpp/CMakeLists.txt) is cached
  # only if ccache may skip its checks of macros that no source here uses.
  export CCACHE_SLOPPINESS=pch_defines,time_macros
  # The compilers by name, first on PATH: torch's builder (ninja), CMake and
  # nvcc's host compiles find them there; torch's builder runs nvcc through it.
  mkdir -p "$CCACHE_DIR/bin"
  for compiler in cc c++ gcc g++; do ln -sf "$(command -v ccache)" "$CCACHE_DIR/bin/$compiler"; done
  export PATH=$CCACHE_DIR/bin:$PATH PYTORCH_NVCC="ccache nvcc"
  ccache --zero-stats > /dev/null
  echo "compile cache: $CCACHE_DIR ($(ccache --version | head -1))"
else
  echo "compile cache: none (ccache is not installed and apt could not install it)"
fi
