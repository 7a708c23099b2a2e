"""Registry of named model configs (like keras-hub presets).

    >>> from kneetf.presets import get_preset
    >>> get_preset("compact").encoder_filters
    (4, 8, 16, 32, 64, 128)
"""
from __future__ import annotations

from kneetf.config import ModelConfig, replace
from kneetf.errors import ConfigError, lookup

#: The paper's reading: widths 32..1024, 128^3 generator, BN + activation
#: kept on the 1-channel output layers, linear 1x1 MRI head. About 112M parameters.
PAPER = ModelConfig(xray_output="paper", mri_output="paper")

#: Default: the paper's topology with every width divided by 8 and an anisotropic
#: generator whose depth stays small (2x2x1 -> 128x128x16). Sigmoid outputs in [0, 1].
#: `tools/perf/spec.py` reads the architecture of the presets from here for the PyTorch twin.
COMPACT = replace(
    PAPER,
    encoder_filters=(4, 8, 16, 32, 64, 128),
    decoder_filters=(128, 64, 32, 16, 8, 4, 1),
    generator_reshape=(2, 2, 1, 128),
    generator_filters=(128, 64, 32, 16, 8, 4, 1),
    generator_strides=((1, 1, 1),) + ((2, 2, 2),) * 4 + ((2, 2, 1),) * 2,
    xray_output="sigmoid",
    mri_output="sigmoid",
)

#: Smallest network with the full topology, for tests (seconds to build and train).
TINY = replace(
    COMPACT,
    encoder_filters=(2, 2, 4, 4, 8, 8),
    decoder_filters=(8, 4, 4, 2, 2, 2, 1),
    generator_reshape=(2, 2, 1, 8),
    generator_filters=(8, 4, 4, 2, 2, 2, 1),
    generator_strides=((1, 1, 1),) + ((2, 2, 2),) * 2 + ((2, 2, 1),) * 4,
    head_filters=4,
)

#: The preset `kneetf-train` uses when none is named.
DEFAULT_PRESET = "compact"

_REGISTRY: dict[str, ModelConfig] = {}
_DESCRIPTIONS: dict[str, str] = {}


def register_preset(name: str, config: ModelConfig, description: str = "") -> None:
    """Add a named config to the registry (refuses to overwrite a name)."""
    if name in _REGISTRY:
        raise ConfigError(f"preset {name!r} is already registered")
    _REGISTRY[name] = config
    _DESCRIPTIONS[name] = description


def preset_names() -> list[str]:
    """The registered preset names, in registration order."""
    return list(_REGISTRY)


def describe_presets() -> dict[str, str]:
    """name -> one-line description."""
    return dict(_DESCRIPTIONS)


def get_preset(name: str) -> ModelConfig:
    """The config registered as `name`; unknown names get a did-you-mean error."""
    return lookup(_REGISTRY, name, "preset")


register_preset("paper", PAPER, "the paper's widths (32..1024) and 128^3 generator, ~112M parameters")
register_preset("compact", COMPACT, "default: widths / 8, anisotropic 128x128x16 generator, ~1.8M parameters")
register_preset("tiny", TINY, "for tests: the full topology with a handful of channels")
