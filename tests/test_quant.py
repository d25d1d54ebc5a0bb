"""The torch reference dequantizers against compressed-tensors and transformers, and
against the Rust executor's dequantize-on-load (the CPU reference and the loader agree)."""

from __future__ import annotations

import logging

import pytest
import torch
from compressed_tensors.compressors.mx_utils import decompress_mx_scale
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from reference import as_bytes

import kimi_loader
from kimi_loader.formats import E2M1_VALUES, pack_mxfp4
from kimi_loader.quant import dequant_fp8_block, dequant_int4, dequant_mxfp4, unpack_int4

logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.mark.parametrize("shape", [(1, 8), (5, 64), (3, 2, 96)])
def test_unpack_int4_matches_compressed_tensors(shape):
    g = torch.Generator().manual_seed(sum(shape))
    q = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    packed = pack_to_int32(q.reshape(-1, shape[-1]), 4).reshape(*shape[:-1], -1)
    assert torch.equal(unpack_int4(packed), q)
    flat = packed.reshape(-1, packed.shape[-1])
    assert torch.equal(unpack_int4(flat), unpack_from_int32(flat, 4, torch.Size([flat.shape[0], shape[-1]])))


def test_mxfp4_matches_compressed_tensors_helpers():
    g = torch.Generator().manual_seed(0)
    values = E2M1_VALUES[torch.randint(0, 16, (16, 128), generator=g)]
    w = pack_mxfp4(values)
    s = torch.randint(100, 150, (16, 4), generator=g).to(torch.uint8)
    want = unpack_fp4_from_uint8(w, 16, 128, dtype=torch.bfloat16) * decompress_mx_scale(s).repeat_interleave(32, 1)
    assert torch.equal(dequant_mxfp4(w, s, torch.bfloat16), want)
    s[0, 0] = 255  # e8m0 255 is NaN (OCP MX)
    assert dequant_mxfp4(w, s, torch.float32)[0, :32].isnan().all()


def test_int4_and_fp8_match_transformers(synth_dir):
    from transformers import CompressedTensorsConfig, DeepseekV3ForCausalLM, FineGrainedFP8Config

    path = synth_dir("deepseek-v3-tiny", "ct-int4")
    ck = kimi_loader.open(path)
    hf = DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    b = "model.layers.2.mlp.experts.5.down_proj."
    got = dequant_int4(ck.get_tensor(b + "weight_packed"), ck.get_tensor(b + "weight_scale"), torch.bfloat16)
    assert torch.equal(got, hf.model.layers[2].mlp.experts.down_proj[5])

    path = synth_dir("deepseek-v3-tiny", "fp8-block")
    ck = kimi_loader.open(path)
    hf = DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=FineGrainedFP8Config(dequantize=True)
    )
    b = "model.layers.1.self_attn.o_proj."
    got = dequant_fp8_block(ck.get_tensor(b + "weight"), ck.get_tensor(b + "weight_scale_inv"))
    assert torch.equal(got, hf.model.layers[1].self_attn.o_proj.weight)


@pytest.mark.parametrize("quant", ["ct-int4", "quark-mxfp4", "fp8-block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_and_rust_executor_agree(synth_dir, quant, dtype):
    from kimi_loader.models.hf import empty_model

    path = synth_dir("deepseek-v3-tiny", quant)
    ck = kimi_loader.open(path)
    loaded = empty_model(path, dtype=dtype)
    kimi_loader.load_weights(loaded, ck)
    b = "model.layers.3.mlp.experts.6.gate_proj"
    if quant == "ct-int4":
        ref = dequant_int4(ck.get_tensor(b + ".weight_packed"), ck.get_tensor(b + ".weight_scale"), dtype)
    elif quant == "quark-mxfp4":
        ref = dequant_mxfp4(ck.get_tensor(b + ".weight"), ck.get_tensor(b + ".weight_scale"), dtype)
    else:
        ref = dequant_fp8_block(ck.get_tensor(b + ".weight"), ck.get_tensor(b + ".weight_scale_inv"), dtype=dtype)
    got = loaded.model.layers[3].mlp.experts.gate_up_proj[6, : ref.shape[0]]
    assert torch.equal(as_bytes(got), as_bytes(ref))
