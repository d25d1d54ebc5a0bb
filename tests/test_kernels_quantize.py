"""The device quantizers (Triton) against the torch references of quantize-on-sync, bit
for bit, under TRITON_INTERPRET=1 on CPU tensors: ct-int4 (both rules, bf16 / fp16 / fp32
scales), MXFP4 and FP8-block (float32 scales), from bf16 / fp16 / fp32 weights (the
kernels read bf16 as bits, so the interpreter computes what a GPU does), on the edge
values the Rust quantizers are tested on: rounding ties, clamp bounds, signed zeros,
subnormals, all-zero groups, e8m0 0 and 255 groups, partial FP8 tiles. Non-finite weights
are refused naming the tensor."""

from __future__ import annotations

import pytest
import torch

from kimi_loader.errors import InvalidArgumentError

pytest.importorskip("triton")
from test_quantize import _hard_weights, _weights

from kimi_loader import quant
from kimi_loader.kernels import quantize as kq

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _weight(out: int, inp: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    w = _hard_weights(out, inp, seed)
    if out > 8 and inp % 16 == 0:
        w[5] = torch.linspace(-1, 1, inp) * 3e38  # MXFP4: absmax past the largest exponent (e8m0 255)
        w[6] = torch.linspace(-2e-38, 2e-38, inp)  # the smallest scales (e8m0 0)
        w[7, : inp // 2] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]).repeat(inp // 16)
    if dtype == torch.float16:
        w = w.clamp(-6e4, 6e4)  # (finite in fp16)
    return w.to(dtype)


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, (k, where)
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), (k, where)


SHAPES = [(64, 256, 32), (7, 96, 32), (33, 128, 64), (5, 16, 8), (17, 256, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", ["compressed-tensors", "int4-qat"])
def test_int4_kernel_equals_the_reference(dtype, rule):
    for seed, (out, inp, group) in enumerate(SHAPES):
        w = _weight(out, inp, seed, dtype)
        for scale_dtype in (torch.bfloat16, torch.float16, torch.float32):
            got = kq.quantize_int4(w, group=group, rule=rule, scale_dtype=scale_dtype, what="x.weight")
            want = quant.quantize_int4_torch(w, group=group, rule=rule, scale_dtype=scale_dtype, what="x.weight")
            _same(got, want, (out, inp, group, scale_dtype))
    for w in _weights(8, 128, 3, dtype):  # the compressed-tensors test's edge rows
        _same(kq.quantize_int4(w, group=32, rule=rule), quant.quantize_int4_torch(w, group=32, rule=rule), "edges")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_kernel_equals_the_reference(dtype):
    for seed, (out, inp, group) in enumerate([*SHAPES, (10, 64, 16)]):
        w = _weight(out, inp, seed, dtype)
        _same(kq.quantize_mxfp4(w, group=group), quant.quantize_mxfp4_torch(w, group=group), (out, inp, group))
    scales = kq.quantize_mxfp4(_weight(64, 256, 0, torch.float32), group=32)["weight_scale"]
    assert {0, 255} <= set(scales.unique().tolist())  # both extreme scales were exercised


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_block_kernel_equals_the_reference(dtype):
    ties = [448.0, 1.0625, 1.1875, 400.0, 2**-10, 3 * 2**-10, 15 * 2**-10, -0.0]
    ties = torch.tensor(ties + [-t for t in ties])
    for seed, (out, inp, block) in enumerate(
        [(256, 384, (128, 128)), (100, 200, (64, 32)), (12, 48, (4, 16)), (130, 129, (128, 128)), (9, 7, (3, 5))]
    ):
        w = _weight(out, inp, seed, torch.float32)
        w[8:12, : min(16, inp)] = ties[: min(16, inp)]
        w = (w.clamp(-6e4, 6e4) if dtype == torch.float16 else w).to(dtype)
        _same(kq.quantize_fp8_block(w, block=block), quant.quantize_fp8_block_torch(w, block=block), (out, inp, block))


def test_device_quantizers_refuse_what_they_cannot_take():
    w = torch.randn(4, 64)
    w[2, 5] = float("inf")
    for fn in (
        lambda: kq.quantize_int4(w, group=32, what="a.weight"),
        lambda: kq.quantize_mxfp4(w, what="a.weight"),
        lambda: kq.quantize_fp8_block(w, what="a.weight"),
    ):
        with pytest.raises(InvalidArgumentError, match=r"a\.weight.*NaN or infinite"):
            fn()
    w[2, 5] = float("nan")
    with pytest.raises(InvalidArgumentError, match=r"a\.weight.*NaN"):
        kq.quantize_int4(w, group=32, what="a.weight")
    with pytest.raises(InvalidArgumentError, match="power-of-two groups"):
        kq.quantize_int4(torch.randn(4, 96), group=48, what="b.weight")
    with pytest.raises(InvalidArgumentError, match="fill int32 words"):
        kq.quantize_int4(torch.randn(4, 64), group=4, what="b.weight")
    with pytest.raises(InvalidArgumentError, match="2-D bf16"):
        kq.quantize_mxfp4(torch.randn(4, 64).double(), what="c.weight")
    with pytest.raises(InvalidArgumentError, match="rule"):
        kq.quantize_int4(torch.randn(4, 64), group=32, rule="gptq")
    # CPU tensors stay on the Rust / torch paths; the device dispatch takes only what fits
    assert quant._device_kernels(torch.randn(4, 64)) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_device_quantizers_on_the_gpu_equal_the_cpu_references(dtype):
    """Compiled for the GPU (division, rounding and the fp16 / fp8 conversions as the
    device does them): equal to the torch references computed on the CPU."""
    for seed, (out, inp, group) in enumerate(SHAPES):
        w = _weight(out, inp, seed, dtype)
        for rule in ("compressed-tensors", "int4-qat"):
            for scale_dtype in (torch.bfloat16, torch.float32):
                got = quant.quantize_int4(w.cuda(), group=group, rule=rule, scale_dtype=scale_dtype)
                want = quant.quantize_int4_torch(w, group=group, rule=rule, scale_dtype=scale_dtype)
                _same({k: v.cpu() for k, v in got.items()}, want, (rule, out, inp, group, scale_dtype))
        got = quant.quantize_mxfp4(w.cuda(), group=group)
        _same({k: v.cpu() for k, v in got.items()}, quant.quantize_mxfp4_torch(w, group=group), ("mx", out, inp))
        got = quant.quantize_fp8_block(w.cuda(), block=(128, 128))
        want = quant.quantize_fp8_block_torch(w, block=(128, 128))
        _same({k: v.cpu() for k, v in got.items()}, want, ("fp8", out, inp))
