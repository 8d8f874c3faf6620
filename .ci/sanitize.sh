#!/usr/bin/env bash
# Builds the CPU extension with AddressSanitizer and UndefinedBehaviorSanitizer
# and runs, under them, the tests that reach every CPU kernel copy (baseline,
# AVX2, AVX-512: test_philox.py runs each), every op, layout, tail and dtype,
# and the host emulation of the CUDA kernels, built with the sanitizers too
# (REGDROP_SANITIZE=1): an access past a tensor by a CUDA thread body shows
# here. Any out-of-bounds access or undefined behaviour aborts the run.
#   PYTHON: the interpreter of a venv with torch and the test requirements.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$repo/.venv/bin/python}

source "$repo/.ci/scratch.sh"
work=$(scratch_dir)
trap 'rm -rf "$work"' EXIT
(cd "$repo" && git ls-files -z | xargs -0 cp --parents -t "$work")
(cd "$work" && REGDROP_SANITIZE=1 REGDROP_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
  "$PYTHON" -m pip install --quiet --no-build-isolation --no-deps --target "$work/site" .)
library=$(ls "$work"/site/regdrop_ext/_C*.so)
# grep reads all of nm's output (no -q): under pipefail, nm must not die of SIGPIPE.
nm -D "$library" | grep __asan_report > /dev/null || { echo "the sanitized build has no ASan checks"; exit 1; }

# torch is not instrumented, so the runtimes are preloaded; its own
# allocations are not leaks we can act on.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:verify_asan_link_order=0:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH="$work/site"
# --capture=sys: a sanitizer report, written to fd 2 before the abort, stays visible;
# the aborted worker (-n 2: both cores) fails the test it was running.
# Run from the sanitized build: the repository's own regdrop_ext/ would shadow it.
cd "$work/site"
"$PYTHON" -c "import regdrop_ext, sys; assert regdrop_ext.__file__.startswith('$work/site'), regdrop_ext.__file__"
REGDROP_SANITIZE=1 "$PYTHON" -m pytest -q -n 2 -p no:cacheprovider --capture=sys \
  "$repo/tests/test_philox.py" "$repo/tests/test_dropout.py" "$repo/tests/test_variants.py" \
  "$repo/tests/test_hostile_inputs.py" "$repo/tests/test_concurrency.py" "$repo/tests/test_cuda_emulation.py" \
  "$repo/tests/test_norm.py" "$repo/tests/test_norm_emulation.py"
