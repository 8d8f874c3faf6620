import pytest
import torch

import regdrop_ext  # noqa: F401  (registers torch.ops.regdrop)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# CUDA cases exist only where a GPU does: a machine without one runs (and
# reports) the CPU cases alone.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _explicitly_parametrized(metafunc, name):
    return any(
        name in [n.strip() for n in str(mark.args[0]).split(",")]
        for mark in metafunc.definition.iter_markers("parametrize")
    )


def pytest_generate_tests(metafunc):
    # Every test body is written once and runs per device and per dtype,
    # unless it lists its own devices or dtypes.
    if "device" in metafunc.fixturenames and not _explicitly_parametrized(metafunc, "device"):
        metafunc.parametrize("device", DEVICES)
    # A module whose logic does not depend on the dtype (only its rounding
    # does) lists fewer in TEST_DTYPES.
    if "dtype" in metafunc.fixturenames and not _explicitly_parametrized(metafunc, "dtype"):
        dtypes = getattr(metafunc.module, "TEST_DTYPES", DTYPES)
        metafunc.parametrize("dtype", dtypes, ids=lambda d: str(d).replace("torch.", ""))


def pytest_collection_modifyitems(items):
    # Tests marked slow (seconds each: huge tensors, other processes,
    # compilers) go first. pytest-xdist hands tests out in this order, so
    # the two workers share the long ones and end together, instead of one
    # finishing a long test alone at the end. A stable sort: the rest keep
    # their order.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
