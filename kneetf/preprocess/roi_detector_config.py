"""The ROI detector's architecture configs and the shipped detector's file, without
TensorFlow: what `kneetf train-roi --help`, the cache's ROI record and other light callers
need (`kneetf.preprocess.roi_detector` builds and runs the model)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kneetf.errors import ConfigError

HEADS = ("heatmap", "regression")
#: The detector shipped with kneetf (package data), loadable as `load_detector("builtin")`.
BUILTIN_DETECTOR = Path(__file__).resolve().parent / "weights" / "roi_detector.keras"
BUILTIN_NAME = "builtin"
#: What names the classical image-analysis fallback (`kneetf.preprocess.roi.ClassicalRoi`)
#: where a detector is chosen (`--roi-detector classical`, `roi="classical"`)
CLASSICAL_NAME = "classical"


def is_named_source(detector: object) -> bool:
    """Whether `detector` names a source kneetf ships ("builtin", "classical"), not a file."""
    return str(detector) in (BUILTIN_NAME, CLASSICAL_NAME)


def resolved_detector(rois: object = None, detector: object = None) -> str | None:
    """The detector a choice of ROI options means: the built-in one when neither boxes nor a
    detector is given (the default), None for boxes or for "classical" (the fallback), else
    `detector` as a string."""
    if detector is not None and str(detector) == CLASSICAL_NAME:
        return None
    if detector:
        return str(detector)
    return None if rois else BUILTIN_NAME


@dataclass(frozen=True)
class RoiDetectorConfig:
    """Architecture of the ROI detector: `len(filters)` stride-2 stages, each two 3x3 convs
    (the second strided) -> BN -> ReLU; then the `head`.

    `heatmap`: a top-down path of `head_filters` channels back to stride `head_stride`, and
    1x1 convs to the heatmap, the box side and the centre offset. `regression`: flatten,
    dropout, `dense_units` and (cx, cy, side). `min_confidence`: detections whose confidence is
    below it are flagged unsure.
    """

    image_size: int = 128
    filters: tuple[int, ...] = (16, 24, 32, 48, 64)
    head: str = "heatmap"
    head_stride: int = 4
    head_filters: int = 32
    dense_units: int = 128
    dropout: float = 0.1
    min_confidence: float = 0.3
    #: side (mm) of the boxes the detector was trained on; when set and an X-ray's pixel
    #: spacing is known, the box side is this many mm instead of the predicted side
    box_mm: float | None = None

    def __post_init__(self) -> None:
        if self.image_size < 16 or self.image_size % (2 ** len(self.filters)):
            raise ConfigError(f"image_size must be >= 16 and divisible by 2**len(filters) = {2 ** len(self.filters)}. "
                              f"Received: image_size={self.image_size}")
        if not self.filters or min(self.filters) < 1 or self.dense_units < 1 or self.head_filters < 1:
            raise ConfigError(f"filters, head_filters and dense_units must be positive. Received: "
                              f"filters={self.filters}, head_filters={self.head_filters}, "
                              f"dense_units={self.dense_units}")
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}. Received: head={self.head!r}")
        strides = [2 ** k for k in range(1, len(self.filters) + 1)]
        if self.head == "heatmap" and self.head_stride not in strides:
            raise ConfigError(f"head_stride must be one of {strides} (a stage's stride). "
                              f"Received: head_stride={self.head_stride}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1). Received: dropout={self.dropout}")
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ConfigError(f"min_confidence must be in [0, 1]. Received: min_confidence={self.min_confidence}")
        if self.box_mm is not None and not self.box_mm > 0:
            raise ConfigError(f"box_mm must be > 0 or None. Received: box_mm={self.box_mm}")

    @property
    def grid(self) -> int:
        """Side of the heatmap grid."""
        return self.image_size // self.head_stride


#: For tests: seconds to build and train.
TINY_DETECTOR = RoiDetectorConfig(image_size=32, filters=(4, 8, 8), head_stride=4, head_filters=8, dense_units=8,
                                  dropout=0.0)

#: Detector sizes by name (`kneetf train-roi --arch`).
DETECTOR_ARCHS: dict[str, RoiDetectorConfig] = {"default": RoiDetectorConfig(), "tiny": TINY_DETECTOR}
