"""Each example runs to the end in its quick mode."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_python

pytestmark = pytest.mark.slow  # other processes: started first (conftest.py)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def succeeded(result) -> str:
    assert result.returncode == 0, f"exit code {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def run_example(name: str) -> str:
    """`python examples/NAME --quick` from the repository root."""
    return succeeded(run_python(str(EXAMPLES / name), "--quick", cwd=EXAMPLES.parent))


def test_convert_vit_block():
    out = run_example("convert_vit_block.py")
    # 8 dropout layers, and 4 drop paths where timm is usable: each draws once per forward.
    replaced = int(re.search(r"^replaced (\d+), left alone 0$", out, re.M).group(1))
    assert replaced in (8, 12), out
    assert f"one forward: {replaced} random ops, {replaced} by regdrop_ext, 0 native" in out
    assert "eval outputs identical, state_dict unchanged" in out


def test_mc_regression_writes_its_plot_into_a_temporary_directory(tmp_path):
    """Run from an empty directory without --out: the plot goes elsewhere, and the directory stays empty."""
    out = succeeded(run_python(str(EXAMPLES / "mc_regression.py"), "--quick", cwd=tmp_path))
    assert "mean" in out and "std" in out
    assert list(tmp_path.iterdir()) == []
    pytest.importorskip("matplotlib", reason="no plot without matplotlib")
    plot = Path(re.search(r"^plot written to (.*)$", out, re.M).group(1))
    assert plot.stat().st_size > 0
    shutil.rmtree(plot.parent)


def test_ddp_train_on_two_processes():
    # --standalone: a rendezvous on localhost with a free port. The launcher
    # starts its ranks as fresh interpreters, as users run it.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(EXAMPLES / "ddp_train.py"), "--quick"]  # fmt: skip
    out = succeeded(subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=EXAMPLES.parent))
    assert "parameters in sync: True" in out
    losses = [float(v) for v in re.findall(r"^step +\d+  loss (\d+\.\d+)$", out, re.M)]
    assert len(losses) >= 2 and losses[-1] < 0.5 * losses[0], out  # it trains: 0.44 -> 0.13 when written
    assert "own masks identical across ranks: False" in out
    assert "shared masks identical across ranks: True" in out


def test_tensor_parallel_on_two_processes():
    out = run_example("tensor_parallel.py")  # spawns its two processes
    assert len(re.findall(r"^step \d+  loss \d+\.\d+$", out, re.M)) == 4, out
    assert "2 ranks; losses as the same block's on one process: True" in out
    assert re.search(r"median of 10: regdrop_ext [\d.]+ ms, torch.nn.Dropout [\d.]+ ms, ratio [\d.]+ \(>1: regdrop_ext faster\)$", out, re.M), out
