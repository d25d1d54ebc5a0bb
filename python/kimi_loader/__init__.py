"""kimi_loader: load Kimi-K2.5 / DeepSeek-V3 safetensors checkpoints fast and correctly.

Quickstart::

    import kimi_loader
    with kimi_loader.open("/path/to/checkpoint") as ckpt:
        print(ckpt.quant_format, len(ckpt))
        w = ckpt.get_tensor("model.embed_tokens.weight")   # zero-copy view

See ``README.md`` for the command line (``kimi-loader inspect``) and the formats.
"""

from . import errors, formats
from ._core import __version__
from .errors import (
    CheckpointIOError,
    CheckpointNotFoundError,
    HeaderError,
    IndexMismatchError,
    InvalidArgumentError,
    KimiLoaderError,
    MissingTensorError,
    ShapeMismatchError,
    UnsupportedFormatError,
)
from .formats import QUANT_FORMATS, detect_quant_format
from .reader import Checkpoint, TensorInfo, open  # noqa: A004

__all__ = [
    "QUANT_FORMATS",
    "Checkpoint",
    "CheckpointIOError",
    "CheckpointNotFoundError",
    "HeaderError",
    "IndexMismatchError",
    "InvalidArgumentError",
    "KimiLoaderError",
    "MissingTensorError",
    "ShapeMismatchError",
    "TensorInfo",
    "UnsupportedFormatError",
    "__version__",
    "detect_quant_format",
    "errors",
    "formats",
    "open",
]
