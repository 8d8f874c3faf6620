#!/usr/bin/env bash
# The tests that use real timm, torchvision and transformers classes, built
# from their configs (nothing is downloaded at run time): conversion, the
# random ops left native with and without convert's functional/attention
# opt-in, Monte Carlo dropout on their outputs, tracing, TorchScript.
#
# torchvision's PyPI wheels are CUDA builds: they import beside the CUDA torch
# of the CUDA compile check's cached venv (torch 2.14.1 with torchvision
# 0.29.1, on a machine without a GPU), not beside the CPU torch of `make test`.
# So this step makes an overlay venv that sees the cached venv's packages
# through a .pth file (the cached venv itself is left as it was), installs
# torchvision==0.29.1, timm and transformers into it, builds regdrop_ext
# CPU-only in a copy of the tree, and runs the tests there. The overlay is
# cached beside the cached venv, as that one is. A test that skips because
# one of these packages does not import fails the step.
#   REGDROP_CUDA_VENV  the cached venv (default: as .ci/cuda_compile_check.sh makes it)
#   MODELS_VENV        the overlay (default: venv-real-models beside REGDROP_CUDA_VENV)
#   KEEP               a folder to build in and keep (default: a temporary one, removed)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${REGDROP_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/regdrop_ext/venv-torch__2.14.1}
"$venv/bin/python" -c "import torch, ninja" || { echo "no torch venv at $venv: .ci/cuda_compile_check.sh makes it"; exit 1; }
start=$SECONDS
step() { printf '\n== %s (%ds)\n' "$1" $((SECONDS - start)); }
quiet() { grep -v '^WARNING: Location' || true; }

if [ -n "${KEEP:-}" ]; then
  work=$KEEP
  rm -rf "$work/checkout"
  mkdir -p "$work"
else
  source "$repo/.ci/scratch.sh"
  work=$(scratch_dir)
  trap 'rm -rf "$work"' EXIT
fi

overlay=${MODELS_VENV:-$(dirname "$venv")/venv-real-models}
step "overlay venv on $venv: torchvision==0.29.1, timm, transformers ($overlay)"
if ! "$overlay/bin/python" -c "import torchvision, timm, transformers, pytest, xdist, hypothesis" 2>/dev/null; then
  rm -rf "$overlay"
  python3 -m venv "$overlay"
  base_site=$("$venv/bin/python" -c "import site; print(site.getsitepackages()[0])")
  site=$("$overlay/bin/python" -c "import site; print(site.getsitepackages()[0])")
  echo "$base_site" > "$site/cached_venv.pth"
  "$overlay/bin/pip" install --quiet "torchvision==0.29.1" timm transformers pytest pytest-xdist hypothesis setuptools wheel 2>&1 | quiet
fi
"$overlay/bin/python" -c "import torch, torchvision, timm, transformers; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"

step "regdrop_ext built CPU-only against that torch, in a copy of the tree"
mkdir "$work/checkout"
(cd "$repo" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$work/checkout")
(cd "$work/checkout" && PATH="$overlay/bin:$venv/bin:$PATH" REGDROP_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
  "$overlay/bin/pip" install --quiet --no-build-isolation --no-deps -e . 2>&1 | quiet)

step "the tests, with the real classes"
cd "$work/checkout"
"$overlay/bin/python" -m pytest -q -n 2 -rs -p no:cacheprovider tests/test_real_models.py tests/test_convert.py \
  tests/test_trace.py tests/test_mc.py tests/test_torchscript.py | tee "$work/pytest.log"
! grep -q "is not usable here" "$work/pytest.log" || { echo "FAIL: a real-model test skipped"; exit 1; }

step "done"
