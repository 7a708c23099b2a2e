"""What a reconstruction becomes on disk: NIfTI, a derived DICOM MR series, a PNG montage.

Geometry of the written files: `NOMINAL_SPACING` (slice, row, column) in mm, the default
sagittal orientation of `kneetf.io.writers` (slice 0 = the patient's leftmost slice).
Volumes are (slices, H, W) float32 in the normalised [0, 1] space (`to_output_volume`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kneetf.errors import ConfigError, InputError

#: (slice, row, column) spacing in mm written with every prediction. The OAI sagittal 3-D
#: DESS the paper uses has 0.7 mm slices and a 140 mm field of view; 128 pixels over
#: 140 mm give 1.09375 mm. The real spacing of a knee is not known from an X-ray: this is
#: nominal, for viewers.
NOMINAL_SPACING: tuple[float, float, float] = (0.7, 140.0 / 128.0, 140.0 / 128.0)
FORMATS = ("nifti", "dicom", "png")
SERIES_DESCRIPTION = "kneetf reconstruction from X-ray (not for diagnostic use)"


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """"nifti,dicom" -> ("nifti", "dicom"); unknown names are a ConfigError."""
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    names = ["nifti" if n in ("nii", "nii.gz") else n for n in names]
    bad = [n for n in names if n not in FORMATS]
    if bad or not names:
        raise ConfigError(f"--format takes a comma-separated list of {', '.join(FORMATS)}. "
                          f"Received: {text!r}")
    return tuple(dict.fromkeys(names))


def montage_image(volume: np.ndarray, xray: np.ndarray | None = None, cols: int = 7) -> np.ndarray:
    """8-bit grid of the slices of (slices, H, W) `volume`, the X-ray (H, W[, 1]) first."""
    from kneetf.viz import tile_slices

    tiles = np.asarray(volume, np.float32)
    if xray is not None:
        x = np.asarray(xray, np.float32).reshape(tiles.shape[1:])
        tiles = np.concatenate([x[None], tiles])
    grid = tile_slices(tiles, cols=cols)
    return np.round(np.clip(grid, 0, 1) * 255).astype(np.uint8)


def write_volume(path: str | Path, volume: np.ndarray, spacing: Sequence[float] = NOMINAL_SPACING,
                 xray: np.ndarray | None = None) -> Path:
    """Write a (slices, H, W) volume as NIfTI (`.nii` / `.nii.gz`) or as a PNG montage
    (`.png`, the model's X-ray `xray` first, as the knee looks), atomically."""
    from kneetf.io import writers

    path = Path(path)
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return writers.write_nifti(path, volume, spacing, slices_first=True)
    if name.endswith(".png"):
        return writers.write_png(path, montage_image(volume, xray), bits=8)
    raise InputError(path, "save writes .nii, .nii.gz or .png; use save_dicom for a DICOM series")


def write_dicom(folder: str | Path, volume: np.ndarray, spacing: Sequence[float] = NOMINAL_SPACING, *,
                side: str = "", patient: dict[str, Any] | None = None) -> list[Path]:
    """Write a (slices, H, W) volume as a derived DICOM MR series marked not for diagnostic
    use (new UIDs; anonymous unless `patient` is given); `side` sets the laterality."""
    from kneetf.io import writers

    laterality = {"left": "L", "right": "R"}.get(side)
    return writers.write_dicom_series(folder, volume, spacing, series_description=SERIES_DESCRIPTION,
                                      derived=True, patient=patient or None, laterality=laterality)


def write_prediction(out_dir: Path, prep: Any, volume: np.ndarray, formats: Sequence[str], *,
                     spacing: Sequence[float] = NOMINAL_SPACING, patient: dict[str, Any] | None = None
                     ) -> list[Path]:
    """Write the volume of one `PreparedXray` in each of `formats` as `<id>.nii.gz`,
    `<id>_dicom/` and `<id>.png`; returns the paths written."""
    written: list[Path] = []
    if "nifti" in formats:
        written.append(write_volume(out_dir / f"{prep.id}.nii.gz", volume, spacing))
    if "dicom" in formats:
        write_dicom(out_dir / f"{prep.id}_dicom", volume, spacing, side=prep.side, patient=patient)
        written.append(out_dir / f"{prep.id}_dicom")
    if "png" in formats:
        written.append(write_volume(out_dir / f"{prep.id}.png", volume, spacing, xray=prep.as_seen()))
    return written


__all__ = ["NOMINAL_SPACING", "FORMATS", "SERIES_DESCRIPTION", "parse_formats", "montage_image", "write_volume",
           "write_dicom", "write_prediction"]
