"""The runner of a `.tflite` KneeNet (`kneetf export --tflite`), with `ai_edge_litert`
(`tf.lite.Interpreter` is deprecated).

The TFLite models take the ALREADY NORMALISED input `xray` (1, S, S, 1) float32 in [0, 1],
the output of `kneetf.preprocess.ops.preprocess_xray`; int8 models are quantised and
dequantised here with the scales stored in the file. Outputs are `xray_recon` and `mri`, as
in the SavedModel (`kneetf.protocol`).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from kneetf.errors import InputError
from kneetf.protocol import INPUT_KEY, OUTPUT_KEYS, SIGNATURE_DEFAULT


class TFLiteModel:
    """A `.tflite` KneeNet run with `ai_edge_litert`.

    `predict` takes NORMALISED X-rays — (S, S), (B, S, S) or (B, S, S, 1) float in [0, 1],
    the output of `kneetf.preprocess.ops.preprocess_xray` — and returns
    `{"mri": (B, S, S, slices), "xray_recon": (B, S, S, 1)}` float32; int8 models are
    quantised and dequantised with the scales stored in the file.

        >>> m = TFLiteModel("saved_models/kneetf/1/tflite/kneetf_int8.tflite")  # doctest: +SKIP
        >>> m.predict(x)["mri"].shape                                           # doctest: +SKIP
        (1, 128, 128, 20)
    """

    def __init__(self, path: str | Path, num_threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(self.path, "no such TFLite model")
        try:
            self._interpreter = Interpreter(model_path=str(self.path), num_threads=num_threads)
            self._runner = self._interpreter.get_signature_runner(SIGNATURE_DEFAULT)
        except (ValueError, RuntimeError) as e:
            raise InputError(self.path, f"not a kneetf TFLite model: {e}") from e
        inputs = self._runner.get_input_details()
        outputs = self._runner.get_output_details()
        if INPUT_KEY not in inputs or any(k not in outputs for k in OUTPUT_KEYS):
            raise InputError(self.path, f"expected input {INPUT_KEY!r} and outputs {OUTPUT_KEYS}; "
                                        f"found {list(inputs)} -> {list(outputs)}")
        self._input = inputs[INPUT_KEY]
        self._outputs = outputs
        self.image_size = int(self._input["shape"][1])
        self.input_dtype = np.dtype(self._input["dtype"])
        self._lock = threading.Lock()

    @property
    def quantized(self) -> bool:
        return np.issubdtype(self.input_dtype, np.integer)

    def _quantize(self, x: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return x.astype(self.input_dtype)
        scale, zero = self._input["quantization"]
        info = np.iinfo(self.input_dtype)
        return np.clip(np.round(x / scale + zero), info.min, info.max).astype(self.input_dtype)

    def _dequantize(self, name: str, y: np.ndarray) -> np.ndarray:
        detail = self._outputs[name]
        if np.issubdtype(np.dtype(detail["dtype"]), np.integer):
            scale, zero = detail["quantization"]
            return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
        return y.astype(np.float32)

    def predict(self, batch: Any) -> dict[str, np.ndarray]:
        """Run each sample of the batch (the TFLite graph has batch size 1)."""
        x = np.asarray(batch, dtype=np.float32)
        if x.ndim == 2:
            x = x[None, ..., None]
        elif x.ndim == 3:
            x = x[..., None]
        s = self.image_size
        if x.ndim != 4 or x.shape[1:] != (s, s, 1) or len(x) == 0:
            raise InputError(None, f"TFLite KneeNet takes normalised ({s}, {s}) images, a batch (B, {s}, {s}) or "
                                   f"(B, {s}, {s}, 1); got shape {np.shape(batch)} (resize and normalise first)")
        results: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUT_KEYS}
        with self._lock:
            for sample in x:
                out = self._runner(**{INPUT_KEY: self._quantize(sample[None])})
                for k in OUTPUT_KEYS:
                    results[k].append(self._dequantize(k, out[k]))
        return {k: np.concatenate(v) for k, v in results.items()}


__all__ = ["TFLiteModel"]
