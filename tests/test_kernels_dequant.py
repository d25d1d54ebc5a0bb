"""The device dequantization kernel (Triton) against the format registry's torch rule,
bit for bit, under TRITON_INTERPRET=1 on CPU (fp32 / fp16 outputs; bf16 on a GPU): every
format, every scale dtype, stacked experts, shapes that are not multiples of the FP8 block,
every byte value (NaN codes and NaN / zero e8m0 scales included)."""

from __future__ import annotations

import pytest
import torch

from kimi_loader.errors import InvalidArgumentError

pytest.importorskip("triton")
import triton
import triton.language as tl

from kimi_loader.kernels._device import on_device
from kimi_loader.kernels.dequant import _round_bf16, dequantize, dequantize_reference
from kimi_loader.quant import quantize_int4


def _int4(lead, rows, cols, scale_dtype, g):
    parts = [
        quantize_int4(torch.randn(rows, cols, generator=g) * 0.05, group=32, scale_dtype=scale_dtype)
        for _ in range(max(1, int(torch.tensor(lead).prod()) if lead else 1))
    ]
    packed = torch.stack([p["weight_packed"] for p in parts]).reshape(*lead, rows, cols // 8)
    scale = torch.stack([p["weight_scale"] for p in parts]).reshape(*lead, rows, cols // 32)
    return {"weight_packed": packed, "weight_scale": scale}


def _mxfp4(lead, rows, cols, g):
    w = torch.randint(0, 256, (*lead, rows, cols // 2), generator=g, dtype=torch.uint8)
    s = torch.randint(100, 140, (*lead, rows, cols // 32), generator=g).to(torch.uint8)
    s.view(-1)[:2] = torch.tensor([0, 255], dtype=torch.uint8)  # 2^-127 and NaN
    return {"weight": w, "weight_scale": s}


def _fp8(lead, rows, cols, block, scale_dtype, g):
    w = torch.randint(0, 256, (*lead, rows, cols), generator=g, dtype=torch.uint8)
    w.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)  # every code, NaN included
    grid = (*lead, -(-rows // block[0]), -(-cols // block[1]))
    if scale_dtype == torch.float8_e8m0fnu:
        s = torch.randint(110, 135, grid, generator=g).to(torch.uint8).view(torch.float8_e8m0fnu)
    else:
        s = (torch.rand(grid, generator=g) * 0.01 + 1e-4).to(scale_dtype)
    return {"weight": w.view(torch.float8_e4m3fn), "weight_scale_inv": s}


def _assert_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bit for bit, except that NaNs need only be NaNs (payloads differ by decoder)."""
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    bits = {2: torch.int16, 4: torch.int32}[want.element_size()]
    assert torch.equal(got[~nan].view(bits), want[~nan].view(bits))


CASES = [
    ("ct-int4", (), 8, 64, torch.bfloat16),  # Kimi's bf16 scales
    ("ct-int4", (3,), 24, 96, torch.float16),
    ("ct-int4", (2,), 5, 128, torch.float32),
    ("quark-mxfp4", (), 7, 64, None),
    ("quark-mxfp4", (4,), 16, 96, None),
    ("fp8-block", (), 200, 300, torch.float32),  # partial blocks on both axes
    ("fp8-block", (2,), 130, 129, torch.bfloat16),
    ("fp8-block", (), 64, 256, torch.float8_e8m0fnu),  # DeepSeek-V3.1's ue8m0 scales
]


@pytest.mark.parametrize(("fmt", "lead", "rows", "cols", "scale_dtype"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_kernel_equals_the_reference_bitwise(fmt, lead, rows, cols, scale_dtype, dtype):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    block = (128, 128)
    if fmt == "ct-int4":
        tensors = _int4(list(lead), rows, cols, scale_dtype, g)
    elif fmt == "quark-mxfp4":
        tensors = _mxfp4(lead, rows, cols, g)
    else:
        tensors = _fp8(lead, rows, cols, block, scale_dtype, g)
    want = dequantize_reference(fmt, tensors, dtype, block)
    got = dequantize(fmt, tensors, dtype, block)
    assert got.shape == (*lead, rows, cols) and got.dtype == dtype
    _assert_bitwise(got, want)


def test_dequantize_kernel_checks_its_inputs():
    g = torch.Generator().manual_seed(0)
    t = _int4([], 8, 64, torch.bfloat16, g)
    with pytest.raises(InvalidArgumentError, match="scale grid"):
        dequantize("ct-int4", {**t, "weight_scale": t["weight_scale"][:4]}, torch.float32)
    with pytest.raises(InvalidArgumentError, match="needs 'weight_packed'"):
        dequantize("ct-int4", {"weight_scale": t["weight_scale"]}, torch.float32)
    with pytest.raises(InvalidArgumentError, match="bfloat16, float16 or float32"):
        dequantize("ct-int4", t, torch.int8)
    # plain formats are converted, like the reference
    w = torch.randn(4, 4).to(torch.bfloat16)
    assert torch.equal(dequantize("bf16", {"weight": w}, torch.float32), w.float())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("fmt", "lead", "rows", "cols", "scale_dtype"), CASES)
def test_dequantize_kernel_bf16_on_the_gpu(fmt, lead, rows, cols, scale_dtype):
    g = torch.Generator().manual_seed(7)
    if fmt == "ct-int4":
        tensors = _int4(list(lead), rows, cols, scale_dtype, g)
    elif fmt == "quark-mxfp4":
        tensors = _mxfp4(lead, rows, cols, g)
    else:
        tensors = _fp8(lead, rows, cols, (128, 128), scale_dtype, g)
    want = dequantize_reference(fmt, tensors, torch.bfloat16)
    got = dequantize(fmt, {k: v.cuda() for k, v in tensors.items()}, torch.bfloat16).cpu()
    _assert_bitwise(got, want)


@triton.jit
def _round_bf16_kernel(x, out, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out + i, _round_bf16(tl.load(x + i)))


def test_bf16_rounding_keeps_every_nan_a_nan():
    """The kernels' float32 -> bf16 rounding (by bits) against torch's: ties to even, and
    NaNs of any payload stay NaN. A GPU's NaN is 0x7FFFFFFF: the rounding carry made it
    -0 (and 0x7F800001 infinity), so a NaN scale dequantized to a silent -0 on a GPU."""
    bits = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001, 0xFFFF8000, 0x7F800000, 0xFF800000]
    bits += [0x3F808000, 0x3F818000, 0x3F80C000, 0x7F7FFFFF, 0x00000001, 0x80000000, 0x3F7FFFFF]
    x = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = torch.cat([x, torch.randn(50, generator=torch.Generator().manual_seed(3))])
    out = torch.full((64,), 1.0)
    with on_device("_round_bf16", x=x, out=out):
        _round_bf16_kernel[(1,)](x, out, N=64)
    want = x.to(torch.bfloat16).float()
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan), [hex(b) for b, g, w in zip(bits, out.isnan(), nan, strict=False) if g != w]
    assert torch.equal(out[~nan].view(torch.int32), want[~nan].view(torch.int32))
