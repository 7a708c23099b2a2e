"""The one geometry of every reconstruction kneetf writes: `kneetf predict`, the Python API
(`Reconstruction.affine`, `.save`, `.save_dicom`), `kneetf evaluate --save-volumes` and
`kneetf client` all take it from here, so the same volume gives byte-identical NIfTI headers
whichever path wrote it.

The contract (docs/contracts.md, "Output geometry"):

- array: (slices, rows, columns) float32 in the normalised [0, 1] space, slices first, in the
  slice order and in-plane orientation of the preprocessed MRI (the model's (H, W, slices)
  output through `kneetf.preprocess.xray.to_output_volume`);
- spacing (slice, row, column) mm: `NOMINAL_SPACING`, the OAI sagittal 3-D DESS the paper
  uses (0.7 mm slices; a 140 mm field of view over 128 pixels). The real size of a knee is
  not known from an X-ray: the spacing is nominal, for viewers and tools;
- orientation: sagittal, `kneetf.io.dicom.DEFAULT_ORIENTATION` in LPS (columns run anterior
  -> posterior, rows superior -> inferior, slice 0 is the patient's leftmost slice and slice
  k lies k * 0.7 mm to its right); voxel (0, 0, 0) at the origin;
- NIfTI-1: that array as stored (slices first), `affine` as both sform and qform with code 1
  (scanner), units mm, no intent, `cal_min`/`cal_max` 0 / 1 (the display range),
  `descrip` `DESCRIP`;
- DICOM: the same orientation, spacing and positions (ImageOrientationPatient,
  ImagePositionPatient of slice k = origin + k * 0.7 mm * normal, PixelSpacing,
  SliceThickness, SpacingBetweenSlices), so that dcm2niix or any reader of the series finds
  the NIfTI file's geometry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kneetf.io.dicom import DEFAULT_ORIENTATION, LPS_TO_RAS, slice_normal, voxel_to_lps
from kneetf.version import __version__

#: (slice, row, column) spacing in mm written with every reconstruction: nominal (OAI DESS).
NOMINAL_SPACING: tuple[float, float, float] = (0.7, 140.0 / 128.0, 140.0 / 128.0)
#: NIfTI `descrip` of every reconstruction (at most 80 bytes).
DESCRIP = f"kneetf {__version__} reconstruction from X-ray; normalised 0-1; not for diagnostic use"[:80]
#: NIfTI sform/qform code: 1, scanner-based anatomical coordinates (as dcm2niix writes).
XFORM_CODE = 1
#: The value range of a reconstruction: NIfTI cal_min/cal_max, the DICOM window.
VALUE_RANGE: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class OutputGeometry:
    """Spacing (slice, row, column) mm, LPS orientation (6 direction cosines: row, column
    direction) and the LPS position of voxel (0, 0, 0) of a slices-first volume."""

    spacing: tuple[float, float, float] = NOMINAL_SPACING
    orientation: tuple[float, ...] = tuple(float(v) for v in DEFAULT_ORIENTATION)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def normal(self) -> np.ndarray:
        """Unit LPS direction in which the slice index grows."""
        return slice_normal(self.orientation)

    @property
    def affine(self) -> np.ndarray:
        """4x4 RAS affine of the slices-first array: voxel (slice, row, column) -> mm."""
        col_row_slice = LPS_TO_RAS @ voxel_to_lps(self.orientation, self.spacing, self.origin)
        return col_row_slice[:, [2, 1, 0, 3]]

    def slice_position(self, k: int) -> np.ndarray:
        """LPS position (DICOM ImagePositionPatient) of the first voxel of slice `k`."""
        return np.asarray(self.origin, np.float64) + k * self.spacing[0] * self.normal

    def nifti_header(self) -> dict[str, Any]:
        """NIfTI header fields besides the affine and units: `descrip`, display range, intent."""
        return {"descrip": DESCRIP, "cal_min": VALUE_RANGE[0], "cal_max": VALUE_RANGE[1], "intent_code": 0}


#: The geometry of every written reconstruction.
GEOMETRY = OutputGeometry()


def output_affine() -> np.ndarray:
    """A copy of the RAS affine every reconstruction is written with (`GEOMETRY.affine`)."""
    return GEOMETRY.affine.copy()


__all__ = ["NOMINAL_SPACING", "DESCRIP", "XFORM_CODE", "VALUE_RANGE", "OutputGeometry", "GEOMETRY",
           "output_affine"]
