"""Full X-rays through a TF Serving model, prepared and un-mirrored as `kneetf predict` does.

`kneetf predict` reads an X-ray, finds the knee ROI, crops it, mirrors a left knee when the
model's preprocessing mirrors, resizes and normalises the crop, runs the model and undoes
the mirroring on the volume. `reconstruct` runs the same code on the client up to the crop
(`kneetf.inference.batch.read_input` without the normalisation, i.e.
`kneetf.preprocess.xray.crop_xray`), sends the crop to the export's `serving_default`
signature, and turns the answer into the volume with `to_output_volume`.

Why `serving_default` and not `predict_normalized`: the export's `serving_default` graph
runs the same resize and robust normalisation (`kneetf.preprocess.ops.preprocess_xray`) with
the percentiles the model was exported with, so the server sees the tensor `kneetf predict`
feeds the model, whatever the client knows about the model. The client's area resize to
128x128 (on by default) is that graph's first op, so the graph's own resize is then an exact
identity: the request is 64 KiB per X-ray, as small as a normalised one. Sending normalised
X-rays instead would move the percentiles to the client, where a missing or stale export
description would change the answer silently.

What the client needs to know about the model (left-knee mirroring, sizes, the ROI source
it was trained with) comes from the export's `kneetf_export.json` (`read_model_info`); without
it, the documented defaults and the built-in ROI detector are used.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kneetf.config import PreprocessConfig
from kneetf.errors import InputError
from kneetf.inference.batch import XrayInput, read_input
from kneetf.inference.loading import read_preprocess_config, read_roi_record
from kneetf.preprocess.roi import Box
from kneetf.preprocess.xray import PreparedXray, to_output_volume
from kneetf.protocol import EXPORT_INFO_FILE, SIGNATURE_NORMALIZED


@dataclass(frozen=True)
class ModelInfo:
    """What the client knows about the served model: its preprocessing config and the record
    of the ROI source it was trained with (`kneetf.inference.loading.read_roi_record`; None:
    the built-in detector), read from `path`."""

    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    roi: dict[str, Any] | None = None
    path: Path | None = None


def read_model_info(path: str | Path | None = None) -> ModelInfo:
    """The `ModelInfo` of an export: `path` is its `kneetf_export.json` or its version folder
    (a run folder's `config.json` works too). None gives the defaults."""
    if path is None:
        return ModelInfo()
    preprocess = read_preprocess_config(path)
    if preprocess is None:
        raise InputError(path, f"holds no model description (an export's {EXPORT_INFO_FILE} with a "
                               "\"preprocess\" entry)")
    record = read_roi_record(path)
    return ModelInfo(preprocess=preprocess, roi=record[0] if record else None, path=Path(path))


class WholeImage:
    """The ROI source of X-rays that are already knee crops: the whole image."""

    def box_for(self, case_id: str, image: np.ndarray) -> Box:
        return Box(0.0, 0.0, float(image.shape[1]), float(image.shape[0]))


def reconstruct(client: Any, item: XrayInput, preprocess: PreprocessConfig, roi: Any
                ) -> tuple[PreparedXray, np.ndarray]:
    """One X-ray file through `client` (a `ServingClient` or `RestClient`), as `kneetf
    predict` runs it: (the prepared X-ray, the (slices, H, W) float32 volume with the
    mirroring undone). `roi` is an ROI source (`kneetf.preprocess.xray.roi_source`)."""
    normalized = client.signature == SIGNATURE_NORMALIZED
    prep = read_input(item, preprocess, roi, normalize=normalized)
    mri = client.predict(prep.xray[None])["mri"][0]
    return prep, to_output_volume(mri, prep.mirrored)


__all__ = ["ModelInfo", "read_model_info", "WholeImage", "reconstruct"]
