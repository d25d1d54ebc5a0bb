"""The device executor: a copy plan's ops as batched Triton kernels.

Every op writes rows ``r0..r1`` x columns ``c0..c1`` of its source, contiguous, at a byte
offset of its destination (``kimi_loader_core::exec::op_table``). The ops of one kind run
in one launch over a descriptor table (one row per op: source address, row bytes, the
row and column ranges, destination address); a program moves a block of 16 rows of one
op in tiles of ``TILE`` rows x 256 columns (:func:`_tile_rows`: 4 rows on a GPU, 16 in
the interpreter), and each launch has as many row blocks as its tallest op needs.
Addresses are passed as byte offsets from one base tensor, so any number of source and
destination tensors are reached from one kernel argument.

Copy ops move bytes; convert ops load in the source dtype and store in the destination
dtype (round to nearest even, as the CPU executor); dequantizing ops read the stored
data (ct-int4 / MXFP4 nibbles, FP8 e4m3 bytes) and their scales and compute exactly what
the CPU executor computes: ct-int4 ``(q - 8) * scale`` in float32 rounded to the scale's
dtype, MXFP4 ``e2m1 * 2^(e - 127)``, FP8 ``e4m3 * scale_inv`` in float32. The bf16 and
fp8 decodes are done with integer bit operations (exact everywhere, the Triton
interpreter included). Reference: the Rust CPU executor (``Plan.execute``), equal bit for
bit in the tests.

:func:`stage` runs ops into a device arena instead (their output bytes, nothing else) and
:func:`commit` copies staged outputs into the destinations in one batched launch: the
all-or-nothing streamed update of a model on the device (``Plan.stage`` / ``Plan.commit``
on the host).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .. import _core
from ..errors import InvalidArgumentError, UnsupportedFormatError
from ._device import on_device

# the helpers _scale_at calls are imported too: the Triton interpreter resolves the names
# of nested jit calls in the launching kernel's module
from .dequant import EXACT, _e2m1, _e4m3, _int4_value, _scale_at

__all__ = ["Staged", "commit", "execute", "stage"]

_COLS = _core.OP_TABLE_COLS
_ROWS = 16  # rows of one op per program
_BLOCK = 256  # columns per step (bytes, for copies): a step moves a TILE x _BLOCK tile
#: the most rows one op may have: a launch's second grid axis is an op's blocks of _ROWS
#: rows, and CUDA allows 65535 blocks there (the interpreter has no such limit; the check
#: holds everywhere, so what passes on CPU passes on a GPU)
MAX_OP_ROWS = 65535 * _ROWS


def _tile_rows(device: torch.device) -> int:
    """Rows of one step. On a GPU 4: a 4 x 256 tile keeps the dequantizing kernels at ~80
    registers a thread (4 warps), where 16 x 256 needs 255 and spills (ptxas for sm_90).
    On CPU tensors (the Triton interpreter) all 16 at once: numpy moves a whole tile per
    step, and a step's fixed cost is what the interpreter spends its time on."""
    return _ROWS if device.type == "cpu" else 4


@triton.jit
def _descriptor(table, COLS: tl.constexpr, ROWS: tl.constexpr):
    """This program's op (axis 0) from the descriptor table, and its block of rows (axis
    1): ``(row pointer, src, stride, r0, c0, c1, src elem bytes, dst elem bytes, dst,
    first row, end row)``."""
    row = table + tl.program_id(0) * COLS
    r0 = tl.load(row + 3)
    first = r0 + tl.program_id(1) * ROWS
    last = tl.minimum(first + ROWS, tl.load(row + 4))
    return (
        row,
        tl.load(row + 1),
        tl.load(row + 2),
        r0,
        tl.load(row + 5),
        tl.load(row + 6),
        tl.load(row + 7),
        tl.load(row + 8),
        tl.load(row + 10),
        first,
        last,
    )


@triton.jit
def copy_ops(base, table, COLS: tl.constexpr, ROWS: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    _row, src, stride, r0, c0, c1, es, _os, dst, first, last = _descriptor(table, COLS, ROWS)
    nbytes = (c1 - c0) * es
    offs = tl.arange(0, BLOCK)[None, :]
    for t in range(first, last, TILE):
        r = t + tl.arange(0, TILE)[:, None]
        live = r < last
        s = base + src + r * stride + c0 * es
        d = base + dst + (r - r0) * nbytes
        for start in range(0, nbytes, BLOCK):
            m = live & (start + offs < nbytes)
            v = tl.load(s + start + offs, mask=m)
            tl.store(d + start + offs, v, mask=m)


@triton.jit
def convert_ops(
    base,
    table,
    SRC: tl.constexpr,
    DST: tl.constexpr,
    COLS: tl.constexpr,
    ROWS: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    _row, src, stride, r0, c0, c1, es, os, dst, first, last = _descriptor(table, COLS, ROWS)
    n = c1 - c0
    offs = tl.arange(0, BLOCK)[None, :]
    for t in range(first, last, TILE):
        r = t + tl.arange(0, TILE)[:, None]
        live = r < last
        sp = (base + src + r * stride + c0 * es).to(tl.pointer_type(SRC))
        dp = (base + dst + (r - r0) * n * os).to(tl.pointer_type(DST))
        for start in range(0, n, BLOCK):
            m = live & (start + offs < n)
            v = tl.load(sp + start + offs, mask=m)
            tl.store(dp + start + offs, v.to(DST), mask=m)


@triton.jit
def dequant_ops(
    base,
    table,
    FMT: tl.constexpr,
    SDT: tl.constexpr,
    DST: tl.constexpr,
    COLS: tl.constexpr,
    ROWS: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row, src, stride, r0, c0, c1, _es, os, dst, first, last = _descriptor(table, COLS, ROWS)
    sc = tl.load(row + 12)
    srow = tl.load(row + 13)
    br = tl.load(row + 14)
    bc = tl.load(row + 15)
    n = c1 - c0
    offs = tl.arange(0, BLOCK)[None, :]
    for t in range(first, last, TILE):
        r = t + tl.arange(0, TILE)[:, None]
        live = r < last
        dp = (base + dst + (r - r0) * n * os).to(tl.pointer_type(DST))
        sp = base + src + r * stride
        srow_at = base + sc + (r // br) * srow
        for start in range(0, n, BLOCK):
            m = live & (start + offs < n)
            c = c0 + start + offs
            if FMT == 3:
                b = tl.load(sp + c, mask=m, other=0)
                w = _e4m3(b)
            else:
                byte = tl.load(sp + c // 2, mask=m, other=0).to(tl.int32)
                code = (byte >> ((c % 2) * 4)) & 0xF
            s = _scale_at(srow_at, c // bc, m, SDT)
            if FMT == 1:
                v = _int4_value(code, s, SDT)
            elif FMT == 2:
                v = _e2m1(code) * s
            else:
                v = w * s
            tl.store(dp + start + offs, v.to(DST), mask=m)


def _dtype(code: int) -> Any:
    return {1: tl.bfloat16, 2: tl.float16, 3: tl.float32}[code]


def _table(plan: Any, which: list[int], dests: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, torch.device]:
    """The descriptor table of ops ``which`` with absolute addresses (sources, scales and
    destinations), and the destinations' device; every destination checked."""
    table = torch.frombuffer(bytearray(plan.op_table(which)), dtype=torch.int64).view(-1, _COLS).clone()
    tall = ((table[:, 4] - table[:, 3]) > MAX_OP_ROWS).nonzero()
    if len(tall):  # (a 1-D tensor is one element a row)
        k = int(tall[0])
        src, dest = plan.op_sources()[which[k]][0], plan.ops()[which[k]][1]
        raise UnsupportedFormatError(
            f"tensor '{src}' -> '{dest}': {int(table[k, 4] - table[k, 3])} rows, more than the device executor's "
            f"{MAX_OP_ROWS} an op (65535 blocks of {_ROWS}: CUDA's grid limit)",
            tensor=src,
        )
    dest_ids = table[:, 9].tolist()
    devices = set()
    for d in set(dest_ids):
        t = dests[d] if d < len(dests) else None
        if t is None or not t.is_contiguous():
            raise InvalidArgumentError(f"destination {d} of the plan: a contiguous tensor is needed")
        devices.add(t.device)
    if len(devices) != 1:
        raise InvalidArgumentError(f"the destinations are on several devices: {sorted(map(str, devices))}")
    given = [dests[d] for d in dest_ids]
    size = torch.tensor([t.nbytes for t in given], dtype=torch.int64)  # type: ignore[union-attr]
    elem = torch.tensor([t.element_size() for t in given], dtype=torch.int64)  # type: ignore[union-attr]
    end = table[:, 10] + _out_bytes(table)
    bad = ((end > size) | (elem != table[:, 8])).nonzero()
    if len(bad):
        k = int(bad[0])
        raise InvalidArgumentError(
            f"destination {dest_ids[k]} of the plan: {int(size[k])} bytes of {int(elem[k])}-byte elements, "
            f"an op writes up to byte {int(end[k])} in {int(table[k, 8])}-byte elements"
        )
    table[:, 10] += torch.tensor([t.data_ptr() for t in given], dtype=torch.int64)  # type: ignore[union-attr]
    return table, devices.pop()


def _out_bytes(table: torch.Tensor) -> torch.Tensor:
    """The bytes each op writes: its rows x columns in destination elements."""
    return (table[:, 4] - table[:, 3]) * (table[:, 6] - table[:, 5]) * table[:, 8]


def _run(table: torch.Tensor, device: torch.device, base: torch.Tensor) -> None:
    """Launches the ops of ``table`` (absolute addresses) on ``device``: one launch per op
    kind, addresses passed as byte offsets from ``base``."""
    tile = _tile_rows(device)
    origin = base.data_ptr()
    table = table.clone()
    table[:, 1] -= origin
    table[:, 10] -= origin
    table[:, 12] = torch.where(table[:, 0] == 2, table[:, 12] - origin, table[:, 12])
    base_u8 = base.view(-1).view(torch.uint8) if base.numel() else base

    def launch(kernel, sel: torch.Tensor, **meta) -> None:
        # as many row blocks as the launch's tallest op needs
        grid_rows = -(-int((sel[:, 4] - sel[:, 3]).max()) // _ROWS)
        with on_device("the device executor", destinations=base):
            kernel[(len(sel), grid_rows)](
                base_u8, sel.contiguous().to(device), COLS=_COLS, ROWS=_ROWS, TILE=tile, BLOCK=_BLOCK, **meta, **EXACT
            )

    kinds = table[:, 0]
    copies = table[kinds == 0]
    if len(copies):
        launch(copy_ops, copies)
    converts = table[kinds == 1]
    for conv in sorted(set(converts[:, 11].tolist())):
        launch(convert_ops, converts[converts[:, 11] == conv], SRC=_dtype(conv >> 8), DST=_dtype(conv & 0xFF))
    deq = table[kinds == 2]
    for f, sdt, to in sorted({(f, sdt, to) for f, sdt, to in deq[:, [16, 17, 11]].tolist()}):
        sel = deq[(deq[:, 16] == f) & (deq[:, 17] == sdt) & (deq[:, 11] == to)]
        launch(dequant_ops, sel, FMT=f, SDT=sdt, DST=_dtype(to))


def execute(plan: Any, which: list[int], dests: Sequence[torch.Tensor | None]) -> None:
    """Runs the ops ``which`` of ``plan`` (built against a checkpoint of tensors handed
    over in memory, :func:`kimi_loader._core.from_tensors`) into ``dests`` (the plan's
    destinations by index), on the device the destinations are on. Every destination an
    op writes must be given, contiguous, of the plan's element size and large enough for
    every op's range; all checked before the first launch."""
    if not which:
        return
    table, device = _table(plan, which, dests)
    _run(table, device, dests[int(table[0, 9])])  # type: ignore[arg-type]


@dataclass
class Staged:
    """The outputs of some ops, held in a device arena until :func:`commit` copies them
    into their destinations. ``rows``: one row per op, ``(arena address, rows, row bytes,
    destination address)``."""

    arena: torch.Tensor
    rows: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.arena.numel()


def stage(plan: Any, which: list[int], dests: Sequence[torch.Tensor | None]) -> Staged:
    """:func:`execute` with every op's output written into a fresh arena on the
    destinations' device instead (the destinations are checked, never written): the
    arena is the ops' output bytes (each 16-byte aligned), this rank's part only."""
    if not which:
        return Staged(torch.empty(0, dtype=torch.uint8), torch.empty(0, 4, dtype=torch.int64))
    table, device = _table(plan, which, dests)
    nbytes = _out_bytes(table)
    padded = (nbytes + 15) // 16 * 16
    offsets = torch.cumsum(padded, 0) - padded
    arena = torch.empty(max(int(padded.sum()), 1), dtype=torch.uint8, device=device)
    row_bytes = (table[:, 6] - table[:, 5]) * table[:, 8]
    at = arena.data_ptr() + offsets
    rows = torch.stack([at, table[:, 4] - table[:, 3], row_bytes, table[:, 10]], dim=1)
    table[:, 10] = at
    _run(table, device, arena)
    return Staged(arena, rows)


def commit(staged: Sequence[Staged]) -> None:
    """Copies staged outputs into their destinations: one batched copy launch for all of
    them (a row of bytes per row of each op)."""
    parts = [s for s in staged if len(s.rows)]
    if not parts:
        return
    rows = torch.cat([s.rows for s in parts])
    table = torch.zeros(len(rows), _COLS, dtype=torch.int64)
    table[:, 1] = rows[:, 0]  # source: the arena
    table[:, 2] = rows[:, 2]  # stride: a row
    table[:, 4] = rows[:, 1]  # rows 0..n
    table[:, 6] = rows[:, 2]  # columns: the row's bytes
    table[:, 7] = table[:, 8] = 1  # bytes
    table[:, 10] = rows[:, 3]
    _run(table, parts[0].arena.device, parts[0].arena)
