"""timm, torchvision and transformers, for the tests that use them where they work.

An installed package can still fail to import: torchvision wheels built for
CUDA raise RuntimeError beside a CPU torch (and timm imports torchvision).
pytest.importorskip catches only ImportError, so such a package would fail
the tests instead of skipping them.
"""

import importlib

import pytest


def import_or_skip(name: str):
    """The module ``name``, or skip the test, saying why it is not usable."""
    try:
        return importlib.import_module(name)
    except Exception as error:
        pytest.skip(f"{name} is not usable here: {type(error).__name__}: {error}")
