#!/usr/bin/env python3
"""Machine-code gate for the CUDA kernels, read from the compiled code of
every architecture a binary holds.

    python .ci/sass_gate.py LIBRARY_OR_CUBIN [--cuobjdump PATH] [--markdown]
                            [--require sm_80,sm_90] [--checks contraction]

No GPU runs here, so this reads what the GPU would run (cuobjdump -sass and
-res-usage, per architecture, from the triton wheel when the toolkit lacks
them) and prints, per architecture and kernel: registers, spills/local
memory, CALLs, 128-bit global loads and stores, and the issue time per group
of 8 elements on its vector path (every operand 16-byte aligned) and on its
scalar path (misaligned operands, the last partial group, unaligned
shards), with the bandwidth ceilings they imply. It fails (exit 1) when

  * the binary holds an architecture with no machine model below, or lacks
    one that --require names (so every architecture built is gated);
  * a kernel spills or uses local memory, or CALLs a subroutine (the 64-bit
    division, for one). sm_80's `@P CALL.REL.NOINC` to a nearby address is
    how that architecture leaves a loop, a jump, not a call;
  * a kernel contracts a multiply and an add: an FFMA, DFMA or HFMA2 (.MMA
    or not) that adds a product to something (nvcc also writes moves,
    0 * 0 + c, and plain products, a * b + -0, with them). The CPU kernels
    round the product and the sum apart, and so must the GPU
    (csrc/epilogue.h);
  * a kernel flushes subnormals (.FTZ, but on a NaN test, where it changes
    nothing): both devices keep them;
  * an instruction has no pipe in the model (so a new one is a decision);
  * a kernel with a vector path lacks 128-bit global loads or stores, or its
    vector path stores other than one group's 128-bit words per group;
  * a streaming kernel's vector-path ceiling is below its architecture's
    floor;
  * a kernel is not in the table below (every kernel is classified).
With --checks contraction only the contraction and .FTZ checks run, on any
kernel (CI shows them failing a deliberately contracting probe).

The issue model. Each instruction goes to one pipe of an SM (NVIDIA's pipes
as Nsight Compute names them): fma (FP32, and IMAD, which only its heavy
half runs on sm_90), alu (integer and logic, compares, selects, moves,
F32->16-bit conversions), fp64 (with FP16x2 on sm_80), xu (other
conversions), lsu (memory, special registers), cbu (branches, barriers,
constant loads); uniform-datapath instructions only take an issue slot.
Rates are thread-instructions per clock per SM, from the CUDA C++
Programming Guide's arithmetic throughput table and NVIDIA's description
of each chip's pipes. Where NVIDIA gives none the model assumes: lsu and
cbu at 32 (a warp-instruction per clock per SM), and sm_90's VIADD,
VIMNMX and VIADDMNMX on the alu pipe. Every instruction also takes one of
the 4 schedulers' 128 issue slots per clock. A path's issue time is the
most any pipe is busy: max over pipes of sum(count / rate), in slots
(clocks x 128), so that a path of full-rate instructions costs its
instruction count, as the former single-rate model counted.

Paths. A kernel's paths run from entry to exit, or once around the loop
that holds its 128-bit accesses; back edges of other loops are not
followed, so an inner loop's body counts once. The vector path is every
path with the most 128-bit global accesses, the scalar path every path with
none; each is reported at its WORST: since max over paths of max over pipes
is max over pipes of max over paths, that is each pipe's longest path, a
plain longest-path walk per pipe. The ceiling is SMs x clock x 128 x bytes
per group / slots per group: the bandwidth the kernel could not exceed even
if memory were infinitely fast. A group moves its streamed tensors' bytes
(input, output, residual) and its mask byte. The floor (sm_90: 1.25 x a
copy measured on an H200, 4.14 TB/s) keeps issue from ever being what
limits a kernel; the scalar path is reported, not held to it.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------ the machines

# Instruction classes, by opcode (the part before the first dot).
CLASSES = {
    "fp32": {"FADD", "FMUL", "FFMA", "FADD32I", "FMUL32I", "FFMA32I"},
    "fp16x2": {"HADD2", "HMUL2", "HFMA2", "HSETP2", "HSET2", "HMNMX2"},
    "imad": {"IMAD", "IMUL", "IMUL32I", "IMAD32I", "IDP", "IDP4A"},
    "fp64": {"DADD", "DMUL", "DFMA", "DSETP", "DSET", "DMNMX"},
    "alu": {"IADD3", "IADD", "IADD32I", "LOP3", "LOP", "LOP32I", "SHF", "SHL", "SHR", "ISETP", "ISET", "FSETP",
            "FSET", "SEL", "FSEL", "PRMT", "LEA", "IMNMX", "FMNMX", "IABS", "PLOP3", "PSETP", "P2R", "R2P", "MOV",
            "MOV32I", "CS2R", "F2FP", "BMSK", "SGXT", "VIADD", "VIMNMX", "VIADDMNMX", "VOTE", "LEPC"},
    "conversion": {"F2F", "F2I", "I2F", "I2FP", "F2IP", "FRND", "MUFU", "POPC", "FLO", "BREV", "I2I"},
    "memory": {"LDG", "STG", "LDS", "STS", "LD", "ST", "LDL", "STL", "ATOM", "ATOMG", "ATOMS", "RED", "SHFL", "S2R",
               "LDGSTS", "LDSM", "MEMBAR", "ERRBAR", "CCTL", "DEPBAR"},
    "branch": {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "WARPSYNC", "BAR", "BMOV", "YIELD",
               "NANOSLEEP", "LDC", "KILL", "BPT"},
    "uniform": {"R2UR", "S2UR", "VOTEU"},  # and every U* opcode
    "mma": {"HMMA", "IMMA", "DMMA"},  # and HFMA2.MMA, a move issued to the tensor pipe
}


def instruction_class(opcode: str):
    if opcode.startswith("HFMA2.MMA"):
        return "mma"
    base = opcode.split(".")[0]
    for name, opcodes in CLASSES.items():
        if base in opcodes:
            return name
    if base.startswith("U"):
        return "uniform"
    return None


@dataclass(frozen=True)
class Machine:
    """The GPU an architecture's ceilings are computed for."""

    gpu: str
    sms: int
    clock_hz: float
    floor_tbps: float
    floor_why: str
    # pipe -> {instruction class: thread-instructions per clock per SM}
    pipes: dict


ISSUE = {name: 128 for name in CLASSES}  # 4 schedulers x 1 warp-instruction per clock

MACHINES = {
    # H200 (GH100): 128 FP32 lanes per SM in two halves, FMAheavy (which
    # also runs IMAD) and FMAlite; FP16x2 runs on both at once; FP64 on the
    # shared (tensor) pipe at 64; integer and logic at 64.
    "sm_90": Machine(
        "H200", 132, 1.98e9, 5.2, "1.25 x a copy measured on an H200 (4.14 TB/s)",
        {
            "issue": ISSUE,
            "fma": {"fp32": 128, "imad": 128, "fp16x2": 128},
            "fmaheavy": {"imad": 64, "fp16x2": 128},
            "alu": {"alu": 64},
            "fp64": {"fp64": 64, "mma": 64},
            "xu": {"conversion": 16},
            "lsu": {"memory": 32},
            "cbu": {"branch": 32},
        },
    ),
    # A100 (GA100): one FMA pipe of 64 lanes for FP32 and IMAD; FP64 (32),
    # FP16x2 (256 results, 128 instructions) and tensor share a pipe. No
    # A100 copy was measured: its floor takes the published peak (2.04 TB/s
    # for the 80 GB SXM part), which a copy never exceeds.
    "sm_80": Machine(
        "A100-SXM4-80GB", 108, 1.41e9, 2.55, "1.25 x its peak bandwidth (2.04 TB/s)",
        {
            "issue": ISSUE,
            "fma": {"fp32": 64, "imad": 64},
            "alu": {"alu": 64},
            "fp64": {"fp64": 32, "fp16x2": 128, "mma": 128},
            "xu": {"conversion": 16},
            "lsu": {"memory": 32},
            "cbu": {"branch": 32},
        },
    ),
}

# ---------------------------------------------------------------- kernels

ELEMENT_BYTES = {"float": 4, "double": 8, "regdrop::cuda::Half": 2, "regdrop::cuda::BFloat16": 2}
DTYPE_NAMES = {"float": "fp32", "double": "fp64", "regdrop::cuda::Half": "fp16", "regdrop::cuda::BFloat16": "bf16"}
EPILOGUES = {"0": "Scale", "1": "AddResidual", "2": "AddBiasResidual"}
BIT_SOURCES = {"0": "Draw", "1": "Elements", "2": "UnitPerGroup", "3": "UnitRuns", "4": "UnitChannelsLast",
               "5": "DrawShard"}
MASK_BYTE = {"Draw": 1, "Elements": 1, "DrawShard": 1}  # unit masks are a bit per unit: ~0 bytes per group


def column_sum_unroll() -> int:
    """Rows a column_sums thread loads per pass (csrc/column_sums.h)."""
    text = (ROOT / "csrc" / "column_sums.h").read_text()
    return int(re.search(r"kColumnSumUnroll = (\d+);", text).group(1))


def row_groups_per_thread() -> int:
    """Groups of 8 a cached norm row kernel's thread holds, unrolled, from
    entry to exit (csrc/norm/row_order.h)."""
    text = (ROOT / "csrc" / "norm" / "row_order.h").read_text()
    return int(re.search(r"kRowGroupsPerThread = (\d+);", text).group(1))


@dataclass
class Kernel:
    """What the table says of one kernel, from its demangled name."""

    label: str
    element_bytes: int = 0  # of its output; 0: no vector path (not a streaming kernel)
    bytes_per_group: float = 0.0
    groups_per_pass: int = 1  # per thread from entry to exit, or per trip around its loop
    floor_share: float = 1.0  # of its machine's floor


# The norm row kernels add each row twice (barriers, shuffles and shared
# memory a streaming kernel has none of), so they are held to a copy's
# bandwidth (0.8 x the 1.25 x copy floor), as the fused-norm issue asks,
# rather than to 1.25 x a copy: issue can then still limit them, but only
# where a copy's own bandwidth would.
ROW_KERNEL_FLOOR_SHARE = 0.8


def classify(name: str):
    """Every kernel of csrc/cuda/kernels.cu, or None for an unknown one."""
    name = name.removeprefix("void ")  # templates' names carry their return type
    m = re.match(r"regdrop::cuda::kernels::elementwise_kernel<regdrop::OperandTypes<(.+)>, "
                 r"\(regdrop::Epilogue\)(\d), \(regdrop::cuda::BitSource\)(\d)>", name)
    if m:
        types = [t.strip() for t in m.group(1).split(",")]  # input, residual, bias, output
        epilogue, source = EPILOGUES[m.group(2)], BIT_SOURCES[m.group(3)]
        names = [DTYPE_NAMES[t] for t in types]
        label = names[0] if len(set(types)) == 1 else f"{names[0]}/{names[1]}/{names[2]}->{names[3]}"
        streamed = [types[0], types[3]] + ([types[1]] if epilogue != "Scale" else [])
        return Kernel(f"elementwise {label} {epilogue} {source}", ELEMENT_BYTES[types[3]],
                      8 * sum(ELEMENT_BYTES[t] for t in streamed) + MASK_BYTE.get(source, 0))
    m = re.match(r"regdrop::cuda::kernels::column_sums_kernel<(.+)>", name)
    if m:  # reads grad and the mask, writes grad_input
        size = ELEMENT_BYTES[m.group(1)]
        return Kernel(f"column_sums {DTYPE_NAMES[m.group(1)]}", size, 16 * size + 1, column_sum_unroll())
    m = re.match(r"regdrop::cuda::kernels::fold_chunks_kernel<(.+)>", name)
    if m:  # chunks x cols sums, a few per column: not a streaming kernel
        return Kernel(f"fold_chunks {DTYPE_NAMES[m.group(1)]}")
    m = re.match(r"regdrop::cuda::norm_kernels::norm_(forward|backward)_kernel<(.+?), (.+?), "
                 r"(?:\(regdrop::cuda::RowSource\)(\d), )?(true|false)>", name)
    if m:  # csrc/cuda/norm_kernels.cu: a row kernel (backward kernels read their bits)
        types = [m.group(2), m.group(3)]  # input (and output), residual stream
        label = DTYPE_NAMES[types[0]] + ("" if types[0] == types[1] else f"/{DTYPE_NAMES[types[1]]}")
        source = ("Draw", "Read")[int(m.group(4) or 1)]
        label = f"norm_{m.group(1)} {label} {source} {'cached' if m.group(5) == 'true' else 'streamed'}"
        if m.group(5) == "false":  # rows past 8192 elements, read again from L2 between sweeps: no single vector path
            return Kernel(label)
        # Forward reads input and residual, writes output and residual_out;
        # backward reads grad_output and residual_out, writes grad_input and
        # grad_residual; both a mask byte. Its 128-bit stores: 8 elements of
        # each written tensor per group.
        size, stream = ELEMENT_BYTES[types[0]], ELEMENT_BYTES[types[1]]
        return Kernel(label, size + stream, 8 * 2 * (size + stream) + 1, row_groups_per_thread(),
                      ROW_KERNEL_FLOOR_SHARE)
    m = re.match(r"regdrop::cuda::norm_kernels::norm_fold_chunks_kernel<(.+)>", name)
    if m:
        return Kernel(f"norm_fold_chunks {DTYPE_NAMES[m.group(1)]}")
    m = re.match(r"regdrop::cuda::norm_kernels::norm_draw_mask_kernel<\(regdrop::cuda::BitSource\)(\d)>", name)
    if m:
        return Kernel(f"norm_draw_mask {BIT_SOURCES[m.group(1)]}")
    m = re.match(r"regdrop::cuda::kernels::draw_mask_kernel<\(regdrop::cuda::BitSource\)(\d)>", name)
    if m:  # a bit per sample or channel: not a streaming kernel
        return Kernel(f"draw_mask {BIT_SOURCES[m.group(1)]}")
    return None


# ------------------------------------------------------------------ parsing


@dataclass
class Instr:
    addr: int
    opcode: str
    operands: str
    predicated: bool


INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_.]+)\s*([^;]*);")


def parse_sass(text: str):
    functions, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = functions.setdefault(m.group(1), [])
            continue
        m = INSTR.search(line)
        if m and current is not None:
            current.append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip(), bool(m.group(2))))
    return functions


def parse_resources(text: str):
    resources, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line))
            resources[current] = {k: int(v) for k, v in fields.items()}
            current = None
    return resources


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, out.stdout.splitlines()))


def architectures(tool, binary):
    """The architectures of the ELF images in `binary` (a cubin, a fatbin, or
    a library embedding one)."""
    listing = subprocess.run([tool, "-lelf", binary], capture_output=True, text=True, check=True).stdout
    return sorted(set(re.findall(r"\.(sm_\d+[af]?)\.cubin", listing)))


def dump(tool, binary, arch):
    """(SASS, resource usage) of one architecture's code."""
    sass = subprocess.run([tool, "-sass", "-arch", arch, binary], capture_output=True, text=True, check=True).stdout
    targets = set(re.findall(r"\.target\s+(sm_\w+)", sass))
    if targets != {arch}:  # a plain cubin ignores -arch: it must hold that one architecture
        sys.exit(f"asked cuobjdump for {arch}, got code for {sorted(targets)}")
    res = subprocess.run([tool, "-res-usage", "-arch", arch, binary], capture_output=True, text=True,
                         check=True).stdout
    return sass, res


# ------------------------------------------------------------ control flow


def is_vector_access(i: Instr) -> bool:
    return i.opcode.startswith(("LDG.E.128", "STG.E.128"))


def is_loop_exit_jump(i: Instr) -> bool:
    """sm_80 leaves a loop with `@P CALL.REL.NOINC target`: no return address
    is pushed (NOINC), so it is a conditional jump."""
    return i.opcode == "CALL.REL.NOINC"


def is_call(i: Instr) -> bool:
    return i.opcode.startswith("CALL") and not is_loop_exit_jump(i)


def branch_target(i: Instr):
    m = re.search(r"0x([0-9a-f]+)\s*$", i.operands)
    return int(m.group(1), 16) if m else None


@dataclass
class Block:
    start: int
    instrs: list = field(default_factory=list)
    succ: list = field(default_factory=list)
    exits: bool = False  # a thread may leave the kernel at its end


def build_cfg(instrs):
    by_addr = {i.addr: n for n, i in enumerate(instrs)}
    leaders = {instrs[0].addr}
    for n, i in enumerate(instrs):
        op = i.opcode.split(".")[0]
        jumps = op == "BRA" or is_loop_exit_jump(i)
        if jumps or is_call(i):
            target = branch_target(i)
            if target is not None:
                leaders.add(target)
        if (jumps or op in ("EXIT", "RET") or is_call(i)) and n + 1 < len(instrs):
            leaders.add(instrs[n + 1].addr)
    blocks, order = {}, sorted(leaders)
    for k, start in enumerate(order):
        end = order[k + 1] if k + 1 < len(order) else instrs[-1].addr + 16
        b = Block(start, [i for i in instrs[by_addr[start]:] if i.addr < end])
        last = b.instrs[-1]
        op = last.opcode.split(".")[0]
        following = end if end in by_addr else None
        conditional = last.predicated or re.match(r"!?U?P[T0-9]+,", last.operands)
        if op == "BRA" or is_loop_exit_jump(last):
            b.succ = [branch_target(last)] + ([following] if conditional and following else [])
        elif op == "EXIT":
            b.exits = True
            b.succ = [following] if last.predicated and following else []
        elif op == "RET":
            b.exits = True
        elif following is not None:
            b.succ = [following]
        blocks[start] = b
    return blocks


def longest(blocks, start, stop, value, allowed=lambda b: True):
    """The largest `value` summed over a path from `start` to an exit (stop
    None) or to the back edge into `stop`, through allowed blocks only;
    values are tuples, summed element-wise and compared in order. Only
    forward edges and that back edge are followed, so the walk is acyclic.
    None where no such path exists."""
    memo = {}

    def visit(addr):
        if addr not in memo:
            b, best = blocks[addr], None
            if allowed(b):
                ends = (stop is None and b.exits) or (stop is not None and stop in b.succ and addr >= stop)
                options = [tuple(0 for _ in value(b))] if ends else []
                options += [v for s in b.succ if s in blocks and s > addr for v in [visit(s)] if v is not None]
                if options:
                    best = tuple(a + o for a, o in zip(value(b), max(options)))
            memo[addr] = best
        return memo[addr]

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(blocks) + 100))
    return visit(start)


def streaming_loop(instrs, blocks):
    """The header of the loop that holds 128-bit accesses, or None."""
    for b in sorted(blocks.values(), key=lambda b: b.start):
        for header in b.succ:
            if header is not None and header <= b.start:
                if any(is_vector_access(i) for i in instrs if header <= i.addr <= b.instrs[-1].addr):
                    return header
    return None


@dataclass
class PathCost:
    slots: float  # issue time in slots (clocks x 128) on its busiest pipe
    pipe: str  # that pipe
    instructions: int  # issued (the worst path's, for the issue pipe)


def pipe_loads(instrs, machine):
    """{pipe: slots} of a straight sequence of instructions."""
    loads = {pipe: 0.0 for pipe in machine.pipes}
    for i in instrs:
        if i.opcode.startswith("NOP"):
            continue
        cls = instruction_class(i.opcode)
        for pipe, rates in machine.pipes.items():
            if cls in rates:
                loads[pipe] += 128 / rates[cls]
    return loads


def worst_paths(instrs, machine):
    """(vector PathCost or None, 128-bit stores on the vector path as a
    (fewest, most) pair, scalar PathCost or None) of one kernel."""
    blocks = build_cfg(instrs)
    header = streaming_loop(instrs, blocks)
    start, stop = (instrs[0].addr, None) if header is None else (header, header)
    loads = {addr: pipe_loads(b.instrs, machine) for addr, b in blocks.items()}
    vec = {addr: sum(is_vector_access(i) for i in b.instrs) for addr, b in blocks.items()}
    st128 = {addr: sum(i.opcode.startswith("STG.E.128") for i in b.instrs) for addr, b in blocks.items()}

    def cost(key_of, allowed=lambda b: True):
        best = None
        for pipe in machine.pipes:
            found = longest(blocks, start, stop, lambda b: key_of(b) + (loads[b.start][pipe],), allowed)
            if found is not None and (best is None or found[-1] > best.slots):
                best = PathCost(found[-1], pipe, 0)
        if best is not None:
            count = longest(blocks, start, stop, lambda b: key_of(b) + (loads[b.start]["issue"],), allowed)
            best.instructions = round(count[-1])
        return best

    vector = cost(lambda b: (vec[b.start],)) if any(vec.values()) else None
    stores = None
    if vector is not None:
        most = longest(blocks, start, stop, lambda b: (vec[b.start], st128[b.start]))
        fewest = longest(blocks, start, stop, lambda b: (vec[b.start], -st128[b.start]))
        stores = (-fewest[1], most[1])
    scalar = cost(lambda b: (), allowed=lambda b: vec[b.start] == 0)
    return vector, stores, scalar


def is_zero(operand: str) -> bool:
    return operand.lstrip("-|").rstrip("|") == "RZ"


def contracts(i: Instr) -> bool:
    """An FFMA, DFMA or HFMA2 (.MMA or not) d = a * b + c that adds a product
    to something: nvcc also uses them for moves (a or b zero: d = c) and for
    products (c zero: a * b rounded once), which are no contraction."""
    if i.opcode.split(".")[0] not in ("FFMA", "FFMA32I", "DFMA", "HFMA2"):
        return False
    operands = [o.strip() for o in i.operands.split(",")]
    a, b, addend = operands[1], operands[2], operands[3:]
    return not (is_zero(a) or is_zero(b) or all(is_zero(c) for c in addend))


def contraction_and_flushing(instrs):
    """Failures of the contraction and subnormal checks, as text."""
    found = []
    for i in instrs:
        if contracts(i):
            found.append(f"{i.opcode} {i.operands} at {i.addr:#06x} (a contracted multiply-add)")
        if ".FTZ" in i.opcode and not i.opcode.startswith("FSETP.NAN"):  # a NaN test flushes nothing
            found.append(f"{i.opcode} at {i.addr:#06x} (flushes subnormals)")
    return found


# ------------------------------------------------------------------- gate


def find_cuobjdump():
    for candidate in [os.environ.get("CUOBJDUMP", ""), "cuobjdump"]:
        if candidate and subprocess.run(["which", candidate], capture_output=True).returncode == 0:
            return candidate
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        found = glob.glob(os.path.join(os.path.dirname(spec.origin), "backends/nvidia/bin/cuobjdump"))
        if found:
            return found[0]
    sys.exit("no cuobjdump: install triton (it ships one) or set CUOBJDUMP")


def ceiling(machine, kernel, slots):
    return machine.sms * machine.clock_hz * 128 * kernel.bytes_per_group / slots / 1e12


def gate_architecture(arch, machine, functions, resources, names, only_contraction):
    """(table rows, failures) of one architecture's kernels."""
    rows, failures = [], []
    for mangled, instrs in sorted(functions.items(), key=lambda kv: names[kv[0]]):
        name = names[mangled]
        for problem in contraction_and_flushing(instrs):
            failures.append(f"{arch} {name}: {problem}")
        if only_contraction:
            continue
        kernel = classify(name)
        if kernel is None:
            failures.append(f"{arch} {name}: not classified in .ci/sass_gate.py")
            continue
        unknown = sorted({i.opcode for i in instrs if not i.opcode.startswith("NOP") and
                          instruction_class(i.opcode) is None})
        if unknown:
            failures.append(f"{arch} {kernel.label}: no pipe in the issue model for {', '.join(unknown)}")
            continue
        r = resources.get(mangled, {})
        local = sum(i.opcode.startswith(("LDL", "STL")) for i in instrs) + r.get("LOCAL", 0) + r.get("STACK", 0)
        calls = sum(is_call(i) for i in instrs)
        loads128 = sum(i.opcode.startswith("LDG.E.128") for i in instrs)
        stores128 = sum(i.opcode.startswith("STG.E.128") for i in instrs)
        row = {"kernel": kernel.label, "regs": r.get("REG", 0), "spill": local, "calls": calls, "ld128": loads128,
               "st128": stores128, "vector": None, "bound": None, "vector_tbps": None, "scalar": None,
               "scalar_tbps": None, "floor": None}
        if local:
            failures.append(f"{arch} {kernel.label}: local memory (spills or a stack frame)")
        if calls:
            failures.append(f"{arch} {kernel.label}: {calls} CALL(s) to a slow path")
        if kernel.element_bytes:
            vector, stores, scalar = worst_paths(instrs, machine)
            expected = kernel.groups_per_pass * 8 * kernel.element_bytes // 16
            if vector is None or not loads128 or not stores128:
                failures.append(f"{arch} {kernel.label}: no 128-bit global loads and stores on its vector path")
            elif stores != (expected, expected):
                failures.append(f"{arch} {kernel.label}: its vector paths store {stores[0]} to {stores[1]} "
                                f"128-bit words, not the {expected} of {kernel.groups_per_pass} group(s)")
            else:
                row["vector"], row["bound"] = vector.slots / kernel.groups_per_pass, vector.pipe
                row["vector_tbps"] = ceiling(machine, kernel, row["vector"])
                floor = row["floor"] = round(machine.floor_tbps * kernel.floor_share, 2)
                if row["vector_tbps"] < floor:
                    failures.append(f"{arch} {kernel.label}: issue ceiling {row['vector_tbps']:.2f} TB/s "
                                    f"< {floor} ({vector.pipe}-bound)")
            if scalar is not None:
                row["scalar"] = scalar.slots / kernel.groups_per_pass
                row["scalar_tbps"] = ceiling(machine, kernel, row["scalar"])
        rows.append(row)
    return rows, failures


def print_table(arch, machine, rows, markdown):
    header = ["kernel", "regs", "spill", "calls", "ld128", "st128", "vector slots/group", "bound by", "TB/s",
              "floor", "scalar slots/group", "TB/s"]

    def number(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    cells = [[row["kernel"], str(row["regs"]), str(row["spill"]), str(row["calls"]), str(row["ld128"]),
              str(row["st128"]), number(row["vector"], 0), row["bound"] or "-", number(row["vector_tbps"], 2),
              number(row["floor"], 2), number(row["scalar"], 0), number(row["scalar_tbps"], 2)] for row in rows]
    print(f"\n{arch} ({machine.gpu}: {machine.sms} SMs x {machine.clock_hz / 1e9:.2f} GHz; "
          f"floor {machine.floor_tbps} TB/s = {machine.floor_why})")
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for c in cells:
            print("| " + " | ".join(c) + " |")
    else:
        widths = [max(len(h), *(len(c[k]) for c in cells)) for k, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for c in cells:
            print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("binary")
    parser.add_argument("--cuobjdump", default=None)
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--require", default="", help="architectures the binary must hold, e.g. sm_80,sm_90")
    parser.add_argument("--checks", choices=["all", "contraction"], default="all",
                        help="contraction: only the contraction and .FTZ checks, on any kernel")
    args = parser.parse_args()
    tool = args.cuobjdump or find_cuobjdump()
    archs = architectures(tool, args.binary)
    failures = [f"{arch}: not in the binary" for arch in args.require.split(",") if arch and arch not in archs]
    if not archs:
        sys.exit(f"no GPU code found in {args.binary}")
    for arch in archs:
        machine = MACHINES.get(arch)
        if machine is None and args.checks == "all":
            failures.append(f"{arch}: no machine model in .ci/sass_gate.py (every architecture built is gated)")
            continue
        sass, res = dump(tool, args.binary, arch)
        functions, resources = parse_sass(sass), parse_resources(res)
        names = demangle(list(functions))
        rows, problems = gate_architecture(arch, machine, functions, resources, names, args.checks == "contraction")
        failures += problems
        if rows:
            print_table(arch, machine, rows, args.markdown)
        print(f"\n{arch}: {len(functions)} kernels")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("machine-code gate passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
