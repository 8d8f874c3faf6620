"""convert on real models built from their configs (examples/real_models.py
--quick): with functional=True and attention="math", no random op of a
training forward is left native, while the layers alone leave some; eval
outputs stay bit-identical. Hugging Face's run in `make test`; timm's and
torchvision's where they import (the "real models" step of .ci/run)."""

import re
from pathlib import Path

import pytest

from helpers import run_python
from third_party import import_or_skip

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "real_models.py"
ROW = re.compile(r"^(?P<name>.+?) \| (?P<original>\d+)/(?P<total>\d+), (?P<layers>\d+), (?P<functional>\d+) \| (?P<identical>\w+)")
# Models whose every random op is a layer: converting the layers leaves nothing native.
ALL_LAYERS = {"timm ConvNeXt-T", "torchvision EfficientNet-B0", "torchvision ConvNeXt-T"}


@pytest.mark.slow
@pytest.mark.parametrize("package, prefix, models", [("transformers", "HF", 4), ("timm", "timm", 4), ("torchvision", "torchvision", 4)])
def test_no_native_random_op_is_left_with_the_opt_in(package, prefix, models):
    import_or_skip(package)
    result = run_python(str(EXAMPLE), "--quick", "--steps", "0", "--only", prefix, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [match.groupdict() for match in map(ROW.match, result.stdout.splitlines()) if match]
    assert len(rows) == models, result.stdout
    for row in rows:
        original, layers, functional = int(row["original"]), int(row["layers"]), int(row["functional"])
        assert original == int(row["total"]) > 0, row  # every random op is torch's before
        assert functional == 0, row
        assert (layers == 0) if row["name"] in ALL_LAYERS else (0 < layers < original), row
        assert row["identical"] == "True", row
