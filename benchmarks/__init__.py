"""The regdrop_ext benchmark suite: validate, then time, then report GB/s
against a copy measured in the same run.

    bench.py        the command line: ``python benchmarks/bench.py --quick``
    native_check.py each row of ours against the fastest native route (``bench.py --check``)
    kernel_speed.py the CPU kernels alone against a Philox-only limit and a copy (kernel_speed.cpp)
    report.py       the README's table, rendered from results/*.json
    op_table.py     one entry per fused op, with its native competitors
    eager.py        the PyTorch expressions the fused ops replace
    checks.py       the correctness checks every implementation passes before it is timed
    saved.py        what a call saves for backward, and the bytes it moves
    timing.py       median and interquartile range of a callable's run time
    runner.py       the grid: op x size x dtype x implementation x pass
    results.py      the result rows, their derived columns, JSON and CSV
    table.py        the aligned console table
    plot.py         GB/s against size, with the copy roofline
    e2e.py          training steps of a ViT-S-like block, native vs regdrop_ext
    environment.py  what ran where: device, versions, build, threads, date
"""
