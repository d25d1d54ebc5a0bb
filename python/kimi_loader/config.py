"""``config.json`` parsed once into a validated structure.

The config is input like any tensor: every key this library reads is checked here (type,
range, consistency), and a malformed one raises :class:`~kimi_loader.errors.ConfigError`
naming the key. What the rest of the library reads is :class:`ModelConfig`:

- ``text``: the language-model config as a plain dict with every key normalized (a
  wrapper's ``text_config``; ``rope_theta`` and ``rope_scaling`` also when transformers 5
  wrote them inside ``rope_parameters``; ``q_lora_rank`` ``None`` when absent or null;
  ``tie_word_embeddings`` from either level; ``num_nextn_predict_layers`` 0 when absent);
- ``quant``: a :class:`QuantSpec` from ``quantization_config`` at the top level (where
  compressed-tensors' and Quark's exporters write it for the wrapper) or in
  ``text_config``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, UnsupportedFormatError

__all__ = ["QUANT_FORMATS", "ModelConfig", "QuantSpec", "checkpoint_names", "parse_config", "parse_quant", "quant_of"]

#: the checkpoint formats, by name (each is a :class:`kimi_loader.registry.Format`; kept
#: here, torch-free, so that the command line can list them without importing torch)
QUANT_FORMATS = ("bf16", "fp8-block", "ct-int4", "quark-mxfp4")

_TEXT_PREFIXES = ("language_model.model.", "language_model.", "model.language_model.")


def checkpoint_names(module: str) -> list[str]:
    """The names a checkpoint may store canonical ``module`` under (plain DeepSeek-V3, the
    Kimi-K2.5 wrapper's ``language_model.model.``, and its ``language_model.`` variant)."""
    names = [module, "language_model." + module]
    if module.startswith("model."):
        names.append("language_model." + module[len("model.") :])
    return names


def _fail(key: str, why: str, file: str | None) -> ConfigError:
    return ConfigError(f"{file or 'config.json'}: '{key}' {why}", key=key, file=file)


def _int(
    d: dict, key: str, where: str, file: str | None, *, minimum: int = 1, required: bool = True, default: Any = None
) -> Any:
    v = d.get(key, default)
    if v is None:
        if required:
            raise _fail(where + key, "is missing (an integer is needed)", file)
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(where + key, f"must be an integer, not {type(v).__name__} {v!r}", file)
    if v < minimum:
        raise _fail(where + key, f"must be at least {minimum}, got {v}", file)
    return v


def _num(d: dict, key: str, where: str, file: str | None, default: float, *, positive: bool = True) -> float:
    v = d.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _fail(where + key, f"must be a number, not {type(v).__name__} {v!r}", file)
    if positive and not v > 0:
        raise _fail(where + key, f"must be positive, got {v}", file)
    return float(v)


@dataclass(frozen=True)
class QuantSpec:
    """The checkpoint-wide quantization settings.

    ``method``: ``"bf16"`` (none), ``"fp8-block"``, ``"ct-int4"`` or ``"quark-mxfp4"``.
    ``not_quantized``: the patterns of modules the config keeps unquantized
    (compressed-tensors ``ignore``, Quark ``exclude``, ``modules_to_not_convert``): plain
    names match a module or a suffix of it, ``re:`` patterns match from its start (as in
    compressed-tensors), and
    both are tried with and without the wrapper's ``language_model.`` prefix.
    """

    method: str = "bf16"
    fp8_block: tuple[int, int] = (128, 128)
    #: ``"ue8m0"`` when FP8 scales are powers of two (DeepSeek-V3.1+); informational
    scale_fmt: str | None = None
    group_size: int | None = None
    not_quantized: tuple[str, ...] = ()
    raw: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def quantized(self) -> bool:
        return self.method != "bf16"

    def names_module(self, module: str) -> bool:
        """Whether the config lists ``module`` (any naming) as not quantized."""
        names = set(checkpoint_names(module))
        for p in _TEXT_PREFIXES:
            if module.startswith(p):
                names.add("model." + module[len(p) :] if p.endswith("model.") else module[len(p) :])
        if module.endswith(".lm_head"):
            names |= {"lm_head", "language_model.lm_head"}
        for pat in self.not_quantized:
            if pat.startswith("re:"):
                rx = re.compile(pat[3:])
                if any(rx.match(n) for n in names):
                    return True
            elif any(n == pat or n.endswith("." + pat) for n in names):
                return True
        return False

    def module_format(self, module: str) -> str:
        """The format the config implies for linear ``module`` (its own tensors decide in
        the end: see :class:`kimi_loader.formats.ModuleFormats`)."""
        if not self.quantized or self.names_module(module):
            return "bf16"
        return self.method


def parse_quant(qc: Any, *, file: str | None = None, where: str = "quantization_config") -> QuantSpec:
    """Validates a ``quantization_config`` (``None`` for none)."""
    if qc is None:
        return QuantSpec()
    if not isinstance(qc, dict):
        raise _fail(where, f"must be an object, not {type(qc).__name__}", file)
    method = qc.get("quant_method")

    def unsupported(why: str) -> UnsupportedFormatError:
        return UnsupportedFormatError(f"{file or 'config.json'}: unsupported quantization: {why}", file=file)

    def patterns(key: str) -> tuple[str, ...]:
        v = qc.get(key)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise _fail(f"{where}.{key}", "must be a list of module names or 're:' patterns", file)
        for x in v:
            if x.startswith("re:"):
                try:
                    re.compile(x[3:])
                except re.error as e:
                    raise _fail(f"{where}.{key}", f"holds an invalid regular expression {x!r}: {e}", file) from None
        return tuple(v)

    skip = patterns("modules_to_not_convert")
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not (
            isinstance(block, (list, tuple))
            and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise _fail(f"{where}.weight_block_size", f"must be two positive integers, got {block!r}", file)
        fmt = qc.get("scale_fmt")
        if fmt is not None and fmt not in ("ue8m0", "float", "float32", "fp32"):
            raise unsupported(f"fp8 scale_fmt {fmt!r}")
        return QuantSpec("fp8-block", (block[0], block[1]), fmt, None, skip + patterns("ignore"), qc)
    if method == "compressed-tensors":
        if qc.get("format") != "pack-quantized":
            raise unsupported(f"compressed-tensors format {qc.get('format')!r} (only pack-quantized)")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise _fail(f"{where}.config_groups", "must be a non-empty object of quantization groups", file)
        sizes = set()
        for name, group in groups.items():
            w = group.get("weights") if isinstance(group, dict) else None
            if not isinstance(w, dict):
                raise _fail(f"{where}.config_groups.{name}.weights", "must be an object", file)
            if w.get("num_bits") != 4 or w.get("type", "int") != "int":
                raise unsupported(f"compressed-tensors group {name!r} is not int4 ({w.get('num_bits')} bits)")
            if w.get("symmetric") is False:
                raise unsupported(f"compressed-tensors group {name!r} is asymmetric (zero points)")
            if w.get("strategy", "group") not in ("group", "channel"):
                raise unsupported(f"compressed-tensors group {name!r} has strategy {w.get('strategy')!r}")
            if w.get("strategy", "group") == "group":
                sizes.add(_int(w, "group_size", f"{where}.config_groups.{name}.weights.", file))
        if len(sizes) > 1:
            raise unsupported(f"compressed-tensors groups with different group sizes {sorted(sizes)}")
        return QuantSpec("ct-int4", group_size=next(iter(sizes), None), not_quantized=skip + patterns("ignore"), raw=qc)
    if method == "quark":
        gq = qc.get("global_quant_config")
        if not isinstance(gq, dict):
            raise _fail(f"{where}.global_quant_config", "must be an object", file)
        weight = gq.get("weight")
        if isinstance(weight, list):  # Quark writes a list when several specs apply
            weight = weight[0] if weight else None
        if not isinstance(weight, dict):
            raise _fail(f"{where}.global_quant_config.weight", "must be an object", file)
        if weight.get("dtype") != "fp4":
            raise unsupported(f"quark weight dtype {weight.get('dtype')!r} (only fp4 / MXFP4)")
        group = _int(weight, "group_size", f"{where}.global_quant_config.weight.", file, required=False, default=32)
        layer = qc.get("layer_quant_config") or {}
        if not isinstance(layer, dict):
            raise _fail(f"{where}.layer_quant_config", "must be an object", file)
        for name, spec in layer.items():
            w = spec.get("weight") if isinstance(spec, dict) else None
            if w is not None and (not isinstance(w, dict) or w.get("dtype") != "fp4"):
                raise unsupported(f"quark layer_quant_config {name!r} is not fp4")
        return QuantSpec("quark-mxfp4", group_size=group, not_quantized=skip + patterns("exclude"), raw=qc)
    if method is None:
        raise _fail(f"{where}.quant_method", "is missing", file)
    raise unsupported(f"quant_method {method!r}")


@dataclass(frozen=True)
class ModelConfig:
    """A validated ``config.json``: see the module docstring."""

    raw: dict[str, Any]
    text: dict[str, Any]
    quant: QuantSpec
    #: the Kimi-K2.5 multimodal wrapper (``text_config`` + ``vision_config``)
    is_wrapper: bool


_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)


def _rope(tc: dict[str, Any], where: str, file: str | None) -> tuple[float, dict[str, Any] | None]:
    params = tc.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise _fail(where + "rope_parameters", "must be an object", file)
    scaling = tc.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise _fail(where + "rope_scaling", "must be an object", file)
    theta = tc.get("rope_theta")
    if theta is None and params:
        theta = params.get("rope_theta")
    theta = _num({"rope_theta": theta}, "rope_theta", where, file, 10000.0)
    spec = scaling or params or {}
    kind = spec.get("rope_type") or spec.get("type") or "default"
    if kind in ("default", None):
        return theta, None
    if kind != "yarn":
        raise UnsupportedFormatError(
            f"{file or 'config.json'}: unsupported rope type {kind!r} (default or yarn)", file=file
        )
    out = {k: v for k, v in spec.items() if k != "rope_theta"}
    out["type"] = "yarn"
    _num(out, "factor", where + "rope_scaling.", file, 1.0)
    _int(out, "original_max_position_embeddings", where + "rope_scaling.", file)
    return theta, out


def parse_config(raw: Any, *, file: str | None = None) -> ModelConfig:
    """Validates and normalizes a ``config.json`` dict (plain DeepSeek-V3 or the Kimi-K2.5
    wrapper). Raises :class:`ConfigError` naming the first bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{file or 'config.json'}: must be a JSON object", file=file)
    wrapper = "text_config" in raw
    where = "text_config." if wrapper else ""
    tc = raw.get("text_config", raw)
    if not isinstance(tc, dict):
        raise _fail("text_config", f"must be an object, not {type(tc).__name__}", file)
    t = dict(tc)
    for key in _REQUIRED:
        t[key] = _int(tc, key, where, file)
    t["q_lora_rank"] = _int(tc, "q_lora_rank", where, file, required=False)
    experts = _int(tc, "n_routed_experts", where, file, minimum=0, required=False, default=0)
    t["n_routed_experts"] = experts or None
    t["first_k_dense_replace"] = _int(tc, "first_k_dense_replace", where, file, minimum=0, required=False, default=0)
    t["num_nextn_predict_layers"] = _int(
        tc, "num_nextn_predict_layers", where, file, minimum=0, required=False, default=0
    )
    t["num_key_value_heads"] = _int(
        tc, "num_key_value_heads", where, file, required=False, default=t["num_attention_heads"]
    )
    dense = experts == 0 or t["first_k_dense_replace"] > 0
    t["intermediate_size"] = _int(tc, "intermediate_size", where, file, required=dense)
    if experts:
        t["moe_intermediate_size"] = _int(tc, "moe_intermediate_size", where, file)
        t["n_shared_experts"] = _int(tc, "n_shared_experts", where, file, minimum=0, required=False, default=0)
        k = t["num_experts_per_tok"] = _int(tc, "num_experts_per_tok", where, file)
        g = t["n_group"] = _int(tc, "n_group", where, file, required=False, default=1)
        tg = t["topk_group"] = _int(tc, "topk_group", where, file, required=False, default=1)
        if experts % g:
            raise _fail(where + "n_group", f"({g}) must divide n_routed_experts ({experts})", file)
        if tg > g:
            raise _fail(where + "topk_group", f"({tg}) must be at most n_group ({g})", file)
        if k > experts or (g > 1 and k > tg * experts // g):
            raise _fail(where + "num_experts_per_tok", f"({k}) is more than the selectable experts", file)
        if g > 1 and experts // g < 2:
            raise _fail(where + "n_group", f"({g}) leaves fewer than 2 experts per group", file)
        t["routed_scaling_factor"] = _num(tc, "routed_scaling_factor", where, file, 1.0)
        norm = tc.get("norm_topk_prob", True)
        if not isinstance(norm, bool):
            raise _fail(where + "norm_topk_prob", f"must be true or false, not {norm!r}", file)
    t["rms_norm_eps"] = _num(tc, "rms_norm_eps", where, file, 1e-6)
    t["rope_theta"], t["rope_scaling"] = _rope(tc, where, file)
    tie = tc.get("tie_word_embeddings", raw.get("tie_word_embeddings", False))
    if not isinstance(tie, bool):
        raise _fail(where + "tie_word_embeddings", f"must be true or false, not {tie!r}", file)
    t["tie_word_embeddings"] = tie
    dtype = tc.get("dtype") or tc.get("torch_dtype") or raw.get("dtype") or raw.get("torch_dtype")
    if dtype is not None and not isinstance(dtype, str):
        raise _fail(where + "dtype", f"must be a dtype name, not {dtype!r}", file)
    t["dtype"] = dtype
    return ModelConfig(raw, t, quant_of(raw, file=file), wrapper)


def quant_of(raw: Any, *, file: str | None = None) -> QuantSpec:
    """The validated :class:`QuantSpec` of a whole ``config.json`` dict (``None`` for none):
    its ``quantization_config`` at the top level (where the exporters write it for the
    Kimi-K2.5 wrapper) or inside ``text_config``; both present must agree. Reads nothing
    else, so a partial config will do."""
    if raw is None:
        return QuantSpec()
    if not isinstance(raw, dict):
        raise ConfigError(f"{file or 'config.json'}: must be a JSON object", file=file)
    tc = raw.get("text_config")
    if tc is not None and not isinstance(tc, dict):
        raise _fail("text_config", f"must be an object, not {type(tc).__name__}", file)
    top, inner = raw.get("quantization_config"), (tc or {}).get("quantization_config")
    if top is not None and inner is not None and top != inner:
        raise _fail("quantization_config", "differs from text_config.quantization_config", file)
    if top is not None:
        return parse_quant(top, file=file, where="quantization_config")
    return parse_quant(inner, file=file, where="text_config.quantization_config")
