"""A third-party package that is installed but fails to import (a CUDA
torchvision beside a CPU torch raises RuntimeError) skips the tests that
need it and leaves the examples running, as a missing one does."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from third_party import import_or_skip

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def broken_timm(tmp_path):
    """A ``timm`` on the path whose import raises as a broken torchvision makes it raise."""
    package = tmp_path / "timm"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n"
    )
    return tmp_path


def test_a_broken_package_skips_the_test(broken_timm, monkeypatch):
    monkeypatch.syspath_prepend(str(broken_timm))
    monkeypatch.delitem(sys.modules, "timm", raising=False)
    with pytest.raises(pytest.skip.Exception, match="timm.layers is not usable here: RuntimeError: operator torchvision::nms"):
        import_or_skip("timm.layers")


def test_a_missing_package_skips_the_test():
    with pytest.raises(pytest.skip.Exception, match="ModuleNotFoundError"):
        import_or_skip("a_package_that_is_not_installed")


@pytest.mark.slow
def test_the_vit_example_runs_beside_a_broken_timm(broken_timm):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(broken_timm), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "convert_vit_block.py"), "--quick"],
        capture_output=True, text=True, timeout=300, env=env, cwd=EXAMPLES.parent,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "timm is not usable here" in result.stdout
