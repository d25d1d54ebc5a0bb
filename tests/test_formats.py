"""The packers behind the synthetic checkpoints, checked against compressed-tensors."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors.mx_utils import decompress_mx_scale
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

import kimi_loader
from kimi_loader.formats import E2M1_VALUES, e2m1_codes, pack_mxfp4


@pytest.mark.parametrize("shape", [(1, 2), (7, 32), (64, 96), (3, 1024)])
@pytest.mark.parametrize("seed", [0, 1])
def test_mxfp4_packer_is_bit_exact_with_compressed_tensors(shape, seed):
    g = torch.Generator().manual_seed(seed)
    values = E2M1_VALUES[torch.randint(0, 16, shape, generator=g)]
    packed = pack_mxfp4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 2)
    back = unpack_fp4_from_uint8(packed, shape[0], shape[1], dtype=torch.float32)
    assert torch.equal(back, values)  # -0.0 == 0.0 in value; check the sign bits too:
    assert torch.equal(torch.signbit(back), torch.signbit(values))
    # low nibble = even element
    assert int(packed[0, 0]) & 0xF == int(e2m1_codes(values[0, :1])[0])


def test_mxfp4_packer_rejects_non_e2m1_values():
    with pytest.raises(ValueError):
        pack_mxfp4(torch.tensor([[0.7, 1.0]]))
    with pytest.raises(ValueError):
        pack_mxfp4(torch.tensor([[1.0, 1.0, 2.0]]))


def _expert(ck, layer=1, e=3, proj="gate_proj", prefix="language_model.model"):
    return f"{prefix}.layers.{layer}.mlp.experts.{e}.{proj}"


def test_ct_int4_checkpoint_unpacks_with_compressed_tensors(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "ct-int4")
    with kimi_loader.open(path) as ck:
        cfg = ck.config["text_config"]
        for proj, (out, inp) in {
            "gate_proj": (cfg["moe_intermediate_size"], cfg["hidden_size"]),
            "down_proj": (cfg["hidden_size"], cfg["moe_intermediate_size"]),
        }.items():
            base = _expert(ck, proj=proj)
            packed = ck.get_tensor(f"{base}.weight_packed")
            scale = ck.get_tensor(f"{base}.weight_scale")
            shape = ck.get_tensor(f"{base}.weight_shape")
            assert packed.dtype == torch.int32 and packed.shape == (out, inp // 8)
            assert scale.dtype == torch.bfloat16 and scale.shape == (out, inp // 32)
            assert shape.tolist() == [out, inp]
            q = unpack_from_int32(packed, 4, torch.Size(shape.tolist()))
            assert q.min() >= -8 and q.max() <= 7 and q.abs().max() == 7  # symmetric, amax hits 7
            # the packing is the documented one: nibble j of word k is element 8k + j, +8
            word = int(packed[0, 0]) & 0xFFFFFFFF
            assert [((word >> (4 * j)) & 0xF) - 8 for j in range(8)] == q[0, :8].tolist()
        # only routed experts are int4
        assert ck.tensor_info("language_model.model.layers.1.mlp.shared_experts.up_proj.weight").st_dtype == "BF16"
        assert ck.tensor_info("language_model.model.layers.0.self_attn.kv_b_proj.weight").st_dtype == "BF16"


def test_quark_checkpoint_scales_and_values(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "quark-mxfp4")
    with kimi_loader.open(path) as ck:
        cfg = ck.config["text_config"]
        base = _expert(ck, proj="up_proj")
        w, s = ck.get_tensor(f"{base}.weight"), ck.get_tensor(f"{base}.weight_scale")
        h, inter = cfg["hidden_size"], cfg["moe_intermediate_size"]
        assert w.dtype == torch.uint8 and w.shape == (inter, h // 2)
        assert s.dtype == torch.uint8 and s.shape == (inter, h // 32)
        vals = unpack_fp4_from_uint8(w, inter, h, dtype=torch.float32)
        assert set(vals.abs().unique().tolist()) <= set(E2M1_VALUES.abs().tolist())
        scale = decompress_mx_scale(s)
        assert torch.all(scale > 0) and torch.all(scale < 1)
        # the shared expert and the dense layer-0 MLP are MXFP4 too (current revision)
        assert ck.tensor_info("language_model.model.layers.1.mlp.shared_experts.down_proj.weight").st_dtype == "U8"
        assert ck.tensor_info("language_model.model.layers.0.mlp.gate_proj.weight_scale").st_dtype == "U8"
        assert ck.tensor_info("language_model.model.layers.1.self_attn.q_a_proj.weight").st_dtype == "BF16"


def test_quark_with_bf16_shared_expert_like_the_older_revision(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "quark-mxfp4", shared_expert_quant="bf16")
    with kimi_loader.open(path) as ck:
        info = ck.tensor_info("language_model.model.layers.2.mlp.shared_experts.gate_proj.weight")
        assert (
            info.st_dtype == "BF16"
            and "language_model.model.layers.2.mlp.shared_experts.gate_proj.weight_scale" not in ck
        )


def test_fp8_block_checkpoint(synth_dir):
    path = synth_dir("deepseek-v3-tiny", "fp8-block")
    with kimi_loader.open(path) as ck:
        w = ck.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
        s = ck.get_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv")
        assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
        assert s.shape == (1, 1)  # ceil(40/128), ceil(64/128)
        deq = w.float() * s[0, 0]
        assert deq.abs().max() <= 448 * s[0, 0] and deq.abs().max() > 0.5 * 448 * s[0, 0]
        for unquantized in (
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.2.mlp.gate.weight",
            "model.norm.weight",
        ):
            assert ck.tensor_info(unquantized).st_dtype == "BF16"
        assert ck.tensor_info("model.layers.2.mlp.gate.e_score_correction_bias").st_dtype == "F32"
