"""MLA decode (absorbed form, any head count, ragged sequences) against its torch
reference under TRITON_INTERPRET=1 on CPU: fp32 1e-5 relative, fp16 2e-3."""

from __future__ import annotations

import pytest
import torch

from kimi_loader.errors import InvalidArgumentError

pytest.importorskip("triton")
from kimi_loader.kernels.mla import mla_decode, mla_decode_reference


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
    g = torch.Generator().manual_seed(heads + sum(lens))
    b, s = len(lens), max(lens)
    q_nope = torch.randn(b, heads, lora, generator=g).to(dtype)
    q_rope = torch.randn(b, heads, rope, generator=g).to(dtype)
    latent = torch.randn(b, s, lora, generator=g).to(dtype)
    k_rope = torch.randn(b, s, rope, generator=g).to(dtype)
    for i, n in enumerate(lens):  # poison the padding: a kernel reading past seq_lens fails
        latent[i, n:] = float("nan")
        k_rope[i, n:] = float("nan")
    seq_lens = torch.tensor(lens)
    scale = (lora + rope) ** -0.5
    want = mla_decode_reference(q_nope, q_rope, latent, k_rope, seq_lens, scale)
    got = mla_decode(q_nope, q_rope, latent, k_rope, seq_lens, scale)
    assert got.dtype == dtype and torch.isfinite(got).all()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err < tol, err


def test_mla_decode_refuses_bad_lengths():
    q = torch.zeros(2, 4, 8)
    with pytest.raises(InvalidArgumentError, match="seq_lens"):
        mla_decode(q, torch.zeros(2, 4, 4), torch.zeros(2, 3, 8), torch.zeros(2, 3, 4), torch.tensor([1, 4]), 1.0)
