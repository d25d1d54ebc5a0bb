"""Loading into transformers' own DeepseekV3ForCausalLM, against transformers'
``from_pretrained`` (bf16, compressed-tensors int4 and FP8 dequantized by transformers) and
against compressed-tensors' MXFP4 helpers. Every parameter and persistent buffer must be
bitwise equal."""

from __future__ import annotations

import logging

import pytest
import torch
from reference import as_bytes

import kimi_loader
from kimi_loader.models.hf import empty_model

transformers = pytest.importorskip("transformers")
from compressed_tensors.compressors.mx_utils import decompress_mx_scale  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8  # noqa: E402
from transformers import (  # noqa: E402
    CompressedTensorsConfig,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    FineGrainedFP8Config,
)

logging.getLogger("transformers").setLevel(logging.ERROR)


def _state(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def _assert_same(ours, ref, *, values_only: tuple[str, ...] = ()) -> None:
    a, b = _state(ours), _state(ref)
    assert set(a) == set(b)
    for k in a:
        if any(v in k for v in values_only):  # transformers keeps some dequantized weights in bf16
            assert torch.equal(a[k], b[k].to(a[k].dtype)), k
        else:
            assert a[k].dtype == b[k].dtype and torch.equal(as_bytes(a[k]), as_bytes(b[k])), k


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_checkpoint_equals_from_pretrained(synth_dir, dtype):
    path = synth_dir("deepseek-v3-tiny", "bf16")
    ref = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype)
    ours = empty_model(path, dtype=dtype)
    report = kimi_loader.load_weights(ours, path)
    _assert_same(ours, ref)
    assert report.missing == [] and report.unused == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ct_int4_dequantized_on_load_equals_compressed_tensors(synth_dir, dtype):
    path = synth_dir("deepseek-v3-tiny", "ct-int4")
    ref = DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    ours = empty_model(path, dtype=dtype)
    report = kimi_loader.load_weights(ours, path)
    assert report.op_counts["dequant_int4"] == 2 * 3 * 8  # 2 MoE layers x 3 projections x 8 experts
    _assert_same(ours, ref, values_only=("mlp.experts.",) if dtype == torch.float32 else ())


def test_fp8_block_dequantized_on_load_equals_transformers(synth_dir):
    path = synth_dir("deepseek-v3-tiny", "fp8-block")
    ref = DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=FineGrainedFP8Config(dequantize=True)
    )
    ours = empty_model(path)
    report = kimi_loader.load_weights(ours, path)
    assert report.op_counts["dequant_fp8"] > 50
    _assert_same(ours, ref)


def _fp8_checkpoint(tmp_path, hidden: int, moe_inter: int):
    return kimi_loader.synth.make_checkpoint(
        tmp_path / f"fp8-{hidden}",
        preset="deepseek-v3-tiny",
        quant="fp8-block",
        hidden_size=hidden,
        moe_intermediate_size=moe_inter,
        intermediate_size=256,
        num_hidden_layers=3,
        num_nextn_predict_layers=0,
        n_routed_experts=4,
        n_group=2,
        topk_group=1,
    )


def test_fp8_block_with_several_blocks_equals_transformers(tmp_path):
    path = _fp8_checkpoint(tmp_path, 256, 128)  # 2x2 scale grids
    ref = DeepseekV3ForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=FineGrainedFP8Config(dequantize=True)
    )
    ours = empty_model(path)
    kimi_loader.load_weights(ours, path)
    _assert_same(ours, ref)


def test_fp8_block_with_ragged_blocks(tmp_path):
    """Dims that are not multiples of 128 (DeepSeek-V3's kv_a_proj_with_mqa has 576 rows):
    transformers refuses these; the oracle is the documented formula in plain torch."""
    path = _fp8_checkpoint(tmp_path, 320, 160)
    ck = kimi_loader.open(path)
    ours = empty_model(path)
    kimi_loader.load_weights(ours, ck)
    for name in (
        "model.layers.1.mlp.down_proj",
        "model.layers.2.mlp.experts.1.down_proj",
        "model.layers.0.self_attn.kv_a_proj_with_mqa",
    ):
        w, s = ck.get_tensor(name + ".weight"), ck.get_tensor(name + ".weight_scale_inv")
        grid = s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
        want = (w.float() * grid).to(torch.bfloat16)
        got = (
            ours.model.layers[2].mlp.experts.down_proj[1] if "experts" in name else ours.get_parameter(name + ".weight")
        )
        assert torch.equal(got, want), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_dequantized_on_load_equals_compressed_tensors_helpers(synth_dir, dtype):
    path = synth_dir("kimi-k2.5-tiny", "quark-mxfp4")
    ck = kimi_loader.open(path)
    ours = empty_model(path, dtype=dtype)
    report = kimi_loader.load_weights(ours, ck)
    assert report.op_counts["dequant_mxfp4"] > 0

    def oracle(name: str) -> torch.Tensor:
        w, s = ck.get_tensor(name + ".weight"), ck.get_tensor(name + ".weight_scale")
        out, inp = w.shape[0], w.shape[1] * 2
        vals = unpack_fp4_from_uint8(w, out, inp, dtype=torch.bfloat16)
        return (vals * decompress_mx_scale(s).repeat_interleave(32, dim=1)).to(dtype)

    p = "language_model.model.layers"
    layer = ours.model.layers[1].mlp
    for e in range(8):
        want = torch.cat([oracle(f"{p}.1.mlp.experts.{e}.gate_proj"), oracle(f"{p}.1.mlp.experts.{e}.up_proj")])
        assert torch.equal(layer.experts.gate_up_proj[e], want), e
        assert torch.equal(layer.experts.down_proj[e], oracle(f"{p}.1.mlp.experts.{e}.down_proj")), e
    assert torch.equal(layer.shared_experts.down_proj.weight, oracle(f"{p}.1.mlp.shared_experts.down_proj"))
    assert torch.equal(ours.model.layers[0].mlp.gate_proj.weight, oracle(f"{p}.0.mlp.gate_proj"))
    assert torch.equal(
        ours.model.layers[1].self_attn.kv_b_proj.weight, ck.get_tensor(f"{p}.1.self_attn.kv_b_proj.weight").to(dtype)
    )


def test_kimi_named_checkpoint_into_transformers(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "bf16")
    ck = kimi_loader.open(path)
    ours = empty_model(path)
    report = kimi_loader.load_weights(ours, ck)
    assert report.ignored and all("not part of DeepseekV3ForCausalLM" in r for r in report.ignored)
    for name, t in _state(ours).items():
        if ".experts.gate_up_proj" in name:
            base = "language_model." + name.replace("experts.gate_up_proj", "experts.{}.{}.weight")
            want = torch.stack(
                [
                    torch.cat([ck.get_tensor(base.format(e, "gate_proj")), ck.get_tensor(base.format(e, "up_proj"))])
                    for e in range(8)
                ]
            )
        elif ".experts.down_proj" in name:
            base = "language_model." + name.replace("experts.down_proj", "experts.{}.down_proj.weight")
            want = torch.stack([ck.get_tensor(base.format(e)) for e in range(8)])
        else:
            want = ck.get_tensor("language_model." + name).to(t.dtype)
        assert torch.equal(as_bytes(t), as_bytes(want)), name


def test_transformers_own_save_pretrained_layout_round_trips(tmp_path):
    """transformers writes its fused experts back as per-expert tensors; loading those into a
    fresh model gives back exactly the original weights."""
    from kimi_loader.synth import text_config

    raw = {k: v for k, v in text_config("deepseek-v3-tiny").items() if k not in ("architectures", "model_type")}
    cfg = DeepseekV3Config(**raw)
    torch.manual_seed(0)
    original = DeepseekV3ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in original.parameters():
            p.normal_()
        for name, buf in original.named_buffers():
            if "e_score_correction_bias" in name:
                buf.normal_()
    original.save_pretrained(tmp_path / "saved")
    ck = kimi_loader.open(tmp_path / "saved")
    assert "model.layers.2.mlp.experts.3.up_proj.weight" in ck
    fresh = empty_model(tmp_path / "saved")
    kimi_loader.load_weights(fresh, ck)
    # `from_pretrained` (and so `empty_model`) keeps the correction bias in float32
    _assert_same(fresh, original, values_only=("e_score_correction_bias",))


@pytest.mark.parametrize("quant", ["bf16", "ct-int4"])
def test_kimi_k25_class_equals_from_pretrained(synth_dir, quant):
    """transformers' Kimi-K2.5 class: every parameter and buffer (language model, head,
    vision tower, projector; the recomputed rope and time tables) bitwise equal to
    `from_pretrained`, and so is an image + text forward."""
    from transformers import Kimi_K25ForConditionalGeneration

    path = synth_dir("kimi-k2.5-tiny", quant)
    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if quant == "ct-int4" else {}
    ref = Kimi_K25ForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16, **kw)
    ours = empty_model(path, wrapper=True)
    assert type(ours) is Kimi_K25ForConditionalGeneration
    report = kimi_loader.load_weights(ours, path)
    assert report.skipped_destinations == {} and report.missing == []
    a, b = _state(ours), _state(ref)
    assert set(a) == set(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and torch.equal(as_bytes(a[k]), as_bytes(b[k])), k
    for m in (ours, ref):  # non-persistent buffers too
        m.float().eval()
    theirs = dict(ref.named_buffers())
    assert set(dict(ours.named_buffers())) == set(theirs)
    for n, x in ours.named_buffers():
        assert torch.equal(x, theirs[n]), n
    g = torch.Generator().manual_seed(1)
    pv, grid = torch.randn(24, 3, 4, 4, generator=g), torch.tensor([[1, 4, 6]])
    ids = torch.tensor([[5, 6, *[255] * 6, 7]])
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pv, image_grid_thw=grid).logits
        assert torch.equal(ours(input_ids=ids, pixel_values=pv, image_grid_thw=grid).logits, want)
