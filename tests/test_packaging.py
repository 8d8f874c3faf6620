"""What a new user meets when the build or the import goes wrong: setup.py
without torch, a _C built against another torch, a source tree without _C.

The install paths themselves (build-isolated `pip install .`, a wheel in a
fresh venv, another torch release) need venvs and run in .ci/packaging_check.sh.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import regdrop_ext
from regdrop_ext import _library

ROOT = Path(__file__).resolve().parent.parent


def python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_setup_py_without_torch_stops_with_the_command_that_works():
    """What a build-isolated `pip install .` runs into: no torch in the build environment."""
    result = python(
        "-c", "import runpy, sys; sys.modules['torch'] = None; runpy.run_path('setup.py', run_name='__main__')",
        cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1
    assert "pip install --no-build-isolation ." in result.stderr
    assert "Traceback" not in result.stderr


def test_the_build_recorded_the_torch_it_was_compiled_against():
    from regdrop_ext import _built_against

    assert _built_against.TORCH_VERSION == torch.__version__
    assert _built_against.TORCH_CUDA in (None, torch.version.cuda)


@pytest.mark.parametrize(
    "built, built_cuda, running, cuda, expected",
    [
        ("2.13.0+cpu", None, "2.13.0+cpu", None, ""),
        ("2.13.0+cpu", None, "2.13.0+cu130", "13.0", ""),  # no CUDA kernels: loads into either build
        ("2.13.0+cu130", "13.0", "2.13.0+cu130", "13.0", ""),
        ("2.14.1+cu130", None, "2.13.0+cpu", None, "compiled against torch 2.14.1+cu130, but torch 2.13.0+cpu"),
        ("2.13.0+cu130", "13.0", "2.13.0+cpu", None, "has no CUDA"),
        ("2.13.0+cu130", "13.0", "2.13.0+cu128", "12.8", "has CUDA 12.8"),
    ],
)
def test_torch_mismatch(built, built_cuda, running, cuda, expected):
    message = _library.torch_mismatch(built, built_cuda, running, cuda)
    assert (expected in message) if expected else message == ""


def test_a_mismatch_says_how_to_rebuild(monkeypatch):
    monkeypatch.setattr(_library, "_source_root", lambda: None)  # as for an installed wheel
    advice = _library.rebuild_advice("2.14.1+cu130")
    assert "pip install --no-build-isolation" in advice and "install torch 2.14.1" in advice
    assert f"cd {ROOT} &&" not in advice
    monkeypatch.undo()
    assert f"cd {ROOT} && pip install --no-build-isolation -e ." in _library.rebuild_advice()


def test_a_source_tree_without_c_explains_itself_instead_of_a_circular_import(tmp_path):
    """Python run from a checkout that was never built: regdrop_ext is found, _C is not."""
    shutil.copytree(ROOT / "regdrop_ext", tmp_path / "regdrop_ext", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    # An editable install's import hook would find this checkout's _C for the copy.
    without_editable_hook = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]"
    result = python("-c", f"{without_editable_hook}; import regdrop_ext", cwd=tmp_path)
    assert result.returncode == 1
    assert "has no compiled library (_C)" in result.stderr, result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr
    assert "circular import" not in result.stderr


def test_the_installed_copy_is_named_when_the_source_shadows_it(tmp_path):
    message = _library.not_built_message(tmp_path / "site-packages" / "regdrop_ext" / "_C.so")
    assert "Python imported it instead of the installed regdrop_ext" in message
    assert str(tmp_path / "site-packages" / "regdrop_ext") in message
    assert "Run Python from another directory" in message


def test_the_package_loaded_its_own_library():
    assert Path(regdrop_ext.__file__).parent == _library.PACKAGE_DIR
    assert hasattr(torch.ops.regdrop, "dropout")
