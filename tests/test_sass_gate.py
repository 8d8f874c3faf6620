"""The machine-code gate's reading of SASS (.ci/sass_gate.py), on small
hand-written listings in cuobjdump's format: which path it costs, how it
reads sm_80's loop exits, and what it counts as contraction. CI runs the
gate itself on the built kernels (.ci/cuda_compile_check.sh)."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("sass_gate", Path(__file__).resolve().parents[1] / ".ci/sass_gate.py")
gate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate)


def listing(*lines):
    """One kernel's instructions, 16 bytes apart from address 0."""
    text = ["\t\tFunction : kernel"] + [f"        /*{16 * k:04x}*/                   {line} ;" for k, line in enumerate(lines)]
    return gate.parse_sass("\n".join(text))["kernel"]


def test_the_worst_path_is_costed_on_its_busiest_pipe():
    """A branch of eight DMULs against one of an FADD: the DMUL side keeps
    the fp64 pipe busiest, 8 x 128 / 32 = 32 slots on sm_80 and 16 on sm_90
    (FP64 at 32 and 64 per clock), more than the 13 instructions that path
    issues. The cheaper branch would have been 5 instructions."""
    kernel = listing(
        "ISETP.NE.AND P0, PT, R0, RZ, PT",
        "@P0 BRA 0xb0",
        *["DMUL R2, R2, R4"] * 8,
        "BRA 0xc0",
        "FADD R2, R2, R4",
        "STG.E.128 desc[UR4][R6.64], R8",
        "EXIT",
    )
    for arch, slots in [("sm_80", 32.0), ("sm_90", 16.0)]:
        vector, stores, scalar = gate.worst_paths(kernel, gate.MACHINES[arch])
        assert (vector.pipe, vector.slots, vector.instructions) == ("fp64", slots, 13)
        assert stores == (1, 1) and scalar is None


def test_sm80_leaves_a_loop_with_call_rel_noinc_which_is_no_call():
    kernel = listing(
        "MOV R0, RZ",
        "LDG.E.128 R4, desc[UR4][R2.64]",
        "STG.E.128 desc[UR4][R2.64], R4",
        "IADD3 R0, R0, 0x1, RZ",
        "ISETP.GE.AND P1, PT, R0, R9, PT",
        "@P1 CALL.REL.NOINC 0x70",
        "BRA 0x10",
        "EXIT",
    )
    assert not any(gate.is_call(i) for i in kernel)
    assert gate.build_cfg(kernel)[0x10].succ == [0x70, 0x60]
    vector, stores, _ = gate.worst_paths(kernel, gate.MACHINES["sm_80"])
    # Once around the loop from its header: 6 instructions, 2 of them on the
    # load/store pipe at 32 per clock.
    assert (vector.pipe, vector.slots, vector.instructions) == ("lsu", 8.0, 6)
    assert stores == (1, 1)


def test_contraction_is_a_product_added_to_something():
    kernel = listing(
        "FFMA R9, R5, UR6, R2",
        "DFMA R6, R4, c[0x0][0x178], R2",
        "HFMA2.MMA R9, R4, R0, R3",
        "HFMA2.MMA R7, -RZ, RZ, 0, 2.384185791015625e-07",  # a move of a constant
        "HFMA2.MMA R0, R4, R0, -RZ",  # a product, rounded once
        "FSETP.NAN.FTZ.AND P0, PT, R1, R1, PT",  # a NaN test: flushing changes nothing
        "FMUL.FTZ R1, R2, R3",
        "EXIT",
    )
    found = gate.contraction_and_flushing(kernel)
    assert [f.split()[0] for f in found] == ["FFMA", "DFMA", "HFMA2.MMA", "FMUL.FTZ"]
