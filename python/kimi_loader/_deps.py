"""Optional dependencies: imported where needed, with the extra that provides them."""

from __future__ import annotations

from typing import Any


def optional_import(module: str, extra: str, needed_for: str) -> Any:
    """Imports an optional dependency, or says which extra provides it (an
    :class:`~kimi_loader.errors.UnsupportedFormatError`, not a bare ModuleNotFoundError)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        from .errors import UnsupportedFormatError

        raise UnsupportedFormatError(
            f"{needed_for} needs the '{module.split('.')[0]}' package: pip install 'kimi-loader[{extra}]' ({e})"
        ) from None
