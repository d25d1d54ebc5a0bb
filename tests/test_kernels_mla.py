"""MLA decode (absorbed form, any head count, ragged sequences) against its torch
reference under TRITON_INTERPRET=1 on CPU: fp32 1e-5 relative, fp16 2e-3."""

from __future__ import annotations

import pytest
import torch

from kimi_loader.errors import InvalidArgumentError

pytest.importorskip("triton")
from conftest import BF16_TOL, on_gpu
from kimi_loader.kernels.mla import mla_decode, mla_decode_reference


def _mla_inputs(heads, lens, lora, rope, dtype, seed) -> tuple:
    """Random queries and latent caches for sequences of ``lens`` tokens (on the CPU), the
    padding past each length poisoned with NaN: a kernel reading past seq_lens fails."""
    g = torch.Generator().manual_seed(seed)
    b, s = len(lens), max(lens)
    q_nope = torch.randn(b, heads, lora, generator=g).to(dtype)
    q_rope = torch.randn(b, heads, rope, generator=g).to(dtype)
    latent = torch.randn(b, s, lora, generator=g).to(dtype)
    k_rope = torch.randn(b, s, rope, generator=g).to(dtype)
    for i, n in enumerate(lens):
        latent[i, n:] = float("nan")
        k_rope[i, n:] = float("nan")
    return q_nope, q_rope, latent, k_rope, torch.tensor(lens), (lora + rope) ** -0.5


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want.float().cpu()).abs().max() / want.float().cpu().abs().max()).item()


@pytest.mark.parametrize(
    ("heads", "lens", "lora", "rope", "dtype"),
    [
        (8, [1], 64, 16, torch.float32),  # Kimi-K2.5 at TP 8: 8 heads, a one-token cache
        (64, [5, 17, 33], 32, 8, torch.float32),  # 64 heads, ragged lengths
        (5, [40, 3], 48, 16, torch.float32),  # an odd head count, widths not powers of two
        (16, [9, 31], 64, 16, torch.float16),
    ],
)
def test_mla_decode_matches_the_reference(heads, lens, lora, rope, dtype):
    inputs = _mla_inputs(heads, lens, lora, rope, dtype, heads + sum(lens))
    want = mla_decode_reference(*inputs)
    got = mla_decode(*inputs)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert _rel_err(got, want) < (1e-5 if dtype == torch.float32 else 2e-3)


@on_gpu
@pytest.mark.parametrize(
    ("heads", "lens"),
    [
        (8, [1, 4096, 777]),  # Kimi-K2.5 at TP 8, ragged up to a 4k-token cache
        (64, [33, 2048]),  # all 64 heads on one GPU
        (5, [40, 3]),  # an odd head count
    ],
)
def test_mla_decode_bf16_on_the_gpu_matches_the_float32_reference(heads, lens):
    """Kimi-K2.5's widths (latent 512, rope 64), bf16 on the GPU, against the float32
    reference of the same bf16 inputs: within two bf16 epsilons of the largest output."""
    inputs = _mla_inputs(heads, lens, 512, 64, torch.bfloat16, heads + sum(lens))
    want = mla_decode_reference(*(t.float() if t.is_floating_point() else t for t in inputs[:5]), inputs[5])
    got = mla_decode(*(t.cuda() for t in inputs[:5]), inputs[5])
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert _rel_err(got, want) < BF16_TOL


def test_mla_decode_addresses_caches_past_2_to_the_31_elements():
    """64 sequences of a 66,600-token cache x 512: the last ones start past 2^31 elements,
    where int32 offsets wrap around (the interpreter then reads outside the cache and
    crashes, as a GPU would read another sequence's). One token each: the output is that
    token's latent exactly. 4.4 GB of address space, a page of it touched per sequence."""
    b, s, lora, rope = 64, 66_600, 512, 64
    assert (b - 1) * s * lora > 2**31
    latent = torch.empty(b, s, lora, dtype=torch.float16)  # (never written: not committed)
    k_rope = torch.empty(b, s, rope, dtype=torch.float16)
    g = torch.Generator().manual_seed(0)
    want = torch.randn(b, lora, generator=g).half()
    latent[:, 0] = want
    k_rope[:, 0] = 0
    q = torch.randn(b, 2, lora, generator=g).half()
    got = mla_decode(
        q, torch.randn(b, 2, rope, generator=g).half(), latent, k_rope, torch.ones(b, dtype=torch.int64), 0.1
    )
    assert torch.equal(got, want[:, None].expand(b, 2, lora))


def test_mla_decode_refuses_bad_lengths():
    q = torch.zeros(2, 4, 8)
    with pytest.raises(InvalidArgumentError, match="seq_lens"):
        mla_decode(q, torch.zeros(2, 4, 4), torch.zeros(2, 3, 8), torch.zeros(2, 3, 4), torch.tensor([1, 4]), 1.0)
