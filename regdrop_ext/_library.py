"""Loading the compiled library, ``_C``, or saying why it cannot be loaded.

``_C`` loads only into the torch it was compiled against: another version
fails with ``undefined symbol`` at best. setup.py writes ``_built_against.py``
beside ``_C``; the torch imported here is checked against it before ``_C`` is
loaded. The other way the import goes wrong is a ``regdrop_ext`` folder
without ``_C``: a source tree that was never built, or one that Python finds
first on ``sys.path`` (run from the checkout root) although regdrop_ext is
installed elsewhere.
"""

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Optional

import torch

PACKAGE_DIR = Path(__file__).resolve().parent


def load_compiled_library() -> None:
    """Import ``regdrop_ext._C`` (which registers ``torch.ops.regdrop``), or
    raise an ImportError that says what to do."""
    if importlib.util.find_spec("regdrop_ext._C") is None:
        raise ImportError(not_built_message(installed_library()))
    try:
        built = importlib.import_module("regdrop_ext._built_against")
    except ImportError:
        built = None  # built before setup.py recorded the torch; the load below tells
    if built is not None:
        mismatch = torch_mismatch(built.TORCH_VERSION, built.TORCH_CUDA, torch.__version__, torch.version.cuda)
        if mismatch:
            raise ImportError(f"{mismatch}\n{rebuild_advice(built.TORCH_VERSION)}")
    try:
        importlib.import_module("regdrop_ext._C")
    except (ImportError, OSError) as error:
        raise ImportError(
            f"regdrop_ext's compiled library failed to load with torch {torch.__version__}: {error}\n"
            f"{rebuild_advice()}"
        ) from error


def _release(version: str) -> str:
    return version.split("+")[0]


def torch_mismatch(built_version: str, built_cuda: Optional[str], version: str, cuda: Optional[str]) -> str:
    """Why a ``_C`` built against torch ``built_version`` (with CUDA kernels for
    ``built_cuda``, or None) cannot load into torch ``version`` (CUDA ``cuda``);
    "" if it can."""
    if _release(built_version) != _release(version):
        return (
            f"regdrop_ext was compiled against torch {built_version}, but torch {version} is "
            "installed: a C++ extension loads only into the torch release it was compiled against."
        )
    if built_cuda is not None and built_cuda != cuda:
        return (
            f"regdrop_ext was compiled with CUDA kernels for torch {built_version} (CUDA {built_cuda}), "
            f"but the installed torch {version} has {f'CUDA {cuda}' if cuda else 'no CUDA'}."
        )
    return ""


def _source_root() -> Optional[Path]:
    """The checkout this package lives in (editable install or source tree), if it is one."""
    root = PACKAGE_DIR.parent
    return root if (root / "setup.py").is_file() and (root / "csrc").is_dir() else None


def rebuild_advice(built_version: Optional[str] = None) -> str:
    root = _source_root()
    if root is not None:
        return (
            f"Rebuild it against this torch: cd {root} && pip install --no-build-isolation -e . "
            "(or `make setup`)."
        )
    return (
        "Rebuild it against this torch, from the regdrop_ext source: "
        "pip install --no-build-isolation --no-deps --force-reinstall <path to regdrop_ext>"
        + (f", or install torch {_release(built_version)}." if built_version else ".")
    )


def installed_library() -> Optional[Path]:
    """The ``_C`` of an installed regdrop_ext distribution outside this folder, if any."""
    try:
        files = importlib.metadata.distribution("regdrop_ext").files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.parent.name == "regdrop_ext" and file.name.startswith("_C."):
            path = Path(file.locate()).resolve()
            if path.is_file() and path.parent != PACKAGE_DIR:
                return path
    return None


def not_built_message(installed: Optional[Path]) -> str:
    if installed is not None:
        return (
            f"{PACKAGE_DIR} is regdrop_ext's source, without the compiled library (_C). Python "
            f"imported it instead of the installed regdrop_ext ({installed.parent}) because "
            f"{PACKAGE_DIR.parent} comes first on sys.path (Python puts the current directory, "
            "or the script's, there). "
            "Run Python from another directory, or build the source in place: "
            f"cd {PACKAGE_DIR.parent} && pip install --no-build-isolation -e ."
        )
    where = f"cd {PACKAGE_DIR.parent} && " if _source_root() else ""
    return (
        f"regdrop_ext at {PACKAGE_DIR} has no compiled library (_C): it was never built. "
        f"Build it against the installed torch: {where}pip install --no-build-isolation -e ."
    )
