"""timm, torchvision and transformers, for the tests that use them where they work.

An installed package can still fail to import: torchvision wheels built for
CUDA raise RuntimeError beside a CPU torch (and timm imports torchvision).
pytest.importorskip catches only ImportError, so such a package would fail
the tests instead of skipping them.

transformers is in the `test` extras and runs in `make test`. timm and
torchvision are in the `models` extras, which `make test` does not install
(torchvision pins its torch release, and its CUDA wheels need a CUDA torch):
their tests run in the "real models" step of .ci/run.
"""

import importlib

import pytest

WHERE = "the 'real models' step of .ci/run runs this test (torch 2.14.1, torchvision 0.29.1)"


def import_or_skip(name: str):
    """The module ``name``, or skip the test, saying why it is not usable and where it runs."""
    try:
        return importlib.import_module(name)
    except Exception as error:
        pytest.skip(f"{name} is not usable here: {type(error).__name__}: {error}; {WHERE}")
