"""The benchmark suite (benchmarks/): its quickest run writes well-formed
results in which every timed implementation passed its correctness check,
and the checks refuse wrong kernels. No timing is asserted."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

import regdrop_ext  # noqa: F401  (registers torch.ops.regdrop)

# The benchmarks package lives at the repository root, beside tests/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench, checks, report  # noqa: E402
from benchmarks.op_table import OPS, RawOp, make_operands, positive_like, shape_for  # noqa: E402
from benchmarks.results import PHASES  # noqa: E402
from benchmarks.runner import Settings, run  # noqa: E402

P = 0.1
REGISTERED = [op for op in OPS if not op.missing()]
OP_IDS = [op.name for op in REGISTERED]


def raw_call(op, size=1 << 16, dtype=torch.float32):
    """Operands, output, mask, grad and grads of the op's raw kernels on the CPU."""
    operands = make_operands(op.operands, shape_for(size, op.unit), dtype, "cpu")
    (raw,) = [impl for impl in op.implementations() if impl.variant == "raw"]
    call = raw.bind(operands, P)
    output, mask = call.forward()
    grad = positive_like(output)
    return operands, output, mask, grad, call.backward(output, mask, grad, retain=False)


def check_raw(op, operands, output, mask, grad, grads, p=P, quantized=True):
    units = checks.unit_count(output.shape, op.unit)
    checks.check(operands, output, checks.keep_from_bits(mask, units), grad, grads, p, quantized)


@pytest.mark.slow
def test_quickest_run_writes_checked_results(tmp_path):
    paths = {ext: str(tmp_path / f"results.{ext}") for ext in ("json", "csv", "png")}
    variants = "eager,aten,module,low_memory,raw"  # all but torch.compile, which takes seconds
    argv = ["--quick", "--device", "cpu", "--sizes", "4K", "--dtypes", "fp32", "--impls", variants]
    argv += ["--json", paths["json"], "--csv", paths["csv"], "--plot", paths["png"]]
    assert bench.main(argv) == 0

    with open(paths["json"]) as src:
        result = json.load(src)
    env = result["environment"]
    for key in ("device", "device_name", "torch", "regdrop_cuda_kernels", "cpu_capability", "threads", "date"):
        assert key in env
    assert env["torch"] == torch.__version__
    assert result["method"]["bytes_rule"] and result["method"]["p"] == P

    rows = result["rows"]
    assert {r["op"] for r in rows} == {"copy", *OP_IDS}
    for op in OP_IDS:
        mine = [r for r in rows if r["op"] == op]
        assert {r["phase"] for r in mine} == set(PHASES)
        assert {r["variant"] for r in mine} >= {"eager", "module", "raw"}
    for row in rows:
        assert row["check"] == {"ran": True, "passed": True, "error": None}, row
        assert row["time_ms"] is not None and row["bytes"] > 0 and row["gbps"] is not None
        if row["kind"] != "copy":
            assert row["pct_copy"] is not None and row["vs_eager"] is not None
            assert row["saved_bytes_per_element"] is not None

    e2e = result["e2e"]
    steps = e2e["config"]["steps"]
    assert all(len(losses) == steps for losses in e2e["losses"].values())
    assert isinstance(e2e["loss_test"]["alike"], bool)

    with open(paths["csv"]) as src:
        assert len(list(csv.DictReader(src))) == len(rows)
    assert Path(paths["png"]).stat().st_size > 0
    readme_table = report.markdown(report.read_json(paths["json"]))
    assert all(f"| {op} | forward | fp32 |" in readme_table for op in OP_IDS)


def test_every_committed_results_file_renders():
    """report.py renders each results file, op rows and norm rows alike, as
    its docstring's `report.py benchmarks/results/*.json` promises."""
    files = sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "results").glob("*.json"))
    assert files
    for path in files:
        text = report.render_file(str(path), None, None)
        assert text.count("\n|") >= 4, path


def test_anchor_size_has_the_anchor_shape():
    assert shape_for(134_217_728, "element") == (16, 2048, 4096)
    assert shape_for(134_217_728, "channel") == (16, 2048, 64, 64)
    assert shape_for(4096, "sample") == (1, 1, 4096)


@pytest.mark.parametrize("op", REGISTERED, ids=OP_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_check_accepts_the_kernels(op, dtype):
    check_raw(op, *raw_call(op, dtype=dtype))


@pytest.mark.parametrize("op", REGISTERED, ids=OP_IDS)
def test_check_refuses_a_corrupted_output(op):
    operands, output, mask, grad, grads = raw_call(op)
    output.view(-1)[-1] += 0.5  # the last element: a kernel that gets its tail wrong
    with pytest.raises(checks.CheckFailed, match="output"):
        check_raw(op, operands, output, mask, grad, grads)


@pytest.mark.parametrize("op", REGISTERED, ids=OP_IDS)
def test_check_refuses_a_mask_that_disagrees_with_the_output(op):
    operands, output, mask, grad, grads = raw_call(op)
    mask[0] ^= 1
    with pytest.raises(checks.CheckFailed, match="output"):
        check_raw(op, operands, output, mask, grad, grads)


@pytest.mark.parametrize("op", REGISTERED, ids=OP_IDS)
def test_check_refuses_a_corrupted_gradient(op):
    operands, output, mask, grad, grads = raw_call(op)
    grads["input"] = grads["input"].clone()
    grads["input"].view(-1)[0] += 1.0
    with pytest.raises(checks.CheckFailed, match="grad of input"):
        check_raw(op, operands, output, mask, grad, grads)


def test_check_refuses_a_wrong_scale():
    op = OPS[0]
    # Outputs scaled for p = 0.1, checked as p = 0.2: every kept element is off.
    with pytest.raises(checks.CheckFailed):
        check_raw(op, *raw_call(op), p=0.2)
    # regdrop's scale (p quantized to 2^-16 steps) is not PyTorch's 1 / (1 - p),
    # by 7e-6 at p = 0.1: more than four float32 epsilons.
    with pytest.raises(checks.CheckFailed):
        check_raw(op, *raw_call(op), quantized=False)


def test_a_mask_of_the_wrong_size_is_refused():
    with pytest.raises(checks.CheckFailed, match="mask"):
        checks.keep_from_bits(torch.zeros(3, dtype=torch.uint8), units=32)


def test_keep_rate_outside_5_sigma_is_refused():
    n = 1 << 16
    checks.assert_keep_rate(torch.rand(n) >= P, P)
    with pytest.raises(checks.CheckFailed, match="sigma"):
        checks.assert_keep_rate(torch.rand(n) >= 2 * P, P)


def test_a_wrong_kernel_gets_no_time():
    regdrop = torch.ops.regdrop

    def off_by_one_percent(x, p):
        output, mask = regdrop.dropout(x, p)
        return output * 1.01, mask

    wrong = RawOp("wrong dropout", "raw", off_by_one_percent, regdrop.dropout_backward, mask_bits=True)
    settings = Settings(torch.device("cpu"), [4096], [torch.float32], threads=1, p=P, budget_s=0.01)
    rows, _ = run(settings, [(OPS[0], [wrong])], tqdm(disable=True))
    refused = [r for r in rows if r.implementation == "wrong dropout"]
    assert len(refused) == len(PHASES)
    for row in refused:
        assert row.check.ran and not row.check.passed and row.failed
        assert "output" in row.check.error
        assert row.time_ms is None and row.gbps is None


def test_a_cells_implementations_are_timed_in_interleaved_rounds():
    """Each round times every implementation of the cell in turn; a row's
    time is its fastest round's median, its quartiles those of all runs."""
    regdrop, calls = torch.ops.regdrop, []

    def traced(label):
        def forward(x, p):
            calls.append(label)
            return regdrop.dropout(x, p)

        return RawOp(label, "raw", forward, regdrop.dropout_backward, mask_bits=True)

    settings = Settings(torch.device("cpu"), [4096], [torch.float32], threads=1, p=P, budget_s=0.02, rounds=3)
    rows, _ = run(settings, [(OPS[0], [traced("a"), traced("b")])], tqdm(disable=True))
    # The first call of each (untimed, checked), then per round a's phases and b's.
    order = [label for i, label in enumerate(calls) if i == 0 or calls[i - 1] != label]
    assert order == ["a", "b"] + ["a", "b"] * 3
    for row in (r for r in rows if r.implementation in "ab"):
        assert len(row.round_ms) == 3 and row.runs >= 3
        assert row.time_ms == min(row.round_ms) and row.q25_ms <= row.q75_ms


def _row(op, phase, variant, kind, pct, size=1 << 27):
    from benchmarks.results import Row

    return Row(op=op, phase=phase, implementation=variant, variant=variant, kind=kind, dtype="bf16", size=size,
               shape=[size], time_ms=1.0, pct_copy=pct)


def test_bandwidth_gate_judges_the_best_of_ours_at_the_largest_size():
    from benchmarks.bandwidth_gate import shortfalls

    rows = [
        _row("dropout", "forward", "raw", "ours", 97.0),
        _row("dropout", "forward", "module", "ours", 90.0),
        _row("dropout", "backward", "module", "ours", 88.0),
        _row("dropout", "backward", "low_memory", "ours", 20.0),  # reported elsewhere, not gated
        _row("dropout", "forward", "raw", "ours", 10.0, size=4096),  # small sizes are latency-bound
        _row("dropout", "forward", "eager", "eager", 40.0),
    ]
    assert shortfalls(rows, 85.0)[1] == []
    rows.append(_row("dropout_add", "backward", "raw", "ours", 84.9))
    failures = shortfalls(rows, 85.0)[1]
    assert len(failures) == 1 and failures[0].startswith("dropout_add backward bf16")
    assert shortfalls([_row("dropout", "forward", "eager", "eager", 99.0)], 85.0)[1], "nothing of ours judged"


def _timed(op, phase, variant, ms, size=1 << 16):
    from benchmarks.results import VARIANTS, Row

    return Row(op=op, phase=phase, implementation=f"{variant} route", variant=variant,
               kind=VARIANTS.get(variant, "copy"), dtype="fp32", size=size, shape=[size], time_ms=ms,
               bytes=8 * size, saved_bytes_per_element=0.125)


def test_native_check_judges_each_route_against_natives_called_the_same_way():
    from benchmarks.native_check import report, shortfalls

    rows = [
        _timed("dropout", "backward", "eager", 0.012),
        _timed("dropout", "backward", "compile", 0.020),
        _timed("dropout", "backward", "aten", 0.006),  # called directly: judged against raw only
        _timed("dropout", "backward", "module", 0.011),
        _timed("dropout", "backward", "raw", 0.003),
        _timed("dropout", "backward", "low_memory", 0.050),  # recomputes its mask by design: not judged
        _timed("drop_path", "forward", "eager", 0.010),
        _timed("drop_path", "forward", "module", 0.009),
        _timed("drop_path", "forward", "raw", 0.001),  # no direct native route: not judged
        _timed("copy", "forward", "copy", 0.0001),  # a reference, not a route
    ]
    lines, short = shortfalls(rows)
    assert short == [] and len(lines) == 3
    assert report(rows) == 0

    rows.append(_timed("drop_path", "forward", "compile", 0.0085))  # now the fastest native route
    rows.append(_timed("dropout", "backward", "raw", 0.007, size=1 << 24))
    rows.append(_timed("dropout", "backward", "aten", 0.0065, size=1 << 24))
    lines, short = shortfalls(rows)
    assert len(short) == 2
    assert short[0].startswith("drop_path forward fp32 64K: module route") and "compile route" in short[0]
    assert short[1].startswith("dropout backward fp32 16M: raw route") and "0.93x" in short[1]
    assert sum(line.endswith("SHORT") for line in lines) == 2
    assert report(rows) == 1
    assert shortfalls(rows, min_ratio=0.9)[1] == []
    assert shortfalls([_timed("dropout", "forward", "module", 1.0)])[1], "nothing judged is a failure"


def test_native_check_pairs_the_routes_round_by_round():
    """Each round's pair was timed back to back: ours is judged by the median
    of native / ours over the rounds, not by the two fastest rounds, which
    can come from different states of a shared machine."""
    from dataclasses import replace

    from benchmarks.native_check import shortfalls

    ours = replace(_timed("drop_path", "forward", "module", 0.9), round_ms=[1.5, 0.9, 1.0, 1.2, 1.1])
    native = replace(_timed("drop_path", "forward", "eager", 0.8), round_ms=[1.6, 1.0, 0.8, 1.3, 1.2])
    lines, short = shortfalls([ours, native])
    assert short == [] and "1.08x (round by round: ours ahead in 4 of 5)" in lines[0]  # by time: 0.89x
    native = replace(native, round_ms=[1.4, 0.8, 0.9, 1.1, 1.2])  # faster in 4 of 5 rounds
    lines, short = shortfalls([ours, native])
    assert len(short) == 1 and "0.92x (round by round: ours ahead in 1 of 5)" in short[0]


def test_native_check_places_a_short_row_against_what_bounds_it():
    """A row that falls short is set beside x.clone()'s pace in the same run
    (at 90% of it or more: the fresh-page floor) and, through autograd,
    beside the op called alone."""
    from dataclasses import replace

    from benchmarks.native_check import shortfalls

    def row(variant, ms, size=1 << 24):
        r = _timed("drop_path", "forward", variant, ms, size)
        return replace(r, gbps=r.bytes / (ms * 1e-3) / 1e9)

    clone = replace(row("clone", 50.0), op="copy", kind="copy")
    at_floor = [clone, row("eager", 48.0), row("module", 52.0), row("raw", 49.0)]
    short = shortfalls(at_floor)[1]
    assert len(short) == 1 and "[96% of x.clone()'s pace: at the fresh-page floor; the op alone 49 ms of the route's 52 ms]" in short[0]
    below = [clone, row("eager", 48.0), row("module", 60.0)]  # 83% of the clone's pace: not at the floor
    short = shortfalls(below)[1]
    assert len(short) == 1 and short[0].endswith("[83% of x.clone()'s pace]")
    assert shortfalls([row("eager", 48.0), row("module", 60.0)])[1][0].endswith("0.80x (by time)")  # nothing to place it by


def test_check_mode_measures_every_native_route_and_exits_with_the_verdict(monkeypatch):
    """--check's run: the sizes and routes it times, and its exit status
    following native_check's verdict (timings themselves are not asserted)."""
    seen = {}

    def fake_run(settings, runnable, progress):
        from benchmarks.results import derive

        seen["sizes"], seen["variants"] = settings.sizes, {i.variant for _, impls in runnable for i in impls}
        rows = [_timed("copy", "forward", "copy", 0.5), _timed("dropout", "forward", "eager", 1.0),
                _timed("dropout", "forward", "module", 2.0)]
        derive(rows)
        return rows, []

    monkeypatch.setattr(bench, "run", fake_run)
    assert bench.main(["--check", "--device", "cpu", "--ops", "dropout"]) == 1
    assert seen["sizes"] == [1 << 16, 1 << 24]
    assert seen["variants"] == {"eager", "compile", "aten", "module", "raw"}
