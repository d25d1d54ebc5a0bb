"""The Python format registry: each format's packer, layout shapes, detection and
dequantizer agree with each other (and the dequantizers with compressed-tensors /
transformers, tested in test_quant.py and test_writers.py)."""

from __future__ import annotations

import pytest
import torch

from kimi_loader.errors import InvalidArgumentError
from kimi_loader.formats import QUANT_FORMATS, TORCH_DTYPES
from kimi_loader.registry import FORMATS, format_of

_ST = {v: k for k, v in TORCH_DTYPES.items()}


@pytest.mark.parametrize("name", QUANT_FORMATS)
def test_each_format_is_self_consistent(name):
    fmt = format_of(name)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 256, 256, generator=g) * 0.05
    stored = fmt.quantize(w, g, group=32)
    assert set(stored) == set(fmt.suffixes)
    found = {s: _ST[t.dtype] for s, t in stored.items()}
    assert next(f.name for f in FORMATS.values() if f.matches(found)) == name  # detected as itself
    shapes = fmt.shard_shapes(256, 256, group=32)
    for suffix, shape in shapes.items():
        assert list(stored[suffix].shape[1:]) == shape, suffix
    dense = fmt.dequantize({s: t[1] for s, t in stored.items()}, torch.float32)
    assert dense.shape == (256, 256)
    if name in ("bf16", "fp8-block", "ct-int4"):  # MXFP4's packer draws random codes
        tol = {"bf16": 1e-2, "fp8-block": 7e-2, "ct-int4": 0.2}[name]
        assert ((dense - w[1]).abs().max() / w[1].abs().max()) < tol
    # a TP slice of the registry's shapes is the matching slice of the stored tensors
    for split, dim in (("column", 0), ("row", 1)):
        local = fmt.shard_shapes(256, 256, split=split, tp=2, group=32)
        for suffix, shape in local.items():
            full = list(stored[suffix].shape[1:])
            assert shape[dim] * 2 == full[dim] and shape[1 - dim] == full[1 - dim], (suffix, split)


def test_unknown_format_is_a_typed_error():
    with pytest.raises(InvalidArgumentError, match="nvfp4"):
        format_of("nvfp4")
