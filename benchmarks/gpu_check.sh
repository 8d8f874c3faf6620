#!/usr/bin/env bash
# The GPU acceptance run, unattended, on an H100/H200 machine that has torch,
# triton, nvcc, pytest and hypothesis but no package registry. It fits an
# 8-minute window: the steps run in order of value, each under a timeout cut
# to what is left of BUDGET_S (default 470 s), and each writes to OUT as it
# goes, so that a run cut short keeps everything before the cut:
#   1. build the extension for sm_90 (cached: objects stay in build/);
#   2. every CUDA kernel, launched at least once and compared with the CPU
#      kernels bit for bit (the test make test runs on the emulated kernels);
#   3. CUDA graphs: draws captured in one graph against eager draws, and the
#      graph tests of test_cuda.py;
#   4. compute-sanitizer memcheck, racecheck and initcheck over step 2;
#   5. the bandwidth gate: every op's forward and backward at 128M elements
#      (bf16, fp32) at 85% or more of a same-size copy timed in the same run;
#   6. the rest of the suite: its CUDA cases first, then everything else.
# OUT (default gpu-check/) receives summary.txt (a line per step: status,
# seconds), a log per step and cuda.json. Exits 1 if any step failed or was
# cut short.
#
#   OUT=$OUT bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
deadline=$((SECONDS + ${BUDGET_S:-470}))
failed=0

# step NAME CAP_S COMMAND...: runs COMMAND for at most CAP_S seconds, and no
# later than the deadline; its output goes to OUT/NAME.log as it runs, its
# status and duration to OUT/summary.txt. rc 124: cut short by the timeout.
step() {
  local name=$1 cap=$2
  shift 2
  local left=$((deadline - SECONDS)) start=$SECONDS rc
  ((cap > left)) && cap=$left
  if ((cap < 10)); then
    printf '%-22s skipped: no time left\n' "$name" | tee -a "$OUT/summary.txt"
    failed=1
    return
  fi
  echo "== $name (at most ${cap}s): $*" >> "$OUT/$name.log"
  timeout --signal=INT --kill-after=15 "$cap" "$@" >> "$OUT/$name.log" 2>&1
  rc=$?
  printf '%-22s rc=%-3d %4ds\n' "$name" "$rc" $((SECONDS - start)) | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || failed=1
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >> "$OUT/summary.txt" 2>&1
# Without a GPU every CUDA test would skip, and pass.
python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null ||
  { echo "no CUDA GPU visible to torch" | tee -a "$OUT/summary.txt"; exit 1; }

pytest=(python -m pytest -p no:cacheprovider -v)
every_kernel="tests/test_cuda_emulation.py::test_every_cuda_kernel_matches_the_cpu[cuda]"

step 1-build 240 env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 REGDROP_CUDA=1 \
  python -m pip install --no-build-isolation --no-deps -e .
step 2-every-kernel 90 "${pytest[@]}" "$every_kernel"
step 3-cuda-graphs 90 "${pytest[@]}" \
  "tests/test_cuda_emulation.py::test_draws_in_one_captured_graph_read_their_own_streams[cuda]" \
  tests/test_cuda.py -k "graph and not compile"
# The caching allocator is off, so that an access past a tensor leaves its
# allocation.
for tool in memcheck racecheck initcheck; do
  step "4-sanitizer-$tool" 90 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    compute-sanitizer --tool "$tool" --error-exitcode 1 "${pytest[@]}" "$every_kernel"
done
step 5-bandwidth-gate 120 bash -c "python benchmarks/bench.py --device cuda --sizes 128M --dtypes bf16,fp32 \
  --impls raw,module --json '$OUT/cuda.json' && python benchmarks/bandwidth_gate.py '$OUT/cuda.json' --min-pct 85"
# The suite's CUDA cases (their ids, or their file's name, say cuda), then
# the rest but what ran above; the torch.compile and huge-tensor tests, the
# slowest, last.
step 6-suite-cuda 600 "${pytest[@]}" tests -k "cuda and not compile" \
  --ignore tests/test_cuda_emulation.py --ignore tests/test_huge.py
step 6-suite-rest 600 "${pytest[@]}" tests -k "not cuda or emulation" --deselect "$every_kernel" \
  --deselect "tests/test_cuda_emulation.py::test_draws_in_one_captured_graph_read_their_own_streams[cuda]" \
  --ignore tests/test_huge.py --ignore tests/test_compile.py
step 6-suite-slow 600 "${pytest[@]}" tests/test_compile.py tests/test_huge.py \
  tests/test_cuda.py::test_compile_reduce_overhead_draws_new_masks

exit $failed
