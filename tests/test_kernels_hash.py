"""The device content hash (``kl64``, Triton) against its definition in Python, under
TRITON_INTERPRET=1 on CPU tensors: sizes around the word and chunk edges, several
tensors in one launch, and that it sees every kind of change a weight update makes."""

from __future__ import annotations

import pytest
import torch

from kimi_loader.errors import InvalidArgumentError

pytest.importorskip("triton")
from kimi_loader.kernels.hash import _CHUNK, hash_reference, hash_tensors


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def test_hash_kernel_equals_its_definition():
    g = torch.Generator().manual_seed(0)
    sizes = [0, 1, 3, 4, 5, 4095, 4097, _CHUNK, _CHUNK + 7]
    tensors = [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for n in sizes]
    tensors += [torch.randn(33, 17, generator=g).to(torch.bfloat16), torch.randn(9, generator=g)]
    got = hash_tensors(tensors)
    assert got == [hash_reference(_bytes(t)) for t in tensors]
    assert all(0 <= h < 1 << 64 for h in got)
    assert hash_tensors([tensors[-1]]) == got[-1:]  # the same alone or in a batch
    assert hash_tensors([]) == []


def test_hash_kernel_sees_every_change():
    g = torch.Generator().manual_seed(1)
    w = torch.randint(0, 256, (3 * 4096 + 2,), generator=g, dtype=torch.uint8)
    base = hash_tensors([w])[0]
    assert hash_tensors([w.clone()]) == [base]  # content, not address
    variants = []
    for at in (0, 1, 4095, 4096, len(w) - 1):  # one bit anywhere, first word to the padded last one
        v = w.clone()
        v[at] ^= 1 << (at % 8)
        variants.append(v)
    swapped = w.clone()
    swapped[:4], swapped[4:8] = w[4:8].clone(), w[:4].clone()  # two words trade places
    variants += [swapped, torch.cat([w, torch.zeros(1, dtype=torch.uint8)]), w[:-1].clone()]  # appended, removed
    hashes = hash_tensors(variants)
    assert base not in hashes and len(set(hashes)) == len(hashes)
    # the same bytes as another dtype hash the same (a stream checks dtypes separately)
    f = torch.randn(64, generator=g)
    assert hash_tensors([f])[0] == hash_tensors([f.view(torch.int32)])[0]


def test_hash_kernel_refuses_what_it_cannot_read():
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        hash_tensors([torch.randn(8, 8).t()])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hash_kernel_on_the_gpu_equals_its_definition():
    g = torch.Generator().manual_seed(2)
    tensors = [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for n in (0, 5, 4097, _CHUNK + 7)]
    assert hash_tensors([t.cuda() for t in tensors]) == [hash_reference(_bytes(t)) for t in tensors]
