"""What a benchmark ran on: the device, the versions, the regdrop build, the
thread count and the date. Printed first and written into every results file."""

import datetime
import os
import platform
import sys

import torch

# glibc serves a large allocation from fresh pages (mmap) or from memory an
# earlier free left behind, and moves the line between the two as a process
# runs: the same op timed twice could differ 5x, depending on what ran
# before. Fixed thresholds turn that adaptation off, close to the state
# glibc settles into in a training loop (there the mmap threshold stops at
# 32 MiB, and tensors of 32 MiB and more are fresh pages): every output of
# 16 MiB and more (the 16M-element rows, whatever the dtype) is fresh pages,
# whose page faults every implementation pays, as x.clone() does; smaller
# ones (4K to 1M elements) reuse freed memory, as between the steps of a
# training loop. 16 MiB rather than 32: at exactly 32 MiB (16M bf16
# elements) glibc served some outputs from freed memory and others not.
PINNED_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(16 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


def pin_allocator() -> None:
    """Restart this process with PINNED_ALLOCATOR in its environment (glibc
    reads it at start-up), unless it is there already."""
    if all(os.environ.get(name) == value for name, value in PINNED_ALLOCATOR.items()):
        return
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **PINNED_ALLOCATOR})


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def describe(device: torch.device, threads: int) -> dict:
    cuda = device.type == "cuda"
    return {
        "device": device.type,
        "device_name": (
            torch.cuda.get_device_name(device)
            if cuda
            else f"{_cpu_name()}, {os.cpu_count()} logical cores"
        ),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "triton": _triton_version() if cuda else None,
        "regdrop_cuda_kernels": torch._C._dispatch_has_kernel_for_dispatch_key(
            "regdrop::dropout", "CUDA"
        ),
        # Selects both PyTorch's and regdrop's copy of the CPU kernels.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": threads,
        # Other work on the machine skews CPU timings: OpenMP threads wait for
        # descheduled peers.
        "load_average": os.getloadavg()[0],
        # On the CPU, a new output's page faults cost more than the kernels;
        # PyTorch backs large allocations with huge pages when this is 1.
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "1",
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "malloc_trim_threshold": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        # A caching malloc (tcmalloc, jemalloc) preloaded in glibc's place
        # hands large outputs memory already in memory: no page faults.
        "preloaded_malloc": os.environ.get("LD_PRELOAD") or None,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def header(env: dict) -> str:
    build = "CUDA and CPU kernels" if env["regdrop_cuda_kernels"] else "CPU kernels only"
    versions = f"torch {env['torch']}"
    if env["cuda"]:
        versions += f", CUDA {env['cuda']}"
    if env["triton"]:
        versions += f", triton {env['triton']}"
    return "\n".join(
        [
            f"device:   {env['device']}: {env['device_name']}",
            f"versions: {versions}, Python {env['python']}",
            f"regdrop:  {build}; CPU capability {env['cpu_capability']}",
            f"threads:  {env['threads']} (load average {env['load_average']:.1f} before this run, "
            f"{os.cpu_count()} logical cores)",
            f"memory:   huge pages for large CPU tensors (THP_MEM_ALLOC_ENABLE) "
            f"{'on' if env.get('thp_mem_alloc') else 'off'}; glibc mmap threshold "
            f"{env.get('malloc_mmap_threshold') or 'adaptive (not pinned)'}, trim threshold "
            f"{env.get('malloc_trim_threshold') or 'adaptive'}"
            + (f"; LD_PRELOAD={env['preloaded_malloc']}" if env.get("preloaded_malloc") else ""),
            f"date:     {env['date']}",
        ]
    )
