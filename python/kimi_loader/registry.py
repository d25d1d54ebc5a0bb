"""The Python side of the format registry: one :class:`Format` per checkpoint format of a
linear, holding everything the package knows about it.

| used by | what |
|---|---|
| :mod:`~kimi_loader.formats` (``ModuleFormats``, inspect) | :meth:`Format.matches`: a linear stored so? |
| :mod:`~kimi_loader.models.layout` | :attr:`Format.suffix_dtypes`, :meth:`Format.shard_shapes` |
| :mod:`~kimi_loader.parallel` | :meth:`Format.split_alignment` |
| :mod:`~kimi_loader.quant`, the runtime | :meth:`Format.dequantize` |
| :mod:`~kimi_loader.synth` | :meth:`Format.quantize`, :attr:`Format.suffixes` |

The Rust side is one ``QuantFormat`` in ``rust/core/src/quant.rs`` (stored dtypes, scale
dtypes and grid, row dequantizer). Adding a format is one entry here, one there, and
their tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ._deps import optional_import
from .errors import InvalidArgumentError

__all__ = ["FORMATS", "Format", "format_of"]


@dataclass(frozen=True)
class Format:
    """A checkpoint format of one linear ``[out, in]``."""

    name: str
    #: stored tensor suffix -> its dtype in a serving layout (``None``: the model dtype)
    suffix_dtypes: dict[str, torch.dtype | None]
    #: stored suffix -> safetensors dtypes it may have; the first suffix and its dtypes
    #: identify the format
    stored: dict[str, tuple[str, ...]]
    #: other suffixes that must be present to tell this format from another
    needed: tuple[str, ...] = ()

    #: the suffix of the stored data, and how many logical values one stored element holds
    DATA = "weight"
    PER_ELEMENT = 1

    def logical_shape(self, data_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The ``[out, in]`` of a linear whose stored data tensor has ``data_shape``."""
        return (*data_shape[:-1], data_shape[-1] * self.PER_ELEMENT) if data_shape else data_shape

    @property
    def quantized(self) -> bool:
        return self.name != "bf16"

    @property
    def suffixes(self) -> tuple[str, ...]:
        """Every tensor a linear has in a checkpoint of this format."""
        return tuple(self.stored)

    def matches(self, found: dict[str, str]) -> bool:
        """Whether a linear whose checkpoint tensors are ``found`` (suffix -> safetensors
        dtype) is stored in this format."""
        key = next(iter(self.stored))
        return found.get(key) in self.stored[key] and all(s in found for s in self.needed)

    # -- layout ------------------------------------------------------------------------------
    def local_dims(self, out: int, inp: int, split: str, tp: int) -> tuple[int, int]:
        return (out // tp if split == "column" else out), (inp // tp if split == "row" else inp)

    def shard_shapes(
        self,
        out: int,
        inp: int,
        *,
        split: str = "replicated",
        tp: int = 1,
        fp8_block: tuple[int, int] = (128, 128),
        group: int | None = None,
    ) -> dict[str, list[int]]:
        """Local shapes, per suffix, of one linear ``[out, inp]`` on one TP rank."""
        o, i = self.local_dims(out, inp, split, tp)
        return {"weight": [o, i]}

    def split_alignment(self, column: bool, *, group: int = 32, fp8_block: tuple[int, int] = (128, 128)) -> int:
        """What a TP slice of the output (``column``) or input dim must be a multiple of."""
        return 1

    # -- values ------------------------------------------------------------------------------
    def dequantize(
        self, tensors: dict[str, torch.Tensor], dtype: torch.dtype, fp8_block: tuple[int, int] = (128, 128)
    ) -> torch.Tensor:
        return tensors["weight"].to(dtype)

    def quantize(
        self, w: torch.Tensor, g: torch.Generator, *, fp8_block: tuple[int, int] = (128, 128), group: int = 32
    ) -> dict[str, torch.Tensor]:
        """``w`` float32 ``[n, out, in]`` (n stacked linears) -> suffix -> stacked tensor in
        this format (the reference packers; synthetic checkpoints use them)."""
        return {"weight": w.to(torch.bfloat16)}


class _PerGroup(Format):
    """A format with one scale per ``group`` input columns: its data tensor packs
    ``PER_ELEMENT`` values per stored element."""

    def shard_shapes(self, out, inp, *, split="replicated", tp=1, fp8_block=(128, 128), group=None):
        o, i = self.local_dims(out, inp, split, tp)
        return {self.DATA: [o, i // self.PER_ELEMENT], "weight_scale": [o, i // (group or 32)]}

    def split_alignment(self, column, *, group=32, fp8_block=(128, 128)):
        return 1 if column else group


class _Int4(_PerGroup):
    DATA, PER_ELEMENT = "weight_packed", 8

    def dequantize(self, tensors, dtype, fp8_block=(128, 128)):
        from .quant import dequant_int4

        return dequant_int4(tensors["weight_packed"], tensors["weight_scale"], dtype)

    def quantize(self, w, g, *, fp8_block=(128, 128), group=32):
        helpers = optional_import(
            "compressed_tensors.compressors.pack_quantized.helpers", "synth", "synthetic ct-int4 checkpoints"
        )
        pack_to_int32 = helpers.pack_to_int32

        n, out, inp = w.shape
        if inp % group:
            raise InvalidArgumentError(f"ct-int4 needs input dims divisible by {group}, got {inp}")
        groups = w.reshape(n, out, inp // group, group)
        scale = (groups.abs().amax(-1) / 7.0).clamp(min=1e-6).to(torch.bfloat16)
        q = torch.round(groups / scale.float().unsqueeze(-1)).clamp(-8, 7).to(torch.int8)
        packed = pack_to_int32(q.reshape(n * out, inp), num_bits=4).reshape(n, out, inp // 8)
        shape = torch.tensor([out, inp], dtype=torch.int32).expand(n, 2).contiguous()
        return {"weight_packed": packed, "weight_scale": scale.contiguous(), "weight_shape": shape}


class _Mxfp4(_PerGroup):
    DATA, PER_ELEMENT = "weight", 2

    def dequantize(self, tensors, dtype, fp8_block=(128, 128)):
        from .quant import dequant_mxfp4

        return dequant_mxfp4(tensors["weight"], tensors["weight_scale"], dtype)

    def quantize(self, w, g, *, fp8_block=(128, 128), group=32):
        from .formats import E2M1_VALUES, pack_mxfp4

        n, out, inp = w.shape
        if inp % group:
            raise InvalidArgumentError(f"MXFP4 needs input dims divisible by {group}, got {inp}")
        codes = torch.randint(0, 16, (n * out, inp), generator=g)
        packed = pack_mxfp4(E2M1_VALUES[codes]).reshape(n, out, inp // 2)
        # e8m0 scales 2^-7 .. 2^-4: dequantized magnitudes like a real layer's weights
        scale = torch.randint(120, 124, (n, out, inp // group), generator=g).to(torch.uint8)
        return {"weight": packed, "weight_scale": scale}


class _Fp8Block(Format):
    def shard_shapes(self, out, inp, *, split="replicated", tp=1, fp8_block=(128, 128), group=None):
        o, i = self.local_dims(out, inp, split, tp)
        so, si = math.ceil(out / fp8_block[0]), math.ceil(inp / fp8_block[1])
        return {
            "weight": [o, i],
            "weight_scale_inv": [so // tp if split == "column" else so, si // tp if split == "row" else si],
        }

    def split_alignment(self, column, *, group=32, fp8_block=(128, 128)):
        return fp8_block[0] if column else fp8_block[1]

    def dequantize(self, tensors, dtype, fp8_block=(128, 128)):
        from .quant import dequant_fp8_block

        return dequant_fp8_block(tensors["weight"], tensors["weight_scale_inv"], fp8_block, dtype)

    def quantize(self, w, g, *, fp8_block=(128, 128), group=32):
        n, out, inp = w.shape
        bo, bi = fp8_block
        ob, ib = math.ceil(out / bo), math.ceil(inp / bi)
        padded = torch.zeros(n, ob * bo, ib * bi)
        padded[:, :out, :inp] = w
        blocks = padded.reshape(n, ob, bo, ib, bi)
        scale_inv = (blocks.abs().amax(dim=(2, 4)) / 448.0).clamp(min=1e-12)
        q = (blocks / scale_inv[:, :, None, :, None]).reshape(n, ob * bo, ib * bi)[:, :out, :inp]
        return {"weight": q.to(torch.float8_e4m3fn).contiguous(), "weight_scale_inv": scale_inv.contiguous()}


#: every format, by name (the order is the order of ``QUANT_FORMATS``)
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("bf16", {"weight": None}, {"weight": ("BF16", "F16", "F32")}),
        _Fp8Block(
            "fp8-block",
            {"weight": torch.float8_e4m3fn, "weight_scale_inv": torch.float32},
            {"weight": ("F8_E4M3",), "weight_scale_inv": ("F32", "BF16", "F16", "F8_E8M0")},
        ),
        _Int4(
            "ct-int4",
            {"weight_packed": torch.int32, "weight_scale": torch.bfloat16, "weight_shape": torch.int32},
            {"weight_packed": ("I32",), "weight_scale": ("BF16", "F16", "F32"), "weight_shape": ("I32", "I64")},
        ),
        _Mxfp4(
            "quark-mxfp4",
            {"weight": torch.uint8, "weight_scale": torch.uint8},
            {"weight": ("U8",), "weight_scale": ("U8", "F8_E8M0")},
            needed=("weight_scale",),
        ),
    )
}


def format_of(name: Any) -> Format:
    """The :class:`Format` called ``name`` (an :class:`InvalidArgumentError` otherwise)."""
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise InvalidArgumentError(f"unknown format {name!r}; choose from {list(FORMATS)}") from None
