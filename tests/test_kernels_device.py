"""Which device a kernel runs on. Triton launches on the *current* CUDA device and
stream, not on the device of the pointers it is given, so every entry point of
``kimi_loader.kernels`` launches inside ``kernels._device.on_device``. The suite-wide
check in ``conftest`` fails any launch outside one, or with a tensor argument on another
device. These tests check that the check is live, that tensors on two devices are
refused by name, and, with two GPUs, that a kernel on the non-current GPU gives the
reference's result."""

from __future__ import annotations

import pytest
import torch

from kimi_loader.errors import InvalidArgumentError

pytest.importorskip("triton")
import triton
import triton.language as tl

from conftest import on_gpu
from kimi_loader.kernels._device import on_device
from kimi_loader.kernels.dequant import dequantize, dequantize_reference
from kimi_loader.kernels.mla import mla_decode, mla_decode_reference
from kimi_loader.kernels.moe import moe_w4, route_noaux_tc
from kimi_loader.quant import quantize_int4

two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)


@triton.jit
def _plus_one(x, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(x + i, tl.load(x + i) + 1.0)


def test_the_suite_fails_a_launch_outside_on_device_or_on_another_device():
    x = torch.zeros(8)
    with pytest.raises(AssertionError, match="launched outside"):
        _plus_one[(1,)](x, N=8)
    with on_device("test", x=x):
        _plus_one[(1,)](x, N=8)
    assert torch.equal(x, torch.ones(8))
    with on_device("test", x=x), pytest.raises(AssertionError, match=r"launched on cpu with tensors on \['meta'\]"):
        _plus_one[(1,)](torch.zeros(8, device="meta"), N=8)


def _int4(rows: int, cols: int) -> dict[str, torch.Tensor]:
    return quantize_int4(torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)), group=32)


def _calls(meta: str):
    """Each entry point called with the argument ``meta`` on the meta device."""
    w = _int4(16, 64)
    moe = {
        "x": torch.randn(2, 64),
        "topk_ids": torch.tensor([[0, 1], [1, 0]]),
        "topk_weights": torch.rand(2, 2),
        "w13": torch.stack([_int4(64, 64)["weight_packed"]] * 2),
        "w13_scale": torch.stack([_int4(64, 64)["weight_scale"]] * 2),
        "w2": torch.stack([_int4(64, 32)["weight_packed"]] * 2),
        "w2_scale": torch.stack([_int4(64, 32)["weight_scale"]] * 2),
    }
    mla = {
        "q_nope": torch.randn(1, 4, 32),
        "q_rope": torch.randn(1, 4, 8),
        "latent": torch.randn(1, 5, 32),
        "k_rope": torch.randn(1, 5, 8),
    }
    route = {"router_logits": torch.randn(3, 16), "correction_bias": torch.zeros(16)}
    dq = {"weight_packed": w["weight_packed"], "weight_scale": w["weight_scale"]}
    for args in (moe, mla, route, dq):
        if meta in args:
            args[meta] = args[meta].to("meta")
            break
    return {
        "moe_w4": lambda: moe_w4(**moe),
        "mla_decode": lambda: mla_decode(**mla, seq_lens=torch.tensor([5]), scale=0.1),
        "route_noaux_tc": lambda: route_noaux_tc(**route, top_k=2, n_group=4, topk_group=2, routed_scaling_factor=2.5),
        "ct-int4": lambda: dequantize("ct-int4", dq, torch.float32),
    }


@pytest.mark.parametrize(
    ("entry", "meta"),
    [
        ("moe_w4", "w2_scale"),
        ("moe_w4", "topk_ids"),
        ("mla_decode", "latent"),
        ("route_noaux_tc", "correction_bias"),
        ("ct-int4", "weight_scale"),
    ],
)
def test_tensors_on_two_devices_are_refused_naming_each(entry, meta):
    """An argument on another device is an InvalidArgumentError naming it and its device
    (before: read through a pointer of the wrong device), and nothing is launched; the
    same call with every tensor on one device runs."""
    with pytest.raises(InvalidArgumentError, match=rf"{entry}: the tensors must be on one device, .*{meta} on meta"):
        _calls(meta)[entry]()
    out = _calls("")[entry]()
    assert all(torch.isfinite(o.float()).all() for o in (out if isinstance(out, tuple) else (out,)))


def test_mla_decode_takes_host_sequence_lengths():
    """``seq_lens`` is metadata that engines keep on the host: it is moved to the
    queries' device (a host pointer read by a GPU kernel otherwise)."""
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 4, 32, generator=g), torch.randn(2, 4, 8, generator=g)]
    args += [torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 8, generator=g), torch.tensor([6, 2])]
    want = mla_decode_reference(*args, 0.2)
    assert torch.allclose(mla_decode(*args, 0.2), want, rtol=1e-5, atol=1e-6)


@on_gpu
@two_gpus
def test_kernels_on_the_gpu_that_is_not_current_match_the_reference():
    """Tensors on cuda:1 while cuda:0 is current: the launch runs on cuda:1 (ordered with
    its stream) and equals the reference; the current device is unchanged after."""
    torch.cuda.set_device(0)
    w = {k: v.to("cuda:1") for k, v in _int4(48, 128).items() if k != "weight_shape"}
    got = dequantize("ct-int4", w, torch.float32)
    assert got.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    assert torch.equal(got.cpu(), dequantize_reference("ct-int4", {k: v.cpu() for k, v in w.items()}, torch.float32))
    g = torch.Generator().manual_seed(1)
    args = [torch.randn(2, 8, 64, generator=g), torch.randn(2, 8, 16, generator=g)]
    args += [torch.randn(2, 40, 64, generator=g), torch.randn(2, 40, 16, generator=g)]
    lens = torch.tensor([40, 7])
    got = mla_decode(*[a.to("cuda:1") for a in args], lens, 0.1)
    assert torch.allclose(got.cpu(), mla_decode_reference(*args, lens, 0.1), rtol=1e-4, atol=1e-5)
