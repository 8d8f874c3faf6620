"""What a new user meets when the build or the import goes wrong: setup.py
without torch, a _C built against another torch, a source tree without _C.

The install paths themselves (build-isolated `pip install .`, a wheel in a
fresh venv, another torch release) need venvs and run in .ci/packaging_check.sh.
"""

import importlib.metadata
import re
import runpy
import shutil
import subprocess
import sys
import time
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


# --- setup.py: the CUDA toolkit, found before anything compiles ------------------------


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's functions, without running setup()."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="setup_py_under_test")


def toolkit(root: Path, header: bool) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    if header:
        (root / "include" / "cuda_runtime_api.h").write_text("/* fake */\n")
    return root


def nvcc_wrapper(folder: Path, top: Path) -> Path:
    """A wrapper script named nvcc, away from its toolkit (as /usr/local/bin/nvcc
    execs /usr/local/cuda-13.0/bin/nvcc), answering --dryrun as nvcc does."""
    folder.mkdir()
    script = folder / "nvcc"
    script.write_text(f'#!/bin/sh\necho "#$ _HERE_={top}/bin" >&2\necho "#$ TOP={top}/bin/.." >&2\n')
    script.chmod(0o755)
    return folder


def test_cuda_home_is_taken_when_it_has_the_headers(setup_py, tmp_path):
    home = toolkit(tmp_path / "cuda", header=True)
    assert setup_py["find_cuda_toolkit"]({"CUDA_HOME": str(home), "PATH": ""}) == str(home)


def test_the_nvcc_on_path_is_asked_where_its_toolkit_is(setup_py, tmp_path):
    home = toolkit(tmp_path / "cuda-13.0", header=True)
    path = nvcc_wrapper(tmp_path / "bin", home)
    # torch would guess dirname(dirname(nvcc)), the folder above the wrapper, which has no headers.
    assert setup_py["find_cuda_toolkit"]({"PATH": str(path)}, fallback=str(tmp_path / "none")) == str(home)


@pytest.mark.parametrize("where", ["CUDA_HOME", "nvcc", "nothing"])
def test_no_toolkit_stops_at_once_naming_cuda_home_and_a_cpu_only_build(setup_py, tmp_path, where):
    empty = toolkit(tmp_path / "cuda", header=False)
    environ = {
        "CUDA_HOME": {"CUDA_HOME": str(empty), "PATH": ""},
        "nvcc": {"PATH": str(nvcc_wrapper(tmp_path / "bin", empty))},
        "nothing": {"PATH": str(tmp_path)},
    }[where]
    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        setup_py["cuda_toolkit_to_build_with"](environ, torch_cuda="13.0", fallback=str(tmp_path / "none"))
    assert time.monotonic() - start < 10
    message = str(stop.value)
    assert "no CUDA toolkit with include/cuda_runtime_api.h was found" in message
    assert "CUDA_HOME=/path/to/cuda pip install" in message and "REGDROP_CUDA=0 pip install" in message
    assert {"CUDA_HOME": f"CUDA_HOME={empty}", "nvcc": f"TOP={empty}", "nothing": "no nvcc on PATH"}[where] in message


def test_a_cpu_only_build_looks_for_no_toolkit(setup_py):
    assert setup_py["cuda_toolkit_to_build_with"]({"REGDROP_CUDA": "0"}, torch_cuda="13.0") is None
    assert setup_py["cuda_toolkit_to_build_with"]({}, torch_cuda=None) is None
    with pytest.raises(SystemExit, match="REGDROP_CUDA=1 needs a CUDA build of torch"):
        setup_py["cuda_toolkit_to_build_with"]({"REGDROP_CUDA": "1"}, torch_cuda=None)


# --- the version names its torch; the requirement never replaces yours ----------------------


@pytest.mark.parametrize(
    "cuda, torch_version, expected",
    [(None, "2.13.0+cpu", "0.1.0+torch2.13.0cpu"), ("13.0", "2.14.1+cu130", "0.1.0+torch2.14.1cu130"), (None, "2.14.1", "0.1.0+torch2.14.1cpu")],
)
def test_the_wheel_version_names_its_torch_in_a_pep440_local_label(setup_py, cuda, torch_version, expected):
    version = setup_py["wheel_version"](cuda, torch_version)
    assert version == expected
    assert re.fullmatch(r"\d+(\.\d+)*\+[a-z0-9]+(\.[a-z0-9]+)*", version)  # PEP 440 local version


def test_version_py_typed_and_requirement_of_this_install():
    assert regdrop_ext.__version__ == importlib.metadata.version("regdrop_ext")
    assert regdrop_ext.__version__.startswith("0.1.0+torch" + torch.__version__.split("+")[0])
    assert (Path(regdrop_ext.__file__).parent / "py.typed").is_file()
    requirements = importlib.metadata.requires("regdrop_ext")
    assert "torch" in requirements  # any torch: pip never replaces the installed one for it
