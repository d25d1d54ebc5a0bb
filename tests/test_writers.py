"""Checkpoints written by tools no one here wrote: transformers' ``save_pretrained`` (both
expert layouts) and transformers' own FP8 block quantizer (both scale formats, with the
linears it leaves in BF16). Oracles: transformers' ``from_pretrained``, forward and
``generate``, and its ``Fp8Dequantize``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from reference import load_all, module_tree, stack_experts
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import kimi_loader
from kimi_loader.models.hf import empty_model

_BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=8,
    n_shared_experts=1,
    num_experts_per_tok=2,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    max_position_embeddings=256,
)
_YARN = {
    "rope_type": "yarn",
    "rope_theta": 50000.0,
    "factor": 8.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

#: name -> config overrides (each a case of issue #9's list)
CONFIGS = {
    # q_lora, one dense layer, YaRN rope written as transformers 5 writes it (rope_parameters)
    "qlora-dense-yarn": dict(q_lora_rank=32, first_k_dense_replace=1, n_group=1, topk_group=1, rope_parameters=_YARN),
    # DeepSeek-V2-Lite style attention, group-limited routing, tied embeddings
    "no-qlora-groups-tied": dict(
        q_lora_rank=None, first_k_dense_replace=1, n_group=4, topk_group=2, tie_word_embeddings=True
    ),
    # default rope with a large theta stored only inside rope_parameters, no dense prefix
    "theta-1e6-all-moe": dict(
        q_lora_rank=32,
        first_k_dense_replace=0,
        n_group=2,
        topk_group=1,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    ),
}


def _write(path, name: str, seed: int, original_format: bool) -> str:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**_BASE, **CONFIGS[name])).eval()
    with torch.no_grad():
        for n, buf in model.named_buffers():
            if n.endswith("e_score_correction_bias"):  # negative biases: masking must be -inf
                buf.copy_(torch.randn_like(buf) - 3.0)
    model.save_pretrained(path, save_original_format=original_format, max_shard_size="150KB")
    return os.fspath(path)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    made: dict = {}

    def get(name: str, seed: int = 0, original_format: bool = True) -> str:
        key = (name, seed, original_format)
        if key not in made:
            made[key] = _write(tmp_path_factory.mktemp(f"hf-{name}"), name, seed, original_format)
        return made[key]

    return get


CASES = [(n, s, f) for n in CONFIGS for s, f in ((0, True), (1, False))] + [("no-qlora-groups-tied", 2, False)]


@pytest.mark.parametrize(("name", "seed", "original_format"), CASES)
def test_load_into_transformers_equals_its_own_load(written, name, seed, original_format):
    path = written(name, seed, original_format)
    ref = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    model = empty_model(path, dtype=torch.float32)
    report = kimi_loader.load_weights(model, path)
    assert report.unused == [] and report.missing == []
    got = model.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize(("name", "seed", "original_format"), CASES)
def test_runtime_logits_and_greedy_tokens_equal_transformers(written, name, seed, original_format):
    path = written(name, seed, original_format)
    ref = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = kimi_loader.from_pretrained(path)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = ref(ids).logits
    got = ours(ids)
    assert (got - want).abs().max() / want.abs().max() < 1e-4
    with torch.no_grad():
        want_tokens = ref.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(ids[:1], 6), want_tokens)


# -- transformers' FP8 block quantizer -----------------------------------------------------
class _Quantizer:
    """What transformers' FP8 conversion ops read from their quantizer."""

    def __init__(self, block, scale_fmt):
        self.quantization_config = type(
            "C", (), {"weight_block_size": block, "scale_fmt": scale_fmt, "dequantize": True}
        )()


def _fp8_export(src: str, dst, scale_fmt: str, block=(32, 32)) -> str:
    """Quantizes a bf16 transformers checkpoint with transformers' own ``Fp8Quantize`` op:
    linears whose dims are not multiples of the block stay BF16 (as transformers leaves
    them), embeddings, norms, the router and the head stay unquantized."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    op = Fp8Quantize(_Quantizer(block, scale_fmt))
    tensors = load_all(src)
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        linear = ("_proj" in name and "embed" not in name) and t.dim() >= 2
        out.update(op.convert({name: t.to(torch.bfloat16)}) if linear else {name: t})
    os.makedirs(dst, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as fh:
        config = json.load(fh)
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "scale_fmt": scale_fmt,
    }
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(config, fh)
    return os.fspath(dst)


def _dequantized_reference(path: str, block) -> dict[str, torch.Tensor]:
    """Every tensor of an FP8 export with FP8 weights dequantized by transformers'
    ``Fp8Dequantize`` (float32)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    op = Fp8Dequantize(_Quantizer(block, None))
    raw = load_file(os.path.join(path, "model.safetensors"))
    out = {}
    for name, t in raw.items():
        if "scale_inv" in name:
            continue
        scale = (
            raw.get(name[: -len("weight")] + "weight_scale_inv")
            if name.endswith(".weight")
            else raw.get(name + "_scale_inv")
        )
        out[name] = op._dequantize_one(t, scale, torch.float32) if t.dtype == torch.float8_e4m3fn else t.float()
    return stack_experts(out)


@pytest.mark.parametrize("scale_fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("original_format", [True, False])
def test_transformers_fp8_export_mixed_precision(written, tmp_path, scale_fmt, original_format):
    src = written("qlora-dense-yarn", 3, original_format)
    path = _fp8_export(src, tmp_path / "fp8", scale_fmt)
    ck = kimi_loader.open(path)
    scales = {ck.tensor_info(n).st_dtype for n in ck.keys() if n.endswith("scale_inv")}
    assert scales == ({"F8_E8M0"} if scale_fmt == "ue8m0" else {"F32"})
    # transformers leaves kv_a_proj_with_mqa (40 rows) in BF16 and lists it nowhere
    assert ck.tensor_info("model.layers.0.self_attn.kv_a_proj_with_mqa.weight").st_dtype == "BF16"
    assert ck.tensor_info("model.layers.0.self_attn.q_a_proj.weight").st_dtype == "F8_E4M3"

    # dequantize-on-load into transformers' model == transformers' own Fp8Dequantize
    reference = _dequantized_reference(path, (32, 32))
    hf = empty_model(path, dtype=torch.float32)
    kimi_loader.load_weights(hf, path)
    oracle = DeepseekV3ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if name in reference:
                p.copy_(reference[name])
    for name, v in oracle.state_dict().items():
        assert torch.equal(hf.state_dict()[name], v), name

    # the serving runtime keeps FP8 where the checkpoint has it, fuses q_a (FP8) with
    # kv_a (BF16) in a common dense format, and matches transformers on those weights
    ours = kimi_loader.from_pretrained(path)
    attn = ours.model.layers[0].self_attn
    assert attn.fused_qkv_a_proj_with_mqa.format == "bf16" and attn.q_b_proj.format == "fp8-block"
    assert any("kv_a_proj_with_mqa" in d for d in ours.format_decisions)
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = oracle(ids).logits
    assert (ours(ids) - want).abs().max() / want.abs().max() < 1e-4


# -- compressed-tensors' real compressor -------------------------------------------------
#: moonshotai/Kimi-K2.5's ignore list (regexes; only routed experts are int4)
KIMI_CT_IGNORE = [
    "re:.*self_attn.*",
    "re:.*shared_experts.*",
    r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
    "re:.*lm_head.*",
    "re:vision_tower.*",
    "re:mm_projector.*",
]


def _ct_export(src: str, dst, prefix: str, placement: str) -> tuple[str, dict[str, torch.Tensor]]:
    """W4A16 symmetric group-32 pack-quantized export by compressed-tensors'
    ``apply_quantization_config`` + its min/max ``calculate_qparams`` + ``ModelCompressor``
    with the Kimi ignore list. ``prefix`` ``language_model.`` writes a Kimi-K2.5 wrapper;
    ``placement`` is where ``quantization_config`` goes: ``top`` as compressed-tensors
    writes it (its own explicit ignore names), ``text_config`` as moonshotai's config has
    it (the regex list). Returns the path and compressed-tensors' own decompression."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    raw = load_all(src)
    tensors = {
        prefix + k: (v.to(torch.bfloat16) if v.dtype == torch.float32 and "correction_bias" not in k else v)
        for k, v in raw.items()
    }
    root = module_tree(tensors)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    apply_quantization_config(
        root,
        QuantizationConfig(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
            ignore=KIMI_CT_IGNORE,
            format="pack-quantized",
        ),
    )
    for module in root.modules():
        if getattr(module, "quantization_scheme", None) is not None:  # the min/max observer's qparams
            w = module.weight.detach().float().reshape(module.weight.shape[0], -1, 32)
            scale, zp = calculate_qparams(w.amin(-1), w.amax(-1), args)
            module.weight_scale.data = scale.to(module.weight_scale.dtype)
            module.weight_zero_point.data = zp.to(module.weight_zero_point.dtype)
    compressor = ModelCompressor.from_pretrained_model(root, quantization_format="pack-quantized")
    compressor.compress_model(root)
    os.makedirs(dst, exist_ok=True)
    save_file({k: v.contiguous() for k, v in root.state_dict().items()}, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as fh:
        text = json.load(fh)
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(text, fh)
    compressor.update_config(os.fspath(dst))  # compressed-tensors writes quantization_config
    with open(os.path.join(dst, "config.json")) as fh:
        written_config = json.load(fh)
    qc = written_config.pop("quantization_config")
    if prefix:
        text = {**written_config, "model_type": "kimi_k2"}
        config: dict = {
            "architectures": ["KimiK25ForConditionalGeneration"],
            "model_type": "kimi_k25",
            "text_config": text,
            "tie_word_embeddings": False,
        }
        if placement == "text_config":
            text["quantization_config"] = {**qc, "ignore": KIMI_CT_IGNORE}
        else:
            config["quantization_config"] = qc
    else:
        config = {**written_config, "quantization_config": qc}
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump(config, fh)
    compressor.decompress_model(root)
    decompressed = {
        k[len(prefix) :]: v
        for k, v in root.state_dict().items()
        if not k.endswith(("weight_scale", "weight_shape", "weight_zero_point"))
    }
    return os.fspath(dst), decompressed


CT_CASES = [("", "top"), ("language_model.", "top"), ("language_model.", "text_config")]


@pytest.mark.parametrize(("prefix", "placement"), CT_CASES)
def test_compressed_tensors_pack_quantized_export(written, tmp_path, prefix, placement):
    src = written("qlora-dense-yarn", 4, True)
    path, decompressed = _ct_export(src, tmp_path / "ct", prefix, placement)
    ck = kimi_loader.open(path)
    e0 = f"{prefix}model.layers.1.mlp.experts.0.gate_proj."
    assert {n[len(e0) :]: ck.tensor_info(n).st_dtype for n in ck.keys() if n.startswith(e0)} == {
        "weight_packed": "I32",
        "weight_scale": "BF16",
        "weight_shape": "I64",
    }
    assert ck.tensor_info(f"{prefix}model.layers.1.mlp.shared_experts.up_proj.weight").st_dtype == "BF16"

    # dequantize-on-load into transformers' model == compressed-tensors' decompression
    hf = empty_model(path, dtype=torch.bfloat16)
    report = kimi_loader.load_weights(hf, path)
    assert report.missing == [] and report.unused == []
    reference = stack_experts(decompressed)
    got = hf.state_dict()
    for name, v in got.items():
        want = reference[name] if name in reference else reference[name + ".weight"]
        assert torch.equal(v, want.to(v.dtype)), name
    if not prefix:  # and == transformers' own CompressedTensorsConfig load of the export
        theirs = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).state_dict()
        for name, v in theirs.items():
            assert torch.equal(got[name], v), name

    # the serving runtime keeps routed experts int4 (dequantized as compressed-tensors
    # does, in the scale's dtype), the shared expert bf16, and matches transformers in
    # float32 on compressed-tensors' decompression; greedy decoding agrees
    ours = kimi_loader.from_pretrained(path)
    lm = getattr(ours, "language_model", ours)
    moe = lm.model.layers[1].mlp
    assert moe.experts.format == "ct-int4" and moe.shared_experts.gate_up_proj.format == "bf16"
    oracle = DeepseekV3ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            p.copy_(reference[name] if name in reference else reference[name + ".weight"])
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = oracle(ids).logits
    assert (ours(ids) - want).abs().max() / want.abs().max() < 1e-4
    with torch.no_grad():
        want_tokens = oracle.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(ids[:1], 6), want_tokens)


@pytest.mark.parametrize(("tp_size", "ep_size"), [(2, 1), (1, 2), (2, 2), (4, 2)])
def test_fused_expert_layout_under_tp_and_ep(written, tp_size, ep_size):
    """transformers' fused expert layout sliced per rank (engine semantics: EP inside the
    TP group) equals what the per-expert layout of the same weights (transformers' other
    output) must give on that rank."""
    from reference import expected_params

    from kimi_loader.loader import destinations
    from kimi_loader.models import for_config

    path = written("theta-1e6-all-moe", 7, False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_all(path)  # stored fused, 3-D
    fused, per_expert = kimi_loader.open(path), kimi_loader.open(written("theta-1e6-all-moe", 7, True))
    for rank in range(max(tp_size, ep_size)):
        ranks = dict(tp_rank=rank % tp_size, tp_size=tp_size, ep_size=ep_size)
        if ep_size > tp_size:
            ranks["ep_rank"] = rank
        model = for_config(fused.config, dtype=torch.float32, **ranks)
        report = kimi_loader.load_weights(model, fused)
        assert report.missing == [] and report.unused == []
        want = expected_params(per_expert, model)
        got = destinations(model)
        assert set(got) == set(want)
        for name, w in want.items():
            assert torch.equal(got[name], w), (name, ranks)


# -- quantize-on-sync against the writers ------------------------------------------------
def test_bf16_sync_into_an_int4_model_equals_a_compressed_tensors_export(written, tmp_path):
    """A trainer's bf16 weights synced into a ct-int4 model with quantize= equal, bit for
    bit, the model loaded from the checkpoint compressed-tensors' compressor writes from
    the same bf16 weights; a repeated sync quantizes and copies nothing."""
    from kimi_loader.rl import WeightUpdater

    a, _ = _ct_export(written("qlora-dense-yarn", 4, True), tmp_path / "a", "", "top")
    src_b = written("qlora-dense-yarn", 5, True)
    b, _ = _ct_export(src_b, tmp_path / "b", "", "top")
    trainer = {
        k: (v.to(torch.bfloat16) if v.dtype == torch.float32 and "correction_bias" not in k else v)
        for k, v in load_all(src_b).items()
    }
    assert any(k.endswith("experts.0.gate_proj.weight") for k in trainer)  # bf16, not int4
    model = kimi_loader.from_pretrained(a)
    up = WeightUpdater(model, baseline=a)
    report = up.update_from_tensors(trainer.items(), quantize="compressed-tensors")
    assert report.changed_tensors > 0 and "quantize" in report.seconds
    want = kimi_loader.from_pretrained(b).state_dict()
    got = model.state_dict()
    assert set(got) == set(want)
    for name, v in want.items():
        assert torch.equal(got[name].view(torch.uint8), v.view(torch.uint8)), name
    again = up.update_from_tensors(trainer.items(), quantize=True)
    assert again.changed_tensors == 0 and again.bytes_changed == 0


def _oracle_quantized(fmt: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored tensors of ``w`` as the defining library writes them."""
    if fmt == "fp8-block":
        from types import SimpleNamespace

        from transformers.integrations.finegrained_fp8 import Fp8Quantize

        cfg = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=(128, 128), scale_fmt="float"))
        out = Fp8Quantize(cfg)._quantize_one("x.weight", w)
        return {"weight": out["x.weight"], "weight_scale_inv": out["x.weight_scale_inv"]}
    from compressed_tensors.compressors.mx_utils import compress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(
        num_bits=4, type="float", symmetric=True, strategy="group", group_size=32, scale_dtype=torch.uint8
    )
    g = w.float().reshape(w.shape[0], -1, 32)
    scale, _ = calculate_qparams(g.amin(-1), g.amax(-1), args)
    return {
        "weight": pack_fp4_to_uint8(quantize(w.float(), scale, None, args)),
        "weight_scale": compress_mx_scale(scale, torch.uint8),
    }


@pytest.mark.parametrize(
    ("preset", "quant", "scale"),
    [("deepseek-v3-tiny", "fp8-block", "weight_scale_inv"), ("kimi-k2.5-tiny", "quark-mxfp4", "weight_scale")],
)
def test_bf16_sync_into_fp8_and_mxfp4_models_equals_the_reference_quantizers(tmp_path, preset, quant, scale):
    """FP8-block (transformers' FineGrainedFP8 quantizer) and MXFP4 (compressed-tensors'
    MX quantizer): the synced model equals one loaded from a checkpoint holding the
    reference library's quantization of the same bf16 weights."""
    from reference import rewrite

    from kimi_loader.rl import WeightUpdater
    from kimi_loader.synth import make_checkpoint

    # dims that are whole FP8 blocks, so that transformers' quantizer covers every weight
    a = make_checkpoint(
        tmp_path / "a", preset=preset, quant=quant, hidden_size=128, moe_intermediate_size=128, intermediate_size=256
    )
    ck = kimi_loader.open(a)
    g = torch.Generator().manual_seed(7)
    trainer, change = {}, {}
    mtp = f"layers.{ck.model_config().text['num_hidden_layers']}."  # an MTP layer: not loaded
    for n in ck.keys():
        base, _, suffix = n.rpartition(".")
        if suffix != scale or ".experts." not in n or mtp in n:
            continue
        w_info = ck.tensor_info(f"{base}.weight")
        cols = w_info.shape[1] * (2 if quant == "quark-mxfp4" else 1)
        w = (torch.randn(w_info.shape[0], cols, generator=g) * 0.05).to(torch.bfloat16)
        trainer[f"{base}.weight"] = w
        change.update({f"{base}.{s}": t for s, t in _oracle_quantized(quant, w).items()})
    assert len(trainer) > 8
    b = rewrite(a, tmp_path / "b", change=change)
    model = kimi_loader.from_pretrained(a)
    report = WeightUpdater(model, baseline=a).update_from_tensors(trainer.items(), quantize=True)
    assert report.changed_tensors == len(change)
    want = kimi_loader.from_pretrained(b)
    for (name, v), (_, w) in zip(want.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(w.view(torch.uint8), v.view(torch.uint8)), name
