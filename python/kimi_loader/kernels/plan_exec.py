"""The device executor: a copy plan's ops as batched Triton kernels.

Every op writes rows ``r0..r1`` x columns ``c0..c1`` of its source, contiguous, at a byte
offset of its destination (``kimi_loader_core::exec::op_table``). The ops of one kind run
in one launch over a descriptor table (one row per op: source address, row bytes, the
row and column ranges, destination address); a program copies a block of rows of one op.
Addresses are passed as byte offsets from one base tensor, so any number of source and
destination tensors are reached from one kernel argument.

Copy ops move bytes; convert ops load in the source dtype and store in the destination
dtype (round to nearest even, as the CPU executor). Dequantizing ops have no kernel yet:
a plan with them is refused before anything runs (:class:`UnsupportedFormatError`).
Reference: the Rust CPU executor (``Plan.execute``), equal bit for bit in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import _core
from ..errors import InvalidArgumentError

__all__ = ["execute"]

_COLS = _core.OP_TABLE_COLS
_ROWS = 16  # rows of one op per program
_BLOCK = 256  # elements per inner step

_kernels: dict[str, Any] = {}


def _build() -> dict[str, Any]:
    if _kernels:
        return _kernels
    import triton
    import triton.language as tl

    @triton.jit
    def copy_ops(base, table, COLS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        op = tl.program_id(0)
        rb = tl.program_id(1)
        row = table + op * COLS
        src = tl.load(row + 1)
        stride = tl.load(row + 2)
        r0 = tl.load(row + 3)
        r1 = tl.load(row + 4)
        c0 = tl.load(row + 5)
        c1 = tl.load(row + 6)
        es = tl.load(row + 7)
        dst = tl.load(row + 10)
        nbytes = (c1 - c0) * es
        first = r0 + rb * ROWS
        last = tl.minimum(first + ROWS, r1)
        offs = tl.arange(0, BLOCK)
        for r in range(first, last):
            s = src + r * stride + c0 * es
            d = dst + (r - r0) * nbytes
            for start in range(0, nbytes, BLOCK):
                m = start + offs < nbytes
                v = tl.load(base + s + start + offs, mask=m)
                tl.store(base + d + start + offs, v, mask=m)

    @triton.jit
    def convert_ops(
        base, table, SRC: tl.constexpr, DST: tl.constexpr, COLS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr
    ):
        op = tl.program_id(0)
        rb = tl.program_id(1)
        row = table + op * COLS
        src = tl.load(row + 1)
        stride = tl.load(row + 2)
        r0 = tl.load(row + 3)
        r1 = tl.load(row + 4)
        c0 = tl.load(row + 5)
        c1 = tl.load(row + 6)
        es = tl.load(row + 7)
        os = tl.load(row + 8)
        dst = tl.load(row + 10)
        n = c1 - c0
        first = r0 + rb * ROWS
        last = tl.minimum(first + ROWS, r1)
        offs = tl.arange(0, BLOCK)
        for r in range(first, last):
            sp = (base + src + r * stride + c0 * es).to(tl.pointer_type(SRC))
            dp = (base + dst + (r - r0) * n * os).to(tl.pointer_type(DST))
            for start in range(0, n, BLOCK):
                m = start + offs < n
                v = tl.load(sp + start + offs, mask=m)
                tl.store(dp + start + offs, v.to(DST), mask=m)

    _kernels.update(copy=copy_ops, convert=convert_ops, tl=tl)
    return _kernels


def _dtype(code: int, tl: Any) -> Any:
    return {1: tl.bfloat16, 2: tl.float16, 3: tl.float32}[code]


def execute(plan: Any, which: list[int], dests: Sequence[torch.Tensor | None]) -> None:
    """Runs the ops ``which`` of ``plan`` (built against a checkpoint of tensors handed
    over in memory, :func:`kimi_loader._core.from_tensors`) into ``dests`` (the plan's
    destinations by index), on the device the destinations are on. Every destination an
    op writes must be given, contiguous, and of the plan's size; checked before a launch."""
    if not which:
        return
    table = torch.frombuffer(bytearray(plan.op_table(which)), dtype=torch.int64).view(-1, _COLS).clone()
    dest_ids = table[:, 9].tolist()
    devices = set()
    for d in set(dest_ids):
        t = dests[d] if d < len(dests) else None
        if t is None or not t.is_contiguous():
            raise InvalidArgumentError(f"destination {d} of the plan: a contiguous tensor is needed")
        devices.add(t.device)
    if len(devices) != 1:
        raise InvalidArgumentError(f"the destinations are on several devices: {sorted(map(str, devices))}")
    device = devices.pop()
    base = dests[dest_ids[0]]
    assert base is not None
    base_u8 = base.view(-1).view(torch.uint8) if base.numel() else base
    origin = base.data_ptr()
    addr = torch.tensor([dests[d].data_ptr() for d in dest_ids], dtype=torch.int64)  # type: ignore[union-attr]
    table[:, 1] -= origin
    table[:, 10] = addr + table[:, 10] - origin
    k = _build()
    tl = k["tl"]
    rows = (table[:, 4] - table[:, 3]).max().item()
    grid_rows = -(-int(rows) // _ROWS)
    kinds = table[:, 0]
    copies = table[kinds == 0]
    if len(copies):
        t = copies.contiguous().to(device)
        k["copy"][(len(copies), grid_rows)](base_u8, t, COLS=_COLS, ROWS=_ROWS, BLOCK=_BLOCK)
    converts = table[kinds == 1]
    for conv in sorted(set(converts[:, 11].tolist())):
        sel = converts[converts[:, 11] == conv].contiguous().to(device)
        src, dst = _dtype(conv >> 8, tl), _dtype(conv & 0xFF, tl)
        k["convert"][(len(sel), grid_rows)](base_u8, sel, SRC=src, DST=dst, COLS=_COLS, ROWS=_ROWS, BLOCK=_BLOCK)
