#!/usr/bin/env bash
# The GPU acceptance run, unattended, on an H100/H200 machine that has torch,
# triton, nvcc, pytest, hypothesis and matplotlib but no package registry
# (about 8 minutes):
#   1. build the extension for sm_90;
#   2. run the whole test suite, CUDA cases included;
#   3. run compute-sanitizer (memcheck, racecheck, initcheck) over CUDA tests
#      that reach every kernel;
#   4. run the benchmark at full sizes, native measured in the same run, and
#      its bandwidth gate: every op's full-size forward and backward at 85% or
#      more of a same-size copy timed in that run (benchmarks/bandwidth_gate.py).
# Everything goes to OUT (default: gpu-check/), in at most 8 files:
# summary.txt, build.log, tests.log, sanitizers.log, bench.log, cuda.json,
# cuda.png and cuda-compile.json. Exits 1 if any step failed; every step runs.
#
#   OUT=$OUT bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
failed=0

# step NAME LOG COMMAND...: runs COMMAND, appends its output to OUT/LOG and
# its status and duration to OUT/summary.txt.
step() {
  local name=$1 log=$2
  shift 2
  local start=$SECONDS
  echo "== $name: $*" >> "$OUT/$log"
  "$@" >> "$OUT/$log" 2>&1
  local rc=$?
  printf '%-20s rc=%d %5ds\n' "$name" "$rc" $((SECONDS - start)) | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || failed=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/summary.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/summary.txt" 2>&1

step build build.log env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 REGDROP_CUDA=1 \
  python -m pip install --no-build-isolation --no-deps -e .
step tests tests.log python -m pytest -q -p no:cacheprovider tests

# Every CUDA kernel: drawing (element and unit masks, every epilogue, low
# memory), reading (element and unit masks), 128-bit and scalar paths, the
# bias gradient and its row sums. Small sizes: the tools are slow. The caching
# allocator is off, so that an access past a tensor leaves its allocation.
sanitized_tests=(
  "tests/test_cuda.py::test_masks_and_outputs_match_the_cpu_across_launch_shapes"
  "tests/test_cuda.py::test_misaligned_inputs_fall_back_from_vector_loads"
  "tests/test_cuda.py::test_bias_gradient_matches_the_cpu_bit_for_bit"
  "tests/test_variants.py::test_cpu_and_cuda_agree_for_every_op"
  "tests/test_cuda_emulation.py::test_emulation_agrees_with_the_gpu"
)
for tool in memcheck racecheck initcheck; do
  step "sanitizer-$tool" sanitizers.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool "$tool" --error-exitcode 1 \
    python -m pytest -q -p no:cacheprovider -k "not 4194307 and not 65603" "${sanitized_tests[@]}"
done

# torch.compile recompiles for every size and dtype: it gets its own run at
# the anchor size.
step bench bench.log python benchmarks/bench.py --device cuda --e2e \
  --impls eager,aten,module,low_memory,raw --json "$OUT/cuda.json" --plot "$OUT/cuda.png"
step bandwidth-gate bench.log python benchmarks/bandwidth_gate.py "$OUT/cuda.json" --min-pct 85
step bench-compile bench.log python benchmarks/bench.py --device cuda --ops dropout,dropout_add \
  --impls eager,compile,module --sizes 128M --dtypes bf16,fp32 --json "$OUT/cuda-compile.json"

exit $failed
