"""`DetectorRoi`: the ROI source backed by a trained knee-joint detector
(`kneetf.preprocess.roi_detector`). It imports TensorFlow only when its model loads, so a
run whose X-rays are all refused while decoding never loads it."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from kneetf.errors import InputError
from kneetf.preprocess.roi import Box

if TYPE_CHECKING:
    from kneetf.preprocess.roi_detector import Detection, RoiDetector


class DetectorRoi:
    """`RoiSource` backed by a trained `RoiDetector` (a model, the path of a `.keras` file, or
    "builtin").

    Given a path, the model loads on first use and pickles as the path, so the source can be
    sent to worker processes. `detection_for` also says how sure the detector is; with
    `reject_unsure`, `box_for` raises an InputError for a flagged detection instead of
    returning its box.
    """

    def __init__(self, model: RoiDetector | str | Path, *, reject_unsure: bool = False) -> None:
        if isinstance(model, (str, Path)):
            self.path: Path | None = Path(model)
            self._model: RoiDetector | None = None
        else:
            self.path, self._model = None, model
        self.reject_unsure = bool(reject_unsure)

    @classmethod
    def load(cls, path: str | Path, **kwargs: Any) -> "DetectorRoi":
        """Load the detector at `path` now (errors surface here, naming the file)."""
        source = cls(path, **kwargs)
        _ = source.model
        return source

    @property
    def model(self) -> RoiDetector:
        if self._model is None:
            from kneetf.preprocess.roi_detector import load_detector

            self._model = load_detector(self.path)
        return self._model

    def detection_for(self, case_id: str, image: np.ndarray, pixel_spacing: Any = None) -> Detection:
        """The detection of one X-ray (`pixel_spacing`: mm per pixel when known)."""
        return self.model.detect([image], pixel_spacings=[pixel_spacing])[0]

    def box_for(self, case_id: str, image: np.ndarray, pixel_spacing: Any = None) -> Box:
        d = self.detection_for(case_id, image, pixel_spacing)
        if d.flagged and self.reject_unsure:
            raise InputError(None, f"the ROI detector is unsure where the knee joint is (confidence "
                                   f"{d.confidence:.2f} < {self.model.detector_config.min_confidence})")
        return d.box

    def boxes_for(self, images: Sequence[np.ndarray]) -> list[Box]:
        return self.model.predict_boxes(images)

    def __getstate__(self) -> dict[str, Any]:
        if self.path is None:
            raise TypeError("a DetectorRoi built from an in-memory model cannot be pickled; build it from a path")
        return {"path": self.path, "_model": None, "reject_unsure": self.reject_unsure}

    def __repr__(self) -> str:
        return f"DetectorRoi({self.path or self.model.name})"


__all__ = ["DetectorRoi"]
