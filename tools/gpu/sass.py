"""Reads SASS (the text of ``cuobjdump -sass``) and counts, for every global load, the loads in flight with it.

A thread that issues a global load and then uses its result stalls until the data arrives (an L2 hit takes
about 270 cycles on Hopper, HBM about 600). Several loads issued before the first of them is used share
that wait. For each global load site this module finds, along the control-flow path on which the fewest
other global loads issue before its result is first read, how many other loads are in flight with it:
those issued between it and that first use, plus earlier ones still waiting for their own first use at
that moment. A loader that stores every loaded element to shared memory straight away scores 0; one that
issues 8 loads into registers and only then stores them scores 7 at every site.

The count is static: it ignores which paths run how often, and what the scheduler overlaps across warps.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")
_REGISTER = re.compile(r"(?<![A-Z0-9_.])R(\d+)(?:\.(64|128))?(?![0-9])")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")

# Instructions whose first operand is read, not written.
_NO_DESTINATION = ("ST", "STS", "STG", "STL", "RED", "REDG", "BAR", "BRA", "EXIT", "RET", "CALL", "BSSY", "BSYNC",
                   "WARPSYNC", "NOP", "MEMBAR", "FENCE", "DEPBAR", "ERRBAR", "CCTL", "STSM", "SYNCS", "ARRIVES")
# Register counts of HMMA operands (A, B, C) by shape and type, for the reads of a multi-register operand.
_HMMA_OPERANDS = {"16816": (4, 2, 4), "1688": (2, 1, 4), "1684": (2, 1, 4), "884": (2, 1, 8)}


@dataclass
class Instruction:
    offset: int
    predicated: bool
    opcode: str
    operands: list[str]
    text: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


@dataclass
class LoadSite:
    """One global load instruction and the loads in flight with it."""

    offset: int
    text: str
    bits: int
    in_loop: bool
    issued_before_use: int = 0  # other global loads on the path to its first use
    in_flight: int = 0  # issued_before_use plus earlier loads still outstanding at its issue
    first_use: int | None = None  # offset of the first reading instruction on that path
    passes: set[int] = field(default_factory=set)


def parse(text: str) -> dict[str, list[Instruction]]:
    """{mangled kernel name: its instructions in address order} from ``cuobjdump -sass`` output."""
    functions: dict[str, list[Instruction]] = {}
    current = None
    for line in text.splitlines():
        name = _FUNCTION.match(line)
        if name:
            current = functions.setdefault(name.group(1), [])
            continue
        match = _LINE.match(line)
        if current is None or not match:
            continue
        body = match.group(2).strip()
        predicated = bool(_PREDICATE.match(body))
        body = _PREDICATE.sub("", body)
        opcode, _, rest = body.partition(" ")
        operands = [o.strip() for o in _split_operands(rest)] if rest.strip() else []
        current.append(Instruction(int(match.group(1), 16), predicated, opcode, operands, body))
    return functions


def _split_operands(rest: str) -> list[str]:
    """Splits on commas outside brackets ([R1.64+0x10] and desc[UR4][R2.64] stay whole)."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(rest):
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(rest[start:i])
            start = i + 1
    parts.append(rest[start:])
    return parts


def is_global_load(ins: Instruction) -> bool:
    return ins.base == "LDG"


def load_bits(ins: Instruction) -> int:
    """Width in bits of a load or store from its type suffix (no suffix: 32)."""
    suffixes = ins.opcode.split(".")[1:]
    for suffix, bits in (("128", 128), ("64", 64), ("U16", 16), ("S16", 16), ("U8", 8), ("S8", 8)):
        if suffix in suffixes:
            return bits
    return 32


def _register_span(operand: str, default: int = 1) -> set[int]:
    registers = set()
    for match in _REGISTER.finditer(operand):
        width = {"64": 2, "128": 4}.get(match.group(2), default)
        first = int(match.group(1))
        registers.update(range(first, first + width))
    return registers


def written_registers(ins: Instruction) -> set[int]:
    if not ins.operands or ins.base in _NO_DESTINATION:
        return set()
    width = 1
    if ins.base in ("LDG", "LDS", "LD", "LDL", "LDC", "ULDC"):
        width = max(1, load_bits(ins) // 32)
    elif ins.base == "HMMA":
        width = _hmma_widths(ins)[2]
    elif ".WIDE" in ins.opcode or ".64" in ins.opcode:
        width = 2
    dest = ins.operands[0]
    return _register_span(dest, width) if "[" not in dest else set()


def _hmma_widths(ins: Instruction) -> tuple[int, int, int]:
    for shape, widths in _HMMA_OPERANDS.items():
        if f".{shape}." in ins.opcode + ".":
            return widths
    return (4, 2, 4)


def read_registers(ins: Instruction) -> set[int]:
    operands = ins.operands if ins.base in _NO_DESTINATION else ins.operands[1:]
    registers = set()
    if ins.base == "HMMA":
        for operand, width in zip(operands, _hmma_widths(ins), strict=False):
            registers |= _register_span(operand, width)
        return registers
    store_width = max(1, load_bits(ins) // 32) if ins.base in ("ST", "STS", "STG", "STL") else 1
    for operand in operands:
        registers |= _register_span(operand, 1 if "[" in operand else store_width)
    return registers


def _successors(code: list[Instruction], index_of: dict[int, int], i: int) -> list[int]:
    ins = code[i]
    if ins.base in ("EXIT", "RET", "BRX", "JMX") and not ins.predicated:
        return []
    nexts = []
    if ins.base in ("BRA", "JMP"):
        target = _BRANCH_TARGET.search(ins.text)
        if target and int(target.group(1), 16) in index_of:
            nexts.append(index_of[int(target.group(1), 16)])
        if not ins.predicated and ".DIV" not in ins.opcode:
            return nexts
    if i + 1 < len(code):
        nexts.append(i + 1)
    return nexts


def _loops(code: list[Instruction], index_of: dict[int, int]) -> list[tuple[int, int]]:
    """(first, last) instruction indices of every backward branch's range."""
    ranges = []
    for i, ins in enumerate(code):
        if ins.base == "BRA":
            target = _BRANCH_TARGET.search(ins.text)
            if target and int(target.group(1), 16) in index_of and index_of[int(target.group(1), 16)] <= i:
                ranges.append((index_of[int(target.group(1), 16)], i))
    return ranges


def load_sites(code: list[Instruction]) -> list[LoadSite]:
    """Every global load of one kernel with its in-flight count (see the module docstring)."""
    index_of = {ins.offset: i for i, ins in enumerate(code)}
    loops = _loops(code, index_of)
    sites = {}
    for i, ins in enumerate(code):
        if not is_global_load(ins):
            continue
        site = LoadSite(ins.offset, ins.text, load_bits(ins), any(a <= i <= b for a, b in loops))
        _fewest_loads_to_first_use(code, index_of, i, site)
        sites[i] = site
    by_offset = {site.offset: site for site in sites.values()}
    for site in sites.values():
        overlapping = set(site.passes)
        overlapping |= {other.offset for other in sites.values() if site.offset in other.passes}
        overlapping.discard(site.offset)
        site.in_flight = len(overlapping)
    return sorted(by_offset.values(), key=lambda s: s.offset)


def _fewest_loads_to_first_use(code, index_of, start: int, site: LoadSite, max_steps: int = 20000) -> None:
    """Dijkstra over the control-flow graph from the load at ``start``: the cost of a path is the number of
    global loads it issues; it ends at the first instruction reading the load's registers. Paths that
    overwrite those registers, or come back to the load itself, carry no use."""
    loaded = written_registers(code[start])
    heap = [(0, nxt, ()) for nxt in _successors(code, index_of, start)]
    heapq.heapify(heap)
    best: dict[int, int] = {}
    steps = 0
    while heap and steps < max_steps:
        steps += 1
        cost, i, passed = heapq.heappop(heap)
        if i == start or best.get(i, 1 << 30) <= cost:
            continue
        best[i] = cost
        ins = code[i]
        if read_registers(ins) & loaded:
            site.issued_before_use = cost
            site.first_use = ins.offset
            site.passes = set(passed)
            return
        if written_registers(ins) & loaded and not ins.predicated:
            continue
        if is_global_load(ins):
            cost, passed = cost + 1, passed + (ins.offset,)
        for nxt in _successors(code, index_of, i):
            heapq.heappush(heap, (cost, nxt, passed))


_DEPBAR_GROUPS = re.compile(r"SB0,\s*(0x[0-9a-f]+|\d+)")


def async_copies(code: list[Instruction]) -> tuple[int, float, float]:
    """(count, mean bytes, mean others in flight) of the asynchronous global-to-shared copies (LDGSTS).

    Copies are committed in groups (LDGDEPBAR); ``DEPBAR.LE SB0, N`` waits until at most N groups are
    outstanding, so the copies of the N + 1 groups committed last before it share that wait. The in-flight
    count of a wait is those copies less one, averaged over the waits in address order (a loop's wait also
    overlaps its own prefetches, which is what the pipelining is for)."""
    copies = [ins for ins in code if ins.base == "LDGSTS"]
    if not copies:
        return 0, 0.0, 0.0
    groups, current, in_flight = [], 0, []
    for ins in code:
        if ins.base == "LDGSTS":
            current += 1
        elif ins.base == "LDGDEPBAR":
            groups.append(current)
            current = 0
        elif ins.base == "DEPBAR" and (outstanding := _DEPBAR_GROUPS.search(ins.text)):
            sharing = groups[-(int(outstanding.group(1), 0) + 1):]
            in_flight.append(max(0, sum(sharing) - 1))
    mean_bytes = sum(load_bits(ins) for ins in copies) / len(copies) / 8
    return len(copies), mean_bytes, (sum(in_flight) / len(in_flight) if in_flight else 0.0)
