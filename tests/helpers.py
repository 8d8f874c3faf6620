"""Helpers shared by the test modules (test modules never import each other)."""

import functools
import math
import os
from pathlib import Path

import torch


def nonzero_input(shape, dtype, device):
    """Values in [0.5, 1.5) with random signs: never 0, so a zero output means dropped."""
    x = torch.rand(shape, device=device) + 0.5
    sign = torch.randint(0, 2, shape, device=device) * 2 - 1
    return (x * sign).to(dtype)


def binomial_bounds(n, q, sigmas=5.0):
    """The range of a Binomial(n, q) count within `sigmas` standard deviations of its mean."""
    mean, sd = n * q, math.sqrt(n * q * (1 - q))
    return mean - sigmas * sd, mean + sigmas * sd


def in_place(name, x, *args, **kwargs):
    """The in-place op ``name`` on ``x``, with a mask to write: (x, mask)."""
    from regdrop_ext import manifest

    op = manifest.OPS[name]
    return op.op(x, op.new_mask(x), *args, **kwargs)


def call_op(op, x, p, residual=None, bias=None, **kwargs):
    """Forward op ``op`` (a regdrop_ext.manifest.Op) on ``x``: with the
    residual and bias it takes, and a mask to write if it is in place."""
    bound = {"input": x, "p": p, **kwargs}
    if op.residual:
        bound["residual"] = residual
    if op.bias:
        bound["bias"] = bias
    if op.variant == "in_place":
        bound["mask"] = op.new_mask(x)
    return op.call(bound)


def assert_rounded_once(result, terms):
    """``result`` is the column sums of ``terms`` (rows x columns) rounded
    once to its dtype: within half an ulp of result's dtype of the exact sum
    (taken in float64), plus what the accumulator (float32, float64 for
    float64) can lose over the additions, rows * its eps * the sum of
    magnitudes. A sum rounded twice (to the dtype along the way) or taken in
    the output's 16-bit type misses this bound."""
    terms = terms.double().reshape(-1, terms.shape[-1])
    exact_sum = terms.sum(0)
    accumulator = torch.float64 if result.dtype == torch.float64 else torch.float32
    lost = terms.shape[0] * torch.finfo(accumulator).eps * terms.abs().sum(0)
    _, exponent = torch.frexp(exact_sum + lost * torch.sign(exact_sum))
    half_ulp = torch.finfo(result.dtype).eps * torch.pow(2.0, exponent.double() - 2)
    error = (result.double() - exact_sum).abs()
    assert (error <= half_ulp + lost).all(), f"off by {(error - half_ulp - lost).max().item()} beyond one rounding"


def load_emulation():
    """The CUDA kernels' thread bodies built for the host (tests/cuda_emulation/),
    registered as torch.ops.regdrop_cuda_emulation; under REGDROP_SANITIZE=1
    (.ci/sanitize.sh) with ASan and UBSan. Built under this checkout's build/:
    the shared torch_extensions cache would let two checkouts of different
    versions overwrite each other's."""
    from torch.utils.cpp_extension import load

    root = Path(__file__).resolve().parents[1]
    # -O0: the emulation's tests take seconds at any level (7 s here against
    # 4 s at -O2), while -O2 doubles its build (74 s of compiler time against
    # 36 s), the longest step of a first `make test`. Its arithmetic is the
    # same at every level: no contraction, no fast-math.
    cflags, ldflags, name = ["-O0", "-ffp-contract=off"], [], "regdrop_cuda_emulation"
    if os.environ.get("REGDROP_SANITIZE") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        cflags, ldflags, name = cflags + sanitize + ["-g"], sanitize, name + "_sanitized"
    build_directory = root / "build" / name
    build_directory.mkdir(parents=True, exist_ok=True)
    load(
        name=name,
        build_directory=str(build_directory),
        sources=[str(root / "tests/cuda_emulation" / f) for f in ("emulated_backend.cpp", "emulated_norm.cpp")],
        extra_include_paths=[str(root / "csrc")],
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        is_python_module=False,
    )
    return torch.ops.regdrop_cuda_emulation


# What a forked process finds imported: each import costs seconds of CPU in a
# fresh interpreter here (torch alone about 3 s), so processes are forked from
# a server that has imported these once. The server itself never runs a
# kernel, so no child inherits threads from a fork.
PRELOADED = ["torch", "torch._dynamo", "regdrop_ext"]


def _forkserver(*modules: str):
    """multiprocessing's forkserver, preloading PRELOADED and `modules` when this
    call starts it (a server already running keeps what it has)."""
    import multiprocessing

    multiprocessing.set_forkserver_preload(PRELOADED + list(modules))
    return multiprocessing.get_context("forkserver")


def spawn_ranks(fn, args, nprocs: int) -> None:
    """torch.multiprocessing.spawn's processes, forked from the preloaded
    server (DTensor's paths import torch._dynamo on first use)."""
    import torch.multiprocessing as mp

    _forkserver(fn.__module__)
    mp.start_processes(fn, args=args, nprocs=nprocs, start_method="forkserver")


def run_python(*args: str, cwd=None, timeout: float = 300):
    """`subprocess.run([sys.executable, *args], capture_output=True, text=True,
    cwd=cwd)` for `-c CODE` and `SCRIPT ARG...`, run in a process forked from
    the preloaded server: the code runs in a fresh __main__ namespace, with
    the sys.path and sys.argv that `python` would give it, so a block that
    forgets an import still fails. Only modules already imported are shared,
    and the environment is the one the server started with."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as streams:
        out, err = os.path.join(streams, "stdout"), os.path.join(streams, "stderr")
        where = (str(cwd or os.getcwd()), _interpreter_path())
        child = _forkserver().Process(target=_run_main, args=(list(args), *where, out, err))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(args, timeout)
        with open(out) as stdout, open(err) as stderr:
            return subprocess.CompletedProcess(args, child.exitcode, stdout.read(), stderr.read())


@functools.cache
def _interpreter_path():
    """The sys.path of a bare `python -c` of this interpreter, without its '' entry."""
    import subprocess
    import sys

    listing = subprocess.run([sys.executable, "-c", "import sys; print(*sys.path[1:], sep=chr(10))"],
                             capture_output=True, text=True, check=True)
    return listing.stdout.splitlines()


def _run_main(args, cwd, base, out, err):
    import runpy
    import sys

    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    try:
        if args[0] == "-c":
            sys.argv, sys.path[:] = ["-c", *args[2:]], ["", *base]
            exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv, sys.path[:] = list(args), [os.path.dirname(os.path.abspath(args[0])), *base]
            runpy.run_path(args[0], run_name="__main__")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
