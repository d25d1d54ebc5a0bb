"""Quantize-on-sync's quantizers against the libraries that define the formats:
compressed-tensors (int4 symmetric group quantizer, MXFP4), transformers' FineGrainedFP8
weight quantization, and the published Kimi int4 QAT rule."""

from __future__ import annotations

import pytest
import torch

import kimi_loader
from kimi_loader.quant import (
    dequant_int4,
    dequant_mxfp4,
    quantize_fp8_block,
    quantize_int4,
    quantize_mxfp4,
    unpack_int4,
)


def _weights(out: int, inp: int, seed: int, dtype=torch.bfloat16) -> list[torch.Tensor]:
    """Random weights plus the edge cases: an all-zero group, ties of the absmax (+m and
    -m in one group), tiny and subnormal values, exact rounding ties."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[0, :32] = 0.0  # an all-zero group
    w[1, :32] = 0.0
    w[1, 3], w[1, 7] = 0.25, -0.25  # absmax tie, opposite signs
    w[2, :32] = torch.linspace(-1e-38, 1e-38, 32)  # subnormals in float32
    w[3, :32] = torch.arange(32) * 0.5 - 8  # many exact .5 ties after scaling
    w[4, :32] = 1e-7
    # every E2M1 rounding tie, unscaled (absmax 6 -> shared scale 1)
    ties = [6, 5, -5, 3.5, -3.5, 2.5, -2.5, 1.75, -1.75, 1.25, -1.25, 0.75, -0.75, 0.25, -0.25, 5.5]
    w[5, :16] = torch.tensor(ties, dtype=torch.float32)
    w[5, 16:32] = 0.0
    return [w.to(dtype), (torch.randn(out, inp, generator=g) * 3).to(dtype)]


def _ct_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' own path, as its compressor runs it: min/max qparams, then its
    quantize() in the weight's dtype, int8 out."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    gw = w.float().reshape(w.shape[0], -1, 32)
    scale, zp = calculate_qparams(gw.amin(-1), gw.amax(-1), args)
    scale = scale.to(w.dtype)
    q = quantize(w, scale, zp.to(w.dtype), args, dtype=torch.int8)
    return q, scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_compressed_tensors_rule_is_bit_exact(dtype):
    for w in _weights(8, 128, 0, dtype):
        ours = quantize_int4(w, group=32, rule="compressed-tensors", scale_dtype=dtype)
        q, scale = _ct_int4(w)
        assert torch.equal(ours["weight_scale"], scale)
        assert torch.equal(unpack_int4(ours["weight_packed"]), q)
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        assert torch.equal(ours["weight_packed"], pack_to_int32(q, num_bits=4))
        assert ours["weight_shape"].tolist() == [8, 128]


def test_int4_qat_rule_follows_the_published_formula():
    for w in _weights(8, 64, 1):
        ours = quantize_int4(w, group=32, rule="int4-qat")
        gf = w.float().reshape(8, 2, 32)
        scale = (gf.abs().amax(-1) / 7).clamp(min=1e-5)
        assert torch.equal(ours["weight_scale"], scale.to(torch.bfloat16))
        q = unpack_int4(ours["weight_packed"]).reshape(8, 2, 32)
        want = torch.round(gf / ours["weight_scale"].float().unsqueeze(-1)).clamp(-7, 7)
        assert torch.equal(q.float(), want) and q.min() >= -7
        # dequantized = q * stored scale, what the server computes
        assert torch.equal(
            dequant_int4(ours["weight_packed"], ours["weight_scale"], torch.float32),
            (want * ours["weight_scale"].float().unsqueeze(-1)).reshape(8, 64).to(torch.bfloat16).float(),
        )


def test_mxfp4_is_bit_exact_with_compressed_tensors():
    from compressed_tensors.compressors.mx_utils import compress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(
        num_bits=4, type="float", symmetric=True, strategy="group", group_size=32, scale_dtype=torch.uint8
    )
    for w in _weights(8, 128, 2):
        ours = quantize_mxfp4(w)
        gw = w.float().reshape(8, -1, 32)
        scale, _ = calculate_qparams(gw.amin(-1), gw.amax(-1), args)
        q = quantize(w.float(), scale, None, args)
        assert torch.equal(ours["weight_scale"], compress_mx_scale(scale, torch.uint8))
        assert torch.equal(ours["weight"], pack_fp4_to_uint8(q))
        # and Quark-style dequantization of ours gives CT's fake-quantized values
        assert torch.equal(
            dequant_mxfp4(ours["weight"], ours["weight_scale"], torch.float32),
            (q * scale.repeat_interleave(32, -1)).float(),
        )


@pytest.mark.parametrize("fmt", ["float", "ue8m0"])
def test_fp8_block_is_bit_exact_with_transformers(fmt):
    from types import SimpleNamespace

    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    op = Fp8Quantize(SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=(128, 128), scale_fmt=fmt)))
    for w in _weights(256, 384, 3):
        want = op._quantize_one("x.weight", w)
        scale_dtype = want["x.weight_scale_inv"].dtype
        ours = quantize_fp8_block(w, block=(128, 128), scale_dtype=scale_dtype)
        assert torch.equal(ours["weight"].view(torch.uint8), want["x.weight"].view(torch.uint8))
        assert torch.equal(ours["weight_scale_inv"].view(torch.uint8), want["x.weight_scale_inv"].view(torch.uint8))


def test_nan_and_bad_shapes_are_refused_naming_the_tensor():
    w = torch.randn(4, 64)
    w[2, 5] = float("nan")
    for fn in (
        lambda: quantize_int4(w, group=32, what="a.weight"),
        lambda: quantize_mxfp4(w, what="a.weight"),
        lambda: quantize_fp8_block(w, what="a.weight"),
    ):
        with pytest.raises(kimi_loader.InvalidArgumentError, match=r"a\.weight.*NaN"):
            fn()
    with pytest.raises(kimi_loader.InvalidArgumentError, match="multiple of the group"):
        quantize_int4(torch.randn(4, 40), group=32, what="b.weight")
    with pytest.raises(kimi_loader.InvalidArgumentError, match="rule"):
        quantize_int4(torch.randn(4, 64), group=32, rule="gptq")


def _hard_weights(out: int, inp: int, seed: int) -> torch.Tensor:
    """Values over a wide range of magnitudes, rows whose quotients land exactly on
    rounding ties and on the clamp bounds, zeros of both signs and subnormals."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.exp2(torch.randint(-30, 30, (out, 1), generator=g).float())
    w[0] = torch.arange(inp) % 17 - 8.0  # integer quotients and ties, absmax 8 -> scale 8/7.5 or 8/7
    w[1] = (torch.arange(inp) % 31 - 15) * 0.5
    w[2] = -0.0
    w[3, ::2] = 1e-40
    w[4] = torch.rand(inp, generator=g) * 1e-3 - 5e-4
    return w


@pytest.mark.parametrize("rule", ["compressed-tensors", "int4-qat"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_rust_quantizer_equals_the_torch_reference(rule, dtype, scale_dtype):
    from kimi_loader.quant import quantize_int4_torch

    for seed, (out, inp, group) in enumerate([(64, 256, 32), (7, 96, 32), (33, 128, 64), (5, 16, 8), (6, 2048, 128)]):
        w = _hard_weights(out, inp, seed).to(dtype)
        ours = quantize_int4(w, group=group, rule=rule, scale_dtype=scale_dtype, what="x.weight")
        ref = quantize_int4_torch(w, group=group, rule=rule, scale_dtype=scale_dtype, what="x.weight")
        assert ours.keys() == ref.keys()
        for k in ref:
            assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
            assert torch.equal(ours[k].view(torch.uint8), ref[k].view(torch.uint8)), (k, out, inp, group)


def test_rust_quantizer_refuses_what_it_cannot_take():
    with pytest.raises(kimi_loader.InvalidArgumentError, match=r"c\.weight.*inf"):
        w = torch.zeros(3, 64, dtype=torch.bfloat16)
        w[1, 9] = float("inf")
        quantize_int4(w, group=32, what="c.weight")
    # non-contiguous and float16 weights take the torch path and give the same bytes
    w = torch.randn(64, 16).t()
    a = quantize_int4(w, group=32)
    assert torch.equal(a["weight_packed"], quantize_int4(w.contiguous(), group=32)["weight_packed"])
    h = torch.randn(4, 64).half()
    assert torch.equal(quantize_int4(h, group=32)["weight_scale"], quantize_int4(h.float(), group=32)["weight_scale"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rust_mxfp4_quantizer_equals_the_torch_reference(dtype):
    from kimi_loader.quant import quantize_mxfp4_torch

    for seed, (out, inp, group) in enumerate([(64, 256, 32), (9, 96, 32), (10, 128, 64), (8, 16, 16)]):
        w = _hard_weights(out, inp, seed)
        w[5] = torch.linspace(-1, 1, inp) * 3e38  # absmax rounds up past the largest exponent: e8m0 255
        w[6] = torch.linspace(-2e-38, 2e-38, inp)  # the smallest scales (e8m0 0, a subnormal 2^-127)
        w[7, : inp // 2] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]).repeat(inp // 16)  # ties
        w = w.to(dtype)
        ours = quantize_mxfp4(w, group=group, what="m.weight")
        ref = quantize_mxfp4_torch(w, group=group, what="m.weight")
        assert torch.equal(ours["weight_scale"], ref["weight_scale"]), (out, inp, group)
        assert torch.equal(ours["weight"], ref["weight"]), (out, inp, group)
    assert {0, 255} <= set(quantize_mxfp4(w.float(), group=group)["weight_scale"].unique().tolist())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rust_fp8_block_quantizer_equals_the_torch_reference(dtype):
    from kimi_loader.quant import quantize_fp8_block_torch

    # e4m3fn ties (scale 1: the tile's absmax is 448), normal and subnormal, both signs
    ties = [448.0, 1.0625, 1.1875, 400.0, 2**-10, 3 * 2**-10, 15 * 2**-10, -0.0]
    ties = torch.tensor(ties + [-t for t in ties])
    for seed, (out, inp, block) in enumerate([(256, 384, (128, 128)), (100, 200, (64, 32)), (12, 48, (4, 16))]):
        w = _hard_weights(out, inp, seed)
        w[8:12, :16] = ties
        w = w.to(dtype)
        ours = quantize_fp8_block(w, block=block, what="f.weight")
        ref = quantize_fp8_block_torch(w, block=block, what="f.weight")
        assert torch.equal(ours["weight_scale_inv"], ref["weight_scale_inv"]), (out, inp, block)
        assert torch.equal(ours["weight"].view(torch.uint8), ref["weight"].view(torch.uint8)), (out, inp, block)
    codes = ours["weight"].view(torch.uint8)[8, :16].tolist()
    assert codes[:8] == [0x7E, 0x38, 0x3A, 0x7C, 0x00, 0x02, 0x08, 0x80]  # ties went to the even code
