"""The Python API: `load_model` (the Keras model) and `Reconstructor` (X-ray in, volume out).

    import numpy as np
    import kneetf

    model = kneetf.load_model("runs/compact")   # normalised (B, 128, 128, 1) -> {"xray_recon", "mri"}
    rec = kneetf.Reconstructor.load("runs/compact")
    r = rec.predict("knee.dcm")                  # r.volume: (20, 128, 128) float32, slices first
    r.save("knee_mri.nii.gz")

`Reconstructor` applies what the cache applied to the training X-rays (ROI crop,
left-knee mirroring when the model's preprocessing mirrors, resize + robust normalisation;
see `kneetf.preprocess.xray`), runs the model (Keras, SavedModel or TFLite, through
`kneetf.inference`) and returns volumes in the preprocessed MRI's slice order and orientation.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kneetf.errors import ConfigError, InputError
from kneetf.inference.batch import file_id, safe_id
from kneetf.inference.geometry import GEOMETRY, output_affine
from kneetf.inference.loading import load_model, model_roi_source
from kneetf.inference.outputs import write_dicom, write_volume
from kneetf.inference.predictor import load_predictor
from kneetf.preprocess.roi import Box
from kneetf.preprocess.xray import mirror_xray, normalize_side, prepare_xray, roi_source, to_output_volume

__all__ = ["load_model", "Reconstructor", "Reconstruction"]


@dataclass
class Reconstruction:
    """One reconstructed knee.

    volume: (slices, H, W) float32 in the normalised [0, 1] space, the preprocessed MRI's
        slice order and in-plane orientation (slices first, as in the written NIfTI).
    spacing: (slice, row, column) mm and affine: the 4x4 RAS affine of `volume` as it is
        (voxel (slice, row, column) -> mm), both from the one output geometry
        (`kneetf.inference.geometry`) that `save`, `save_dicom`, `kneetf predict`,
        `kneetf evaluate` and `kneetf client` write.
    id, side: the knee; box: the ROI box (`kneetf.preprocess.roi.Box`) in X-ray pixels;
    xray: the model input (H, W, 1); mirrored: whether the knee was mirrored for the model
    (already undone in `volume`).
    """

    volume: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    id: str = ""
    box: Any = None
    side: str = ""
    mirrored: bool = False
    xray: np.ndarray | None = field(default=None, repr=False)

    def save(self, path: str | Path) -> Path:
        """Write the volume as NIfTI (`.nii` / `.nii.gz`) or a PNG montage (`.png`), atomically."""
        xray = None if self.xray is None else (mirror_xray(self.xray) if self.mirrored else self.xray)
        return write_volume(path, self.volume, xray=xray)

    def save_dicom(self, folder: str | Path, patient: dict[str, Any] | None = None) -> list[Path]:
        """Write the volume as a derived DICOM MR series into `folder` (new, empty, or holding an
        earlier series kneetf wrote, which is replaced; any other content is an InputError and
        is left alone): a random pseudonymous patient, or `patient` (DICOM keywords -> values,
        e.g. {"PatientID": ...}) when given."""
        return write_dicom(folder, self.volume, side=self.side, patient=patient)


class Reconstructor:
    """ROI + preprocessing + model: `predict(xray_or_path) -> Reconstruction`.

    Build it with `Reconstructor.load(path, roi=None)`: `path` is a `.keras` file, a run
    folder, a SavedModel folder or a `.tflite` file; `roi` is None (the ROI source the model
    was trained with, else the built-in detector: `kneetf.inference.loading.model_roi_source`),
    "builtin", "classical" (the image-analysis fallback), a boxes CSV (ids = file stems or the
    `id` you pass), an ROI detector `.keras`, a fixed `Box`, or any object with
    `box_for(id, image)`. `Reconstructor(predictor)` alone crops with the built-in detector.
    """

    def __init__(self, predictor: Any, roi: Any = None) -> None:
        self.predictor = predictor
        self.roi = roi_source(roi)

    @classmethod
    def load(cls, path: Any, roi: Any = None, preprocess: Any = None, *, trust_model: bool = False
             ) -> "Reconstructor":
        """Load the model at `path` (or wrap a keras.Model); `preprocess` overrides the
        recorded preprocessing config (a PreprocessConfig or a JSON holding one). Without
        `roi`, X-rays are cropped by the ROI source the model was trained with. A SavedModel
        or TFLite file with operations kneetf models never use (file or other I/O) is refused
        unless `trust_model` (a model file is code)."""
        return cls(load_predictor(path, preprocess, trust_model=trust_model),
                   model_roi_source(path if isinstance(path, (str, Path)) else None, roi))

    @property
    def preprocess(self) -> Any:
        """The PreprocessConfig applied to X-rays."""
        return self.predictor.preprocess

    def _prepare(self, item: Any, case_id: str | None, side: str | None, box: Any, cropped: bool) -> Any:
        from kneetf.io.readers import read_xray

        info: dict[str, Any] = {}
        if side and not normalize_side(side):
            raise InputError(item if isinstance(item, (str, Path)) else None,
                             f"side must be 'left', 'right', 'L' or 'R'. Received: side={side!r}")
        if box is not None and not isinstance(box, Box):
            try:
                box = Box(*(float(v) for v in box))
            except (TypeError, ValueError):
                raise InputError(None, f"box must be a kneetf.preprocess.roi.Box or (x0, y0, x1, y1). "
                                       f"Received: box={box!r}") from None
            if not all(math.isfinite(v) for v in box.as_tuple()) or box.width <= 0 or box.height <= 0:
                raise InputError(None, f"box needs finite x0 < x1 and y0 < y1. Received: box={box.as_tuple()}")
        if isinstance(item, (str, Path)):
            path = Path(item)
            image, meta = read_xray(path)
            side = side or getattr(meta, "laterality", None)
            case_id = case_id or safe_id(file_id(path))
            source = str(path)
            info = meta.to_dict()
        else:
            image, source = np.asarray(item), ""
        if cropped:
            box = Box(0.0, 0.0, float(image.shape[1]), float(image.shape[0]))
        return prepare_xray(image, self.preprocess, self.roi, case_id=case_id or "", side=side or "", box=box,
                            source=source, meta=info)

    def predict(self, xray: Any, *, id: str | None = None, side: str | None = None, box: Any = None,
                cropped: bool = False) -> Reconstruction:
        """Reconstruct one knee from an X-ray file path or a 2-D array (the full X-ray,
        bone bright). `side` ("left"/"right") matters when the model mirrors left knees (a
        DICOM's laterality is used by default); `box` skips the ROI search; `cropped=True`
        says the array is already the knee ROI."""
        return self.predict_batch([xray], ids=[id] if id else None, sides=[side] if side else None,
                                  boxes=[box] if box is not None else None, cropped=cropped)[0]

    def predict_batch(self, xrays: Sequence[Any], *, ids: Sequence[str] | None = None,
                      sides: Sequence[str] | None = None, boxes: Sequence[Any] | None = None,
                      cropped: bool = False, batch_size: int = 8) -> list[Reconstruction]:
        """`predict` for several X-rays (paths or arrays), `batch_size` per model call.
        The first input that cannot be used raises an InputError naming it."""
        n = len(xrays)
        try:
            step = operator.index(batch_size)  # any integer type (numpy's too), not a float
        except TypeError:
            step = 0
        if step < 1:
            raise ConfigError(f"batch_size must be an integer >= 1. Received: batch_size={batch_size!r}")
        for name, seq in (("ids", ids), ("sides", sides), ("boxes", boxes)):
            if seq is not None and len(seq) != n:
                raise ConfigError(f"{name} must have one entry per X-ray ({n}). Received: {len(seq)}")
        prepared = [self._prepare(x, ids[i] if ids else None, sides[i] if sides else None,
                                  boxes[i] if boxes else None, cropped) for i, x in enumerate(xrays)]
        out: list[Reconstruction] = []
        for s in range(0, n, step):
            chunk = prepared[s:s + step]
            mri = self.predictor(np.stack([p.xray for p in chunk]))
            for p, vol in zip(chunk, mri):
                out.append(Reconstruction(volume=to_output_volume(vol, p.mirrored), spacing=GEOMETRY.spacing,
                                          affine=output_affine(), id=p.id, box=p.box, side=p.side,
                                          mirrored=p.mirrored, xray=p.xray))
        return out

    def __repr__(self) -> str:
        return f"Reconstructor({self.predictor!r}, roi={self.roi!r})"
