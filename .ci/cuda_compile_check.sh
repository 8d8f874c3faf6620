#!/usr/bin/env bash
# Builds the extension with CUDA forced, for sm_80 and sm_90, against a CUDA
# 13.0 build of torch and the nvcc on PATH, then checks that every regdrop op
# has a CUDA kernel, and runs the machine-code gate (.ci/sass_gate.py) on the
# code of both architectures. Nothing CUDA runs: this machine has no GPU. A
# .cu that does not compile, or whose kernels spill, call slow paths,
# contract a multiply and an add, flush subnormals, lack 128-bit accesses or
# issue too slowly for the bandwidth, fails here. Then:
#   * the kernels alone, built with -use_fast_math (--fmad=true, --ftz=true
#     and more): still no contraction and no flushing, so CPU/CUDA parity
#     does not rest on setup.py's flags;
#   * a probe that contracts when nvcc may (.ci/contraction_probe.cu): with
#     --fmad=true the gate must refuse it, for FFMA, DFMA and HFMA2 on both
#     architectures and for nothing else; with --fmad=false it must pass.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_CUDA=${TORCH_CUDA:-torch==2.14.1}
# The venv is cached between runs (torch alone is 5 GB); the build is not.
venv=${REGDROP_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/regdrop_ext/venv-${TORCH_CUDA//[^a-zA-Z0-9.]/_}}
if ! "$venv/bin/python" -c "import torch, ninja, numpy" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "$TORCH_CUDA" ninja numpy setuptools wheel
fi

command -v nvcc >/dev/null || { echo "nvcc not on PATH"; exit 1; }
# nvcc may be a wrapper script; ask it where its toolkit is.
CUDA_HOME=$(cd "$(nvcc --dryrun -c /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p')" && pwd)
site=$("$venv/bin/python" -c "import site; print(site.getsitepackages()[0])")
export CUDA_HOME TORCH_CUDA_ARCH_LIST="8.0;9.0" REGDROP_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}
# cuBLAS/cuSPARSE/cuRAND headers come from torch's nvidia wheels, not the toolkit.
export CPATH="$site/nvidia/cu13/include${CPATH:+:$CPATH}"
echo "CUDA_HOME=$CUDA_HOME torch: $("$venv/bin/python" -c 'import torch; print(torch.__version__, torch.version.cuda)')"

# Build a wheel from a copy, so this tree's editable CPU build is left alone.
source .ci/scratch.sh
work=$(scratch_dir)
trap 'rm -rf "$work"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$work"
(cd "$work" && "$venv/bin/pip" install --quiet --no-build-isolation --no-deps --target "$work/site" .)

(cd "$work/site" && PYTHONPATH="$work/site" "$venv/bin/python" - <<'PY'
import torch
import regdrop_ext  # loads the CUDA-enabled library
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("regdrop::"))
missing = [n for n in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")]
print(f"{len(ops)} ops, CUDA kernels missing for: {missing or 'none'}")
assert ops and not missing, missing
PY
)

# The toolkit has no cuobjdump; the triton wheel beside torch ships one. The
# gate reads object files as it reads libraries; nvcc runs as torch's builder
# runs it (through the compile cache in CI), which caches a -c compile only.
nvcc_c() { ${PYTORCH_NVCC:-nvcc} -c "$@"; }
gate() { "$venv/bin/python" .ci/sass_gate.py --cuobjdump "$site/triton/backends/nvidia/bin/cuobjdump" "$@"; }
archs=(-gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 --threads 0)
echo "== machine-code gate (sm_80, sm_90)"
gate "$(ls "$work"/site/regdrop_ext/_C*.so)" --require sm_80,sm_90

echo "== the kernels built with -use_fast_math: no contraction, no flushing"
for cu in kernels norm_kernels; do
  nvcc_c "${archs[@]}" -O3 -use_fast_math -std=c++17 -Icsrc -o "$work/$cu.fast_math.o" "csrc/cuda/$cu.cu"
  gate "$work/$cu.fast_math.o" --require sm_80,sm_90 --checks contraction
done

echo "== the gate refuses a contracting probe built with --fmad=true, and only that"
nvcc_c "${archs[@]}" -O3 --fmad=true -o "$work/probe.o" .ci/contraction_probe.cu
if gate "$work/probe.o" --checks contraction > "$work/probe.log"; then
  cat "$work/probe.log"; echo "the gate passed a contracting build"; exit 1
fi
cat "$work/probe.log"
refused=$(grep -cE '^  sm_(80|90) probe_(float|double|half2)\(.*\): (FFMA|DFMA|HFMA2)[A-Z0-9.]* .*\(a contracted multiply-add\)$' "$work/probe.log")
failures=$(sed -n '/^FAILED:/,$p' "$work/probe.log" | grep -c '^  ')
[ "$refused" -eq 6 ] && [ "$failures" -eq 6 ] || { echo "expected exactly 6 contractions refused, got $refused of $failures"; exit 1; }
nvcc_c "${archs[@]}" -O3 --fmad=false -o "$work/probe.o" .ci/contraction_probe.cu
gate "$work/probe.o" --checks contraction
