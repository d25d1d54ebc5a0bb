"""A content hash of tensors in device memory, so that a GPU trainer's weight stream says
what changed without copying the weights to the host (the host's xxh3 would need them
there).

``kl64``: the bytes as little-endian 32-bit words (the last one zero-padded), each word
``w_i`` (``i`` from 1) mixed with its index, ``m_i = fmix64(w_i ^ i * 0x9E3779B97F4A7C15)``
(MurmurHash3's 64-bit finalizer), summed modulo 2^64; the tensor's hash is
``fmix64(sum ^ fmix64(nbytes + 0x27D4EB2F165667C5))``. A sum of mixed words is computed
in any order, so chunks of every tensor are hashed by independent programs of one launch
(integer operations only: the Triton interpreter computes the same values as a GPU). It
detects changes (any changed, swapped, appended or removed bytes), not adversaries: a
collision needs two different tensors whose mixed-word sums agree, ~2^-64 for weights.

:func:`hash_reference` is the same function in Python, the tests' oracle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..errors import InvalidArgumentError
from ._device import on_device

__all__ = ["ALGORITHM", "hash_reference", "hash_tensors"]

ALGORITHM = "kl64"
_M = (1 << 64) - 1
_C1, _C2, _GOLD, _SEED = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x9E3779B97F4A7C15, 0x27D4EB2F165667C5
_CHUNK = 1 << 20  # bytes of one tensor per program
_BLOCK = 1024  # words per inner step


@triton.jit
def _fmix(v, C1, C2):
    v ^= v >> 33
    v *= C1
    v ^= v >> 33
    v *= C2
    v ^= v >> 33
    return v


@triton.jit
def _hash_chunks(base, items, out, C1, C2, GOLD, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """One program: ``CHUNK`` bytes of one tensor (``items`` row: its byte offset from
    ``base``, its size, the chunk's first byte) -> the chunk's sum of mixed words."""
    i = tl.program_id(0)
    addr = tl.load(items + i * 3)
    nbytes = tl.load(items + i * 3 + 1)
    start = tl.load(items + i * 3 + 2)
    lane = tl.arange(0, 4)
    shift = (lane * 8).to(tl.uint64)
    acc = tl.zeros((BLOCK,), dtype=tl.uint64)
    for s in range(0, tl.minimum(nbytes - start, CHUNK), BLOCK * 4):
        at = start + s + tl.arange(0, BLOCK) * 4  # the first byte of each word
        offs = at[:, None] + lane[None, :]
        b = tl.load(base + addr + offs, mask=offs < nbytes, other=0).to(tl.uint64)
        word = tl.sum(b << shift[None, :], axis=1)
        index = (at // 4 + 1).to(tl.uint64)
        acc += tl.where(at < nbytes, _fmix(word ^ (index * GOLD), C1, C2), tl.zeros_like(word))
    tl.store(out + i, tl.sum(acc, axis=0).to(tl.int64, bitcast=True))


def _fmix64(v: int) -> int:
    v ^= v >> 33
    v = (v * _C1) & _M
    v ^= v >> 33
    v = (v * _C2) & _M
    return v ^ (v >> 33)


def _finish(total: int, nbytes: int) -> int:
    return _fmix64((total & _M) ^ _fmix64((nbytes + _SEED) & _M))


def hash_tensors(tensors: Sequence[torch.Tensor]) -> list[int]:
    """The ``kl64`` hash of each tensor's bytes (contiguous tensors of one device), one
    launch for all of them and one copy of their partial sums to the host."""
    if not tensors:
        return []
    devices = {t.device for t in tensors}
    if len(devices) != 1 or any(not t.is_contiguous() for t in tensors):
        raise InvalidArgumentError(
            f"hash_tensors: contiguous tensors of one device are needed, got {sorted(map(str, devices))}"
        )
    device = devices.pop()
    base = tensors[0]
    origin = base.data_ptr()
    rows: list[tuple[int, int, int]] = []
    owner: list[int] = []
    for k, t in enumerate(tensors):
        n = t.nbytes
        for start in range(0, n, _CHUNK):
            rows.append((t.data_ptr() - origin, n, start))
            owner.append(k)
    totals = [0] * len(tensors)
    if rows:
        items = torch.tensor(rows, dtype=torch.int64).to(device)
        partial = torch.empty(len(rows), dtype=torch.int64, device=device)
        base_u8 = base.view(-1).view(torch.uint8) if base.numel() else base
        with on_device("hash_tensors", tensors=base):
            _hash_chunks[(len(rows),)](base_u8, items, partial, _C1, _C2, _GOLD, CHUNK=_CHUNK, BLOCK=_BLOCK)
        sums = torch.zeros(len(tensors), dtype=torch.int64, device=device)
        sums.index_add_(0, torch.tensor(owner, device=device), partial)  # (wraps modulo 2^64)
        totals = sums.cpu().tolist()
    return [_finish(s, t.nbytes) for s, t in zip(totals, tensors, strict=True)]


def hash_reference(data: bytes) -> int:
    """``kl64`` of ``data`` in plain Python (the oracle of the kernel's tests)."""
    padded = data + b"\0" * (-len(data) % 4)
    total = 0
    for i in range(len(padded) // 4):
        w = int.from_bytes(padded[4 * i : 4 * i + 4], "little")
        total += _fmix64(w ^ (((i + 1) * _GOLD) & _M))
    return _finish(total, len(data))
