"""The weight-hook protocol: how a model tells the loader to map checkpoint names.

A model may define any of these (all optional):

``stacked_params_mapping``
    ``[(param_fragment, ckpt_fragment, shard_id)]``: a checkpoint name containing
    ``ckpt_fragment`` goes to the parameter named with ``param_fragment`` instead, as shard
    ``shard_id`` (shards are concatenated along dim 0 in shard order), e.g.
    ``("gate_up_proj", "gate_proj", 0)``, ``("gate_up_proj", "up_proj", 1)``.
``expert_params_mapping``
    ``[(param_prefix, ckpt_fragment, expert_id, shard_id)]``, e.g.
    ``("experts.w13_", "experts.3.gate_proj.", 3, "w1")``: the fragment is replaced by the
    prefix (the suffix ``weight``, ``weight_packed``, ... is carried over); ``w1`` is the
    first half of w13, ``w3`` the second, ``w2`` all of w2.
``mutate_weight_preload(name) -> str | None``
    renames a checkpoint tensor before mapping (``None`` skips it).
``custom_scale_remap(name) -> str``
    renames quantization-scale tensors.
``post_load_weights(layers=None)``
    runs after the weights are in place (for ``layers`` only, after a partial update).

Built-in models also state the rest of their rules as data (``weight_rules()``), so that
planning never calls into Python per tensor. The loader always drives the *outermost*
model; a wrapper forwards the five hooks to its inner model with :class:`ForwardsWeightHooks`.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["ForwardsWeightHooks", "WeightHooks", "custom_renames", "hook_target", "identity_hook"]


@runtime_checkable
class WeightHooks(Protocol):
    stacked_params_mapping: list[tuple[str, str, int | str]]
    expert_params_mapping: list[tuple[str, str, int, str]]

    def mutate_weight_preload(self, name: str) -> str | None: ...

    def custom_scale_remap(self, name: str) -> str: ...

    def post_load_weights(self, layers: list[int] | None = None) -> None: ...


def identity_hook(fn):
    """Marks a hook implementation as the identity, so the loader need not call it."""
    fn._identity_hook = True
    return fn


@identity_hook
def _same_name(name: str) -> str:
    return name


def _no_post_load(layers: list[int] | None = None) -> None:
    return None


class ForwardsWeightHooks:
    """Mixin for a wrapper model: forwards the five weight hooks (and ``weight_rules``)
    to the inner model named by ``weight_hooks_inner`` (default ``"language_model"``).
    Mappings default to ``[]`` when the inner model lacks them; the renaming hooks default
    to the identity and ``post_load_weights`` to a no-op."""

    weight_hooks_inner: str = "language_model"

    def _weight_hooks_inner_model(self) -> Any:
        return getattr(self, self.weight_hooks_inner)

    def _inner_hook(self, name: str, default: Any) -> Any:
        found = getattr(self._weight_hooks_inner_model(), name, None)
        return default if found is None else found

    @property
    def stacked_params_mapping(self) -> list:
        return list(self._inner_hook("stacked_params_mapping", []) or [])

    @property
    def expert_params_mapping(self) -> list:
        return list(self._inner_hook("expert_params_mapping", []) or [])

    @property
    def mutate_weight_preload(self) -> Any:
        return self._inner_hook("mutate_weight_preload", _same_name)

    @property
    def custom_scale_remap(self) -> Any:
        return self._inner_hook("custom_scale_remap", _same_name)

    @property
    def post_load_weights(self) -> Any:
        return self._inner_hook("post_load_weights", _no_post_load)

    def weight_rules(self) -> Any:
        return self._inner_hook("weight_rules", lambda: None)()


def hook_target(model: Any) -> tuple[Any, str]:
    """The module whose parameters are the destinations, and its name prefix in
    ``model``: a wrapper's inner model, or the model itself."""
    inner = getattr(model, "weight_hooks_inner", None)
    if inner:
        return getattr(model, inner), inner + "."
    return model, ""


def custom_renames(model: Any) -> list[Any]:
    """The model's renaming hooks that are not the identity, in the order they apply."""
    out = []
    for hook in ("mutate_weight_preload", "custom_scale_remap"):
        fn = getattr(model, hook, None)
        if fn is not None and not getattr(fn, "_identity_hook", False):
            out.append(fn)
    return out
