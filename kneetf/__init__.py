"""kneetf: reconstruct a 3-D knee MRI from one knee X-ray.

Public names load lazily so that `import kneetf` (and the CLI's `--help`) does not import
TensorFlow.
"""
from __future__ import annotations

from typing import Any

from kneetf.version import __version__

_LAZY = {
    "KneeNet": "kneetf.models.kneenet",
    "build_model": "kneetf.models.kneenet",
    "TwoRateAdam": "kneetf.models.optimizers",
    "load_model": "kneetf.api",
    "Reconstructor": "kneetf.api",
    "get_preset": "kneetf.presets",
    "preset_names": "kneetf.presets",
    "ModelConfig": "kneetf.config",
    "PreprocessConfig": "kneetf.config",
    "TrainConfig": "kneetf.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kneetf' has no attribute {name!r}")
