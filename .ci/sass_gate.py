#!/usr/bin/env python3
"""Machine-code gate for the CUDA kernels, read from the compiled sm_90 code.

    python .ci/sass_gate.py LIBRARY_OR_CUBIN [--cuobjdump PATH] [--markdown]

No GPU runs here, so this reads what the GPU would run (cuobjdump -sass and
-res-usage, from the triton wheel when the toolkit lacks them) and prints, per
kernel: registers, spills/local memory, slow-path CALLs, 128-bit global loads
and stores, and the instructions issued per group of 8 elements on its vector
path, with the bandwidth ceiling they imply. It fails (exit 1) when

  * a kernel spills or uses local memory, or CALLs a subroutine (the 64-bit
    division and modulo, for one);
  * a kernel with a vector path lacks 128-bit global loads or stores;
  * a streaming kernel's issue ceiling is below MIN_CEILING_TBPS;
  * a kernel is not in the table below (every kernel is classified).

The issue model. An H200 issues ISSUE_RATE thread-instructions per second
(132 SMs x 4 schedulers x 32 lanes x 1.98 GHz). A kernel's vector path is
the path through its control-flow graph, from entry to exit or once around
the loop that holds its 128-bit accesses, with the most 128-bit global
accesses and, among those, the fewest instructions; every instruction on it
counts, predicated or not, NOPs excepted, and a CALL counts its subroutine.
The groups that path moves are its 128-bit stores divided by the stores one
group needs (8 elements x element size / 16 bytes), and each group moves the
bytes of its streamed tensors (input, output, residual) and its mask byte.
The ceiling is ISSUE_RATE x bytes per group / instructions per group: the
bandwidth the kernel could not exceed even if memory were infinitely fast.
MIN_CEILING_TBPS is 1.25 x a measured H200 copy (4.14 TB/s), so that issue
is never what limits a kernel.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field

ISSUE_RATE = 132 * 128 * 1.98e9
MIN_CEILING_TBPS = 5.2

ELEMENT_BYTES = {"float": 4, "double": 8, "regdrop::cuda::Half": 2, "regdrop::cuda::BFloat16": 2}
DTYPE_NAMES = {"float": "fp32", "double": "fp64", "regdrop::cuda::Half": "fp16", "regdrop::cuda::BFloat16": "bf16"}
EPILOGUES = {"0": "Scale", "1": "AddResidual", "2": "AddBiasResidual"}
BIT_SOURCES = {"0": "Draw", "1": "Elements", "2": "UnitPerGroup", "3": "UnitRuns", "4": "UnitChannelsLast",
               "5": "DrawShard"}
MASK_BYTE = {"Draw": 1, "Elements": 1, "DrawShard": 1}  # unit masks are a bit per unit: ~0 bytes per group


@dataclass
class Kernel:
    """What the table says of one kernel, from its demangled name."""

    label: str
    element_bytes: int = 0  # 0: no vector path (not a streaming kernel)
    bytes_per_group: float = 0.0


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
        # Its 128-bit stores are the output's: a group stores 8 output elements.
        return Kernel(f"elementwise {label} {epilogue} {source}", ELEMENT_BYTES[types[3]],
                      8 * sum(ELEMENT_BYTES[t] for t in streamed) + MASK_BYTE.get(source, 0))
    m = re.match(r"regdrop::cuda::kernels::column_sums_kernel<(.+)>", name)
    if m:  # reads grad and the mask, writes grad_input
        size = ELEMENT_BYTES[m.group(1)]
        return Kernel(f"column_sums {DTYPE_NAMES[m.group(1)]}", size, 16 * size + 1)
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
        return Kernel(label, size + stream, 8 * 2 * (size + stream) + 1)
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


# --------------------------------------------------------- the path model


def is_vector_access(i: Instr) -> bool:
    return i.opcode.startswith(("LDG.E.128", "STG.E.128"))


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
        if op in ("BRA", "CALL"):
            target = branch_target(i)
            if target is not None:
                leaders.add(target)
        if op in ("BRA", "EXIT", "RET", "CALL") and n + 1 < len(instrs):
            leaders.add(instrs[n + 1].addr)
    blocks, order = {}, sorted(leaders)
    for k, start in enumerate(order):
        end = order[k + 1] if k + 1 < len(order) else instrs[-1].addr + 16
        b = Block(start, [i for i in instrs[by_addr[start]:] if i.addr < end])
        last = b.instrs[-1]
        op = last.opcode.split(".")[0]
        following = end if end in by_addr else None
        conditional = last.predicated or re.match(r"!?U?P[T0-9]+,", last.operands)
        if op == "BRA":
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


def block_cost(b: Block, blocks):
    """(128-bit accesses, instructions, 128-bit stores) of a block; a CALL
    adds its subroutine's instructions."""
    vec = sum(is_vector_access(i) for i in b.instrs)
    stores = sum(i.opcode.startswith("STG.E.128") for i in b.instrs)
    cost = sum(not i.opcode.startswith("NOP") for i in b.instrs)
    for i in b.instrs:
        if i.opcode.startswith("CALL") and branch_target(i) in blocks:
            cost += best_path(blocks, branch_target(i), None)[1]
    return vec, cost, stores


def best_path(blocks, start, stop):
    """(128-bit accesses, instructions, 128-bit stores) of the best path from
    `start` to an exit (stop None) or to the back edge into `stop`: the most
    128-bit accesses, then the fewest instructions. Back edges other than
    that one are not followed, so the graph walked is acyclic."""
    memo = {}
    dead_end = (-1, 0, 0)

    def visit(addr):
        if addr not in memo:
            b = blocks[addr]
            here = block_cost(b, blocks)
            options = []
            if (b.exits and stop is None) or (stop is not None and stop in b.succ and addr >= stop):
                options.append((0, 0, 0))
            options += [visit(s) for s in b.succ if s in blocks and s > addr]
            options = [o for o in options if o[0] >= 0]
            if options:
                v, c, st = max(options, key=lambda o: (o[0], -o[1]))
                memo[addr] = (v + here[0], c + here[1], st + here[2])
            else:
                memo[addr] = dead_end
        return memo[addr]

    return visit(start)


def vector_path(instrs):
    """(128-bit accesses, instructions, 128-bit stores) on the vector path:
    once around the loop that holds 128-bit accesses, if one does, else
    from entry to exit."""
    blocks = build_cfg(instrs)
    for b in blocks.values():
        for header in b.succ:
            if header is not None and header <= b.start:
                body = [i for i in instrs if header <= i.addr <= b.instrs[-1].addr]
                if any(is_vector_access(i) for i in body):
                    return best_path(blocks, header, header)
    return best_path(blocks, instrs[0].addr, None)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("binary")
    parser.add_argument("--cuobjdump", default=None)
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    tool = args.cuobjdump or find_cuobjdump()
    sass = subprocess.run([tool, "-sass", args.binary], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "-res-usage", args.binary], capture_output=True, text=True, check=True).stdout
    functions, resources = parse_sass(sass), parse_resources(res)
    if not functions:
        sys.exit(f"no sm_90 kernels found in {args.binary}")
    names = demangle(list(functions))

    rows, failures = [], []
    for mangled, instrs in sorted(functions.items(), key=lambda kv: names[kv[0]]):
        name = names[mangled]
        kernel = classify(name)
        if kernel is None:
            failures.append(f"{name}: not classified in .ci/sass_gate.py")
            continue
        r = resources.get(mangled, {})
        local = sum(i.opcode.startswith(("LDL", "STL")) for i in instrs)
        calls = sum(i.opcode.startswith("CALL") for i in instrs)
        loads128 = sum(i.opcode.startswith("LDG.E.128") for i in instrs)
        stores128 = sum(i.opcode.startswith("STG.E.128") for i in instrs)
        row = {"kernel": kernel.label, "regs": r.get("REG", 0), "spill": local + r.get("LOCAL", 0) + r.get("STACK", 0),
               "calls": calls, "ld128": loads128, "st128": stores128, "per_group": None, "ceiling": None}
        if local or r.get("LOCAL", 0) or r.get("STACK", 0):
            failures.append(f"{kernel.label}: local memory (spills or a stack frame)")
        if calls:
            failures.append(f"{kernel.label}: {calls} CALL(s) to a slow path")
        if kernel.element_bytes:
            if not loads128 or not stores128:
                failures.append(f"{kernel.label}: no 128-bit global loads and stores on its vector path")
            else:
                _, cost, stores = vector_path(instrs)
                stores_per_group = 8 * kernel.element_bytes // 16
                groups = stores / stores_per_group
                if groups <= 0:
                    failures.append(f"{kernel.label}: the vector path stores no group")
                else:
                    per_group = cost / groups
                    ceiling = ISSUE_RATE * kernel.bytes_per_group / per_group / 1e12
                    row["per_group"], row["ceiling"] = per_group, ceiling
                    if ceiling < MIN_CEILING_TBPS:
                        failures.append(f"{kernel.label}: issue ceiling {ceiling:.2f} TB/s < {MIN_CEILING_TBPS}")
        rows.append(row)

    header = ["kernel", "regs", "spill", "calls", "ld128", "st128", "instr/group", "ceiling TB/s"]
    cells = [[row["kernel"], str(row["regs"]), str(row["spill"]), str(row["calls"]), str(row["ld128"]),
              str(row["st128"]), "-" if row["per_group"] is None else f"{row['per_group']:.0f}",
              "-" if row["ceiling"] is None else f"{row['ceiling']:.2f}"] for row in rows]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
        for c in cells:
            print("| " + " | ".join(c) + " |")
    else:
        widths = [max(len(h), *(len(c[k]) for c in cells)) for k, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for c in cells:
            print("  ".join(v.ljust(w) for v, w in zip(c, widths)))
    print(f"\n{len(rows)} kernels; issue model: {ISSUE_RATE:.3g} thread-instructions/s, "
          f"floor {MIN_CEILING_TBPS} TB/s")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("machine-code gate passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
