"""Issue #9's "Found" list, one test (or parametrized case) per bullet. Each of these
loaded garbage, panicked or refused a valid checkpoint before the fix.

| bullet | test |
|---|---|
| stacked pieces never size-checked (4 shapes, bf16 experts) | test_stacked_pieces_must_have_their_shard_shape |
| layers beyond num_hidden_layers dropped (load) | test_layers_beyond_the_config_are_refused |
| ... and by update_from_tensors | test_update_with_a_layer_beyond_the_config_is_refused |
| norm [64, 1] into [64] | test_lenient_shapes_are_refused[norm] |
| ct-int4 weight_shape contents never compared | test_lenient_shapes_are_refused[weight_shape] |
| group_size from the config never read | test_group_size_from_the_config_is_checked |
| rope_theta inside rope_parameters | test_writers.py (theta-1e6-all-moe, qlora-dense-yarn) |
| group-limited routing masks with 0.0 | test_writers.py (no-qlora-groups-tied, negative biases) |
| wrapper with a top-level quantization_config | test_wrapper_top_level_quantization_config |
| panics on int4 / FP8 scale dtypes | test_wrong_scale_dtypes_are_typed_errors_never_panics |
| 17 malformed configs | test_malformed_configs_name_the_key |
| FP8 with F8_E8M0 scales into transformers | test_writers.py::test_transformers_fp8_export_mixed_precision[ue8m0] |
| q_lora_rank null, tied embeddings | test_writers.py (no-qlora-groups-tied) |
| transformers' fused expert layout, FP8 with stacked expert scales | test_writers.py (original_format=False) |
| weight_shape stored as I64 | test_weight_shape_any_integer_dtype |
| ignore lists with the language_model. prefix | test_prefixed_ignore_lists; compressed-tensors and Quark below |
| mixed precision (BF16 linears left in a quantized checkpoint) | test_writers.py (fp8 export tests) |
| empty_model without rope scaling | test_writers.py (every case uses empty_model; theta-1e6 has none) |
| inspect says "problems none" on refused checkpoints | test_inspect_runs_the_planner |

Writers no one here wrote (issue #9's "Tests" section), in test_writers.py (W) and
test_quark.py (Q):

| writer | test |
|---|---|
| transformers save_pretrained, both expert layouts, 3 configs | W test_load_into_transformers_equals_its_own_load |
| ... logits and greedy tokens | W test_runtime_logits_and_greedy_tokens_equal_transformers |
| transformers' FP8 block quantizer, float and ue8m0 scales | W test_transformers_fp8_export_mixed_precision |
| compressed-tensors compressor, W4A16 g32, both placements | W test_compressed_tensors_pack_quantized_export |
| amd-quark MXFP4 export, plain and Kimi wrapper | Q test_quark_mxfp4_export |
| amd-quark on transformers' model (fused experts stay BF16) | Q test_quark_export_of_transformers_model_leaves... |
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from reference import as_bytes, rewrite

import kimi_loader
from kimi_loader.models import for_config

P = "language_model.model.layers"


def _load(path, **kw):
    ck = kimi_loader.open(path)
    model = for_config(ck.config, **kw)
    return model, kimi_loader.load_weights(model, ck)


def _qc(config: dict) -> dict:
    return config.get("quantization_config") or config["text_config"]["quantization_config"]


def _with_config(path: str, edit) -> str:
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    edit(cfg)
    json.dump(cfg, open(cfg_path, "w"))
    return path


# -- stacked pieces ------------------------------------------------------------------------
def _stacked_cases(raw):
    g, u = raw[f"{P}.0.mlp.gate_proj.weight"], raw[f"{P}.0.mlp.up_proj.weight"]
    both = torch.cat([g, u])
    qa, kva = raw[f"{P}.0.self_attn.q_a_proj.weight"], raw[f"{P}.0.self_attn.kv_a_proj_with_mqa.weight"]
    qkv = torch.cat([qa, kva])
    eg, eu = raw[f"{P}.1.mlp.experts.0.gate_proj.weight"], raw[f"{P}.1.mlp.experts.0.up_proj.weight"]
    e_both = torch.cat([eg, eu])
    return {
        "gate-missing-up-twice": ({f"{P}.0.mlp.up_proj.weight": both}, {f"{P}.0.mlp.gate_proj.weight"}),
        "gate-up-192-64": ({f"{P}.0.mlp.gate_proj.weight": both[:192], f"{P}.0.mlp.up_proj.weight": both[192:]}, set()),
        "q_a-kv_a-40-32": (
            {f"{P}.0.self_attn.q_a_proj.weight": qkv[:40], f"{P}.0.self_attn.kv_a_proj_with_mqa.weight": qkv[40:]},
            set(),
        ),
        "expert-48-16": (
            {f"{P}.1.mlp.experts.0.gate_proj.weight": e_both[:48], f"{P}.1.mlp.experts.0.up_proj.weight": e_both[48:]},
            set(),
        ),
        "expert-gate-missing-up-twice": (
            {f"{P}.1.mlp.experts.0.up_proj.weight": e_both},
            {f"{P}.1.mlp.experts.0.gate_proj.weight"},
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["gate-missing-up-twice", "gate-up-192-64", "q_a-kv_a-40-32", "expert-48-16", "expert-gate-missing-up-twice"],
)
@pytest.mark.parametrize("target", ["serving", "transformers"])
def test_stacked_pieces_must_have_their_shard_shape(synth_dir, tmp_path, case, target):
    from reference import load_all

    src = synth_dir("kimi-k2.5-tiny", "bf16")
    change, drop = _stacked_cases(load_all(src))[case]
    path = rewrite(src, tmp_path / "ck", change=change, drop=drop)
    if target == "serving":
        model = for_config(kimi_loader.open(path).config, dtype=torch.float32)
    else:
        from kimi_loader.models.hf import empty_model

        model = empty_model(path, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(kimi_loader.ShapeMismatchError) as e:
        kimi_loader.load_weights(model, path)
    err = e.value  # structured: the bare checkpoint name, its destination, both shapes
    assert err.tensor in change
    assert any(n.removesuffix(".weight").endswith(err.destination.removesuffix(".weight")) for n in model.state_dict())
    assert err.found == tuple(change[err.tensor].shape[: len(err.found)]) and err.expected != err.found
    assert all(torch.equal(as_bytes(v), as_bytes(before[k])) for k, v in model.state_dict().items())  # nothing written


# -- layers beyond the config --------------------------------------------------------------
def test_layers_beyond_the_config_are_refused(synth_dir, tmp_path):
    import shutil

    path = os.fspath(tmp_path / "ck")
    shutil.copytree(synth_dir("kimi-k2.5-tiny", "bf16"), path)
    _with_config(path, lambda c: c["text_config"].update(num_hidden_layers=2))
    with pytest.raises(kimi_loader.IncompleteLoadError, match="layer 2 is beyond") as e:
        _load(path)
    assert e.value.unused and all(".layers.2." in n for n, _ in e.value.unused)


def test_update_with_a_layer_beyond_the_config_is_refused(synth_dir):
    path = synth_dir("kimi-k2.5-tiny", "bf16")
    model, _ = _load(path)
    updater = kimi_loader.WeightUpdater(model, baseline=path)
    with pytest.raises(kimi_loader.IncompleteLoadError, match="layer 9"):
        updater.update_from_tensors([(f"{P}.9.input_layernorm.weight", torch.ones(64, dtype=torch.bfloat16))])
    assert updater.version == 0


# -- lenient shapes and format parameters ----------------------------------------------------
@pytest.mark.parametrize("case", ["norm", "weight_shape"])
def test_lenient_shapes_are_refused(synth_dir, tmp_path, case):
    from reference import load_all

    src = synth_dir("kimi-k2.5-tiny", "ct-int4")
    raw = load_all(src)
    name = {"norm": f"{P}.0.input_layernorm.weight", "weight_shape": f"{P}.1.mlp.experts.0.gate_proj.weight_shape"}[
        case
    ]
    value = raw[name].reshape(64, 1) if case == "norm" else torch.tensor([7, 9], dtype=torch.int32)
    path = rewrite(src, tmp_path / "ck", change={name: value})
    with pytest.raises(kimi_loader.ShapeMismatchError) as e:
        _load(path)
    assert e.value.tensor.startswith(name)


def test_weight_shape_any_integer_dtype(synth_dir, tmp_path):
    from reference import load_all

    src = synth_dir("kimi-k2.5-tiny", "ct-int4")
    change = {n: t.to(torch.int64) for n, t in load_all(src).items() if n.endswith("weight_shape")}
    path = rewrite(src, tmp_path / "ck", change=change)
    model, report = _load(path)
    ref, _ = _load(src)
    assert report.unused == [] and report.missing == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))


def test_group_size_from_the_config_is_checked(synth_dir, tmp_path):
    import shutil

    path = os.fspath(tmp_path / "ck")
    shutil.copytree(synth_dir("kimi-k2.5-tiny", "ct-int4"), path)
    _with_config(path, lambda c: _qc(c)["config_groups"]["group_0"]["weights"].update(group_size=16))
    with pytest.raises(kimi_loader.ShapeMismatchError, match="weight_scale"):
        _load(path)
    from kimi_loader.models.hf import empty_model  # the dequantizing path reads it too

    with pytest.raises(kimi_loader.ShapeMismatchError, match="group_size 16"):
        kimi_loader.load_weights(empty_model(path, dtype=torch.float32), path)


@pytest.mark.parametrize("placement", ["top", "text_config"])
def test_wrapper_top_level_quantization_config(synth_dir, tmp_path, placement):
    """The exporters write the wrapper's quantization_config at the top level (as the
    synthetic checkpoints now do); older configs have it inside text_config."""
    import shutil

    path = os.fspath(tmp_path / "ck")
    shutil.copytree(synth_dir("kimi-k2.5-tiny", "ct-int4"), path)
    assert "quantization_config" in kimi_loader.open(path).config

    def move(c):
        if placement == "text_config":
            c["text_config"]["quantization_config"] = c.pop("quantization_config")

    _with_config(path, move)
    ck = kimi_loader.open(path)
    model, _ = _load(path)
    lm = model.language_model
    assert ck.quant_format == lm.quant_format == "ct-int4"
    assert lm.model.layers[1].mlp.experts.w13_weight_packed.dtype == torch.int32  # kept packed, not bf16
    ref, _ = _load(synth_dir("kimi-k2.5-tiny", "ct-int4"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True))


def test_prefixed_ignore_lists(synth_dir, tmp_path):
    """compressed-tensors writes explicit module names with the wrapper prefix; Quark's
    real exclude list names modules (e.g. every self_attn linear) one by one."""
    import shutil

    for quant, key in (("ct-int4", "ignore"), ("quark-mxfp4", "exclude")):
        path = os.fspath(tmp_path / quant)
        shutil.copytree(synth_dir("kimi-k2.5-tiny", quant), path)
        ck = kimi_loader.open(path)
        names = sorted(
            {
                n.rsplit(".", 1)[0]
                for n in ck.keys()
                if n.endswith(".weight") and ck.tensor_info(n).st_dtype == "BF16" and ("_proj" in n or "lm_head" in n)
            }
        )
        assert any(n.startswith("language_model.") for n in names)

        def explicit(c, names=names, key=key):
            _qc(c)[key] = names

        _with_config(path, explicit)
        fmts = kimi_loader.formats.quant_spec(kimi_loader.open(path).config)
        assert fmts.module_format("model.layers.0.self_attn.q_a_proj") == "bf16"
        assert fmts.module_format("lm_head") == "bf16"
        assert fmts.module_format("model.layers.1.mlp.experts.0.gate_proj") == quant
        _, report = _load(path)  # without a checkpoint the config alone decides: same layout
        model = for_config(kimi_loader.open(path).config, dtype=torch.float32)
        kimi_loader.load_weights(model, path)
        assert report.unused == []


# -- typed errors, never a panic -------------------------------------------------------------
_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.float8_e8m0fnu,
]
_SCALE_OK = {
    "ct-int4": {torch.bfloat16, torch.float16, torch.float32},
    "quark-mxfp4": {torch.uint8, torch.float8_e8m0fnu},
    "fp8-block": {torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu},
}
_SCALE = {"ct-int4": "weight_scale", "quark-mxfp4": "weight_scale", "fp8-block": "weight_scale_inv"}


@pytest.mark.parametrize("quant", ["ct-int4", "quark-mxfp4", "fp8-block"])
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
def test_wrong_scale_dtypes_are_typed_errors_never_panics(synth_dir, tmp_path, quant, dtype):
    """Every dtype as the scale of every dequantizing path (transformers' model
    dequantizes on load): the accepted ones load, every other is a typed error naming
    the tensor, with the model untouched; no panic."""
    from reference import load_all

    from kimi_loader.models.hf import empty_model

    src = synth_dir("kimi-k2.5-tiny", quant)
    raw = load_all(src)
    name = f"{P}.1.mlp.experts.0.down_proj.{_SCALE[quant]}"
    value = raw[name].to(dtype)
    if quant == "quark-mxfp4" and dtype == torch.float8_e8m0fnu:
        value = raw[name].view(torch.float8_e8m0fnu)  # the same exponents, typed as E8M0
    path = rewrite(src, tmp_path / "ck", change={name: value})
    model = empty_model(path, dtype=torch.float32)
    if dtype in _SCALE_OK[quant]:
        kimi_loader.load_weights(model, path)
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(kimi_loader.KimiLoaderError) as e:
        kimi_loader.load_weights(model, path)
    assert name in str(e.value)
    assert not isinstance(e.value, kimi_loader.InternalError)
    assert all(torch.equal(as_bytes(v), as_bytes(before[k])) for k, v in model.state_dict().items())


def _malformed():
    from kimi_loader.synth import _quant_config, text_config

    tc = text_config("kimi-k2.5-tiny")
    wrap = {"model_type": "kimi_k25", "text_config": tc}

    def tc_with(**kw):
        t = copy.deepcopy(tc)
        for k, v in kw.items():
            if v is ...:
                t.pop(k)
            else:
                t[k] = v
        return {"text_config": t}

    def qc_with(quant, **kw):
        t = copy.deepcopy(tc)
        t["quantization_config"] = {**_quant_config(quant), **kw}
        return {"text_config": t}

    return [
        (tc_with(hidden_size=...), "text_config.hidden_size"),
        (tc_with(hidden_size="64"), "text_config.hidden_size"),
        (tc_with(hidden_size=-64), "text_config.hidden_size"),
        (tc_with(num_hidden_layers=True), "text_config.num_hidden_layers"),
        (tc_with(num_attention_heads=0), "text_config.num_attention_heads"),
        (tc_with(n_group=3), "text_config.n_group"),
        (tc_with(topk_group=5, n_group=4), "text_config.topk_group"),
        (tc_with(rms_norm_eps="x"), "text_config.rms_norm_eps"),
        (tc_with(rope_scaling="yarn"), "text_config.rope_scaling"),
        ({**wrap, "text_config": "not a dict"}, "text_config"),
        (qc_with("ct-int4", config_groups=[1, 2]), "text_config.quantization_config.config_groups"),
        (qc_with("ct-int4", ignore=[3]), "text_config.quantization_config.ignore"),
        (qc_with("ct-int4", ignore=["re:("]), "text_config.quantization_config.ignore"),
        (qc_with("fp8-block", weight_block_size=[0, 0]), "text_config.quantization_config.weight_block_size"),
        (qc_with("fp8-block", weight_block_size=[-128, 128]), "text_config.quantization_config.weight_block_size"),
        (qc_with("quark-mxfp4", exclude="re:lm_head"), "text_config.quantization_config.exclude"),
        (qc_with("quark-mxfp4", global_quant_config=None), "text_config.quantization_config.global_quant_config"),
    ]


@pytest.mark.parametrize("k", range(17))
def test_malformed_configs_name_the_key(k):
    config, key = _malformed()[k]
    with pytest.raises(kimi_loader.ConfigError) as e:
        for_config(config)
    assert e.value.key == key and key.rsplit(".", 1)[-1] in str(e.value)


# -- inspect ------------------------------------------------------------------------------------
def test_inspect_runs_the_planner(synth_dir, tmp_path):
    from reference import load_all

    from kimi_loader.inspect import summarize

    src = synth_dir("kimi-k2.5-tiny", "bf16")
    assert summarize(kimi_loader.open(src))["problems"] == []
    raw = load_all(src)
    change, drop = _stacked_cases(raw)["gate-up-192-64"]
    bad = rewrite(src, tmp_path / "ck", change=change, drop=drop)
    problems = summarize(kimi_loader.open(bad))["problems"]
    assert any("gate_proj" in p and "shape" in p for p in problems), problems
    dropped = rewrite(src, tmp_path / "ck2", drop={f"{P}.2.mlp.experts.3.up_proj.weight"})
    problems = summarize(kimi_loader.open(dropped))["problems"]
    assert any("experts.3.up_proj" in p for p in problems), problems
