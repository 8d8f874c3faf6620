#!/usr/bin/env bash
# The C++ build against libtorch (CMakeLists.txt): configure, build, run the
# C++ tests with ctest, install into a temporary prefix, then build and run
# examples/cpp against the installed package.
#
#   REGDROP_PYTHON  a Python with torch and regdrop_ext installed (default:
#                   .venv/bin/python, from `make test`). Its torch is the
#                   libtorch built against; the tests compare masks with its
#                   regdrop_ext.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
step() { printf '\n== %s (%ds)\n' "$1" $((SECONDS - start)); }

python=${REGDROP_PYTHON:-.venv/bin/python}
[ -x "$python" ] || { echo "REGDROP_PYTHON=$python is not an executable Python"; exit 1; }
# An absolute path (the tests run it from the build tree), venv links kept.
python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python")
torch_prefix=$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')

if [ ! -f /usr/include/gtest/gtest.h ]; then
  step "installing GoogleTest (libgtest-dev)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq libgtest-dev || { apt-get update -qq && apt-get install -y -qq libgtest-dev; }
fi

source .ci/scratch.sh
work=$(scratch_dir)
trap 'rm -rf "$work"' EXIT

step "configure"
cmake -S . -B "$work/build" -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DREGDROP_BUILD_TESTS=ON -DREGDROP_PYTHON_EXECUTABLE="$python"

step "build"
cmake --build "$work/build" -j2

step "ctest"
ctest --test-dir "$work/build" -j2 --output-on-failure

step "install, then build examples/cpp against the installed package"
cmake --install "$work/build" --prefix "$work/prefix"
cmake -S examples/cpp -B "$work/example" -DCMAKE_PREFIX_PATH="$work/prefix;$torch_prefix"
cmake --build "$work/example" -j2
"$work/example/dropout_example"

step "done"
