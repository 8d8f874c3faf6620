#!/usr/bin/env bash
# The install paths of a new user (README "Build"), where they are cheap to check:
#   1. a plain `pip install .` (build isolation) stops within seconds, before
#      fetching any torch, and prints the command that works;
#   2. a wheel built with --no-build-isolation ships _C stripped and py.typed,
#      names the torch it was built against in its local version
#      (0.1.0+torch2.13.0cpu), requires any torch, installs into a fresh venv
#      beside that torch and imports from another directory;
#   3. Python run from the checkout root, with that wheel installed, explains
#      that it found the unbuilt source instead of a circular-import error;
#   4. beside another torch release (OTHER_TORCH_PYTHON, the CUDA compile
#      check's venv), `pip install --dry-run` of the wheel would not change
#      torch, and the wheel's import names the torch to rebuild against
#      instead of failing with "undefined symbol";
#   5. with that CUDA torch, an `nvcc` wrapper on PATH whose toolkit has no
#      headers, and no CUDA_HOME, `pip install --no-build-isolation .` stops
#      within seconds, before compiling anything, naming CUDA_HOME and
#      REGDROP_CUDA=0.
#   PYTHON              a venv's interpreter with torch (default: .venv/bin/python, from `make test`)
#   TORCH               the torch requirement of the fresh venv (default: torch==2.13.0)
#   OTHER_TORCH_PYTHON  an interpreter with a different torch release (step 4 is skipped without one)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
start=$SECONDS
step() { printf '\n== %s (%ds)\n' "$1" $((SECONDS - start)); }
fail() { echo "FAIL: $*"; exit 1; }
PYTHON=${PYTHON:-$repo/.venv/bin/python}
TORCH=${TORCH:-torch==2.13.0}
# pip's file:// index locations of this machine warn on every call.
quiet() { grep -v '^WARNING: Location' || true; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The checkout as a fresh clone has it: tracked and new files, nothing built.
mkdir "$work/checkout"
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work/checkout"
python3 -m venv "$work/fresh"

step "build-isolated pip install . stops at once, with the command that works"
begin=$SECONDS
set +e
(cd "$work/checkout" && timeout 300 "$work/fresh/bin/pip" install . > "$work/isolated.log" 2>&1)
status=$?
set -e
quiet < "$work/isolated.log"
echo "exit status $status after $((SECONDS - begin)) s"
[ "$status" -ne 0 ] || fail "pip install . succeeded in build isolation"
[ "$status" -ne 124 ] || fail "pip install . still running after 300 s"
grep -q 'pip install --no-build-isolation \.' "$work/isolated.log" || fail "no --no-build-isolation advice"
! grep -qi 'torch-[0-9].*\.whl\|Collecting torch' "$work/isolated.log" || fail "pip fetched a torch to build against"

step "wheel built with --no-build-isolation: stripped, py.typed, its torch in the version, any torch required"
# In place, so the build folder of `make test` is reused: only the link runs.
PATH="$(dirname "$PYTHON"):$PATH" "$PYTHON" -m pip wheel --quiet --no-build-isolation --no-deps -w "$work/dist" . 2>&1 | quiet
wheel=$(ls "$work"/dist/regdrop_ext-*.whl)
built_torch=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])')
unzip -p "$wheel" '*.dist-info/METADATA' > "$work/METADATA"
grep -x "Version: 0.1.0+torch${built_torch}cpu" "$work/METADATA" || fail "the version does not name torch $built_torch"
grep -x "Requires-Dist: torch" "$work/METADATA" || fail "METADATA does not require plain torch"
# The listing goes through a file: unzip writes it line by line, and a grep -q
# that stops at its match would kill it with SIGPIPE, failing under pipefail.
unzip -l "$wheel" > "$work/listing"
grep -q 'regdrop_ext/py.typed' "$work/listing" || fail "no py.typed in the wheel"
(cd "$work" && unzip -q -o "$wheel" 'regdrop_ext/_C*' -d unpacked)
library=$(ls "$work"/unpacked/regdrop_ext/_C*.so)
ls -l "$library"
readelf -S "$library" > "$work/sections"
! grep -q '\.debug_info' "$work/sections" || fail "_C has debug info"

step "the wheel installs into a fresh venv beside $TORCH and imports from another directory"
"$work/fresh/bin/pip" install --quiet "$TORCH" 2>&1 | quiet
"$work/fresh/bin/pip" install --dry-run "$wheel" 2>&1 | quiet | tee "$work/dry-run.log" | grep 'Would install' || true
! grep -q 'Would install.* torch-' "$work/dry-run.log" || fail "installing the wheel would change torch"
"$work/fresh/bin/pip" install --quiet "$wheel" 2>&1 | quiet
(cd "$work" && "$work/fresh/bin/python" - <<'PY'
import torch
import regdrop_ext
assert "site-packages" in regdrop_ext.__file__, regdrop_ext.__file__
out = regdrop_ext.Dropout(0.5)(torch.ones(1000))
assert set(out.unique().tolist()) <= {0.0, 2.0} and 0 < int(out.count_nonzero()) < 1000
print("imported", regdrop_ext.__file__)
PY
)

step "from the checkout root, the unbuilt source explains itself"
set +e
message=$(cd "$work/checkout" && "$work/fresh/bin/python" -c "import regdrop_ext" 2>&1)
set -e
tail -n 1 <<< "$message"
grep -q "without the compiled library" <<< "$message" || fail "no explanation"
! grep -q "circular import" <<< "$message" || fail "circular-import error"

step "beside another torch release, the import says what to rebuild"
if [ -n "${OTHER_TORCH_PYTHON:-}" ] && [ -x "$OTHER_TORCH_PYTHON" ]; then
  "$OTHER_TORCH_PYTHON" -m pip install --dry-run "$wheel" 2>&1 | quiet | tee "$work/other-dry-run.log" | grep 'Would install' || true
  ! grep -q 'Would install.* torch-' "$work/other-dry-run.log" || fail "installing the wheel beside torch $("$OTHER_TORCH_PYTHON" -c 'import torch; print(torch.__version__)') would change it"
  "$OTHER_TORCH_PYTHON" -m pip install --quiet --no-deps --target "$work/other" "$wheel" 2>&1 | quiet
  set +e
  message=$(cd "$work" && PYTHONPATH="$work/other" "$OTHER_TORCH_PYTHON" -c "import regdrop_ext" 2>&1)
  set -e
  tail -n 2 <<< "$message"
  grep -q "compiled against torch $built_torch" <<< "$message" || fail "no version explanation"
  ! grep -q "undefined symbol" <<< "$message" || fail "undefined symbol"
else
  echo "skipped: OTHER_TORCH_PYTHON is not set to an interpreter with another torch"
fi

step "a CUDA torch whose nvcc has no toolkit headers stops at once"
if [ -n "${OTHER_TORCH_PYTHON:-}" ] && "$OTHER_TORCH_PYTHON" -c 'import sys, torch, setuptools; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
  mkdir -p "$work/fake-cuda/bin" "$work/fake-cuda/include" "$work/fake-bin"
  # A wrapper away from its toolkit, as /usr/local/bin/nvcc may be; the toolkit lacks its headers.
  printf '#!/bin/sh\necho "#$ TOP=%s/bin/.." >&2\n' "$work/fake-cuda" > "$work/fake-bin/nvcc"
  chmod +x "$work/fake-bin/nvcc"
  begin=$SECONDS
  set +e
  (cd "$work/checkout" && env -u CUDA_HOME -u CUDA_PATH -u REGDROP_CUDA PATH="$work/fake-bin:$PATH" \
    timeout 300 "$OTHER_TORCH_PYTHON" -m pip install --no-build-isolation --no-deps --target "$work/cuda-target" . > "$work/cuda.log" 2>&1)
  status=$?
  set -e
  quiet < "$work/cuda.log" | grep -A 6 'regdrop_ext: torch' || true
  echo "exit status $status after $((SECONDS - begin)) s"
  [ "$status" -ne 0 ] || fail "the build went on without a CUDA toolkit"
  [ $((SECONDS - begin)) -le 60 ] || fail "took more than 60 s to stop"
  grep -q 'CUDA_HOME=/path/to/cuda' "$work/cuda.log" && grep -q 'REGDROP_CUDA=0' "$work/cuda.log" || fail "the message names neither CUDA_HOME nor REGDROP_CUDA=0"
  [ -z "$(find "$work/checkout" -name '*.o' -print -quit)" ] || fail "something was compiled"
else
  echo "skipped: OTHER_TORCH_PYTHON (${OTHER_TORCH_PYTHON:-unset}) is not an interpreter with a CUDA torch and setuptools"
fi

step "done"
