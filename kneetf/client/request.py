"""What the gRPC and REST clients share: X-rays as the checked batches a signature takes
(`as_batch`), split into requests of at most `max_batch`, and `BaseClient` (settings,
`predict`, the checks of what the server answers, `health`, the context manager).

The checks and the request/response encoding are `kneetf.protocol`'s, the same the exporter's
warm-up requests are built with.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from kneetf.errors import ConfigError, InputError, RoiNotFoundError, ServerUnavailableError, ServingError
from kneetf.protocol import (CONTRACT_IMAGE_SIZE, CONTRACT_NUM_SLICES, SIGNATURE_DEFAULT, SIGNATURE_DTYPES,
                             check_metadata_shapes, output_shapes, response_bytes, signature_batch)

log = logging.getLogger(__name__)


def as_batch(xray: Any, signature: str = SIGNATURE_DEFAULT, *, image_size: int = 128,
             resize: bool = False) -> np.ndarray:
    """Check `xray` and return the (B, H, W, 1) array that `signature` takes.

    Args:
        xray: a 2-D image (H, W), a batch (B, H, W) or (B, H, W, 1), or a path to an X-ray
            file (read with `kneetf.io.readers.read_xray`). Images are ROI-cropped knees.
        signature: one of `kneetf.protocol.SIGNATURE_DTYPES`; decides the dtype (float32 or
            uint16) and, for `predict_normalized`, requires (B, image_size, image_size, 1)
            values in [0, 1] (`kneetf.protocol.signature_batch`).
        image_size: the model's input side.
        resize: area-resize to (image_size, image_size) here, with the same TF op the export
            graph runs first (`kneetf.preprocess.ops.resize`), so the server's own resize is an
            exact identity and the result is unchanged. Only for `serving_default`. Requests
            then have one fixed shape, which TF Serving's batching needs, and are smaller.
    """
    where = None
    if isinstance(xray, (str, Path)):
        from kneetf.io.readers import read_xray  # lazy: the reader pulls in pydicom / OpenCV

        where = xray
        xray = read_xray(xray)[0]
    if resize and SIGNATURE_DTYPES.get(signature) == "uint16":
        raise InputError(where, f"{signature} sends raw uint16 pixels; client-side resize needs float32 "
                                f"(use {SIGNATURE_DEFAULT})")
    batch = signature_batch(xray, signature, image_size=image_size, where=where)
    if resize and signature == SIGNATURE_DEFAULT and batch.shape[1:3] != (image_size, image_size):
        from kneetf.preprocess.ops import resize as tf_resize

        batch = np.asarray(tf_resize(batch, image_size), dtype=np.float32)
    return batch


def crop_to_roi(xray: Any, roi: Any) -> np.ndarray:
    """The knee ROI of a full X-ray (a file path, read with `read_xray`, or a 2-D array in
    presentation values) cropped with the ROI source `roi` (anything with `box_for`; a file's
    pixel spacing goes to the sources that use it), as `kneetf predict` crops it."""
    from kneetf.preprocess.roi import crop_box, find_roi

    where, spacing = None, None
    if isinstance(xray, (str, Path)):
        from kneetf.io.readers import read_xray

        where = xray
        xray, meta = read_xray(xray)
        spacing = meta.pixel_spacing
    try:
        return crop_box(np.asarray(xray), find_roi(roi, Path(where).stem if where else "", xray, spacing,
                                                       where=where).box)
    except RoiNotFoundError as e:
        raise RoiNotFoundError(e.path or where, e.reason) from None
    except InputError as e:
        raise InputError(e.path or where, e.reason) from None


def split_batches(batch: np.ndarray, max_batch: int) -> Iterator[np.ndarray]:
    """Consecutive chunks of at most `max_batch` samples."""
    for start in range(0, len(batch), max(1, int(max_batch))):
        yield batch[start:start + max_batch]


class BaseClient:
    """The settings and the public API the gRPC and REST clients share; each subclass sends
    one request (`_predict_chunk`), reads the model's status (`status`) and its signature's
    declared outputs (`_signature_outputs`) its own way.

    `address` is where the server is (`host:port` or a URL); the other settings are those of
    `ServingClient`. The server is not trusted: every answer must have the outputs of
    `output_shapes` (checked against the server's signature metadata once, when it gives
    it), finite values, and fit the size limits, or the call raises ServingError.
    """

    def __init__(self, address: str, *, model: str, version: int | None, signature: str, timeout: float,
                 retries: int, backoff: float, max_backoff: float, max_batch: int, resize: bool,
                 image_size: int = CONTRACT_IMAGE_SIZE, num_slices: int = CONTRACT_NUM_SLICES) -> None:
        if signature not in SIGNATURE_DTYPES:
            raise ConfigError(f"unknown signature {signature!r}; choose one of {', '.join(SIGNATURE_DTYPES)}")
        if timeout <= 0 or retries < 0 or max_batch < 1:
            raise ConfigError(f"need timeout > 0, retries >= 0, max_batch >= 1. Received: timeout={timeout}, "
                              f"retries={retries}, max_batch={max_batch}")
        self.address = address
        self.model = model
        self.version = version
        self.signature = signature
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_batch = int(max_batch)
        self.resize = bool(resize) and signature == SIGNATURE_DEFAULT
        self.image_size = int(image_size)
        self.num_slices = int(num_slices)
        self._expected = output_shapes(self.image_size, self.num_slices)
        self._metadata_checked = False

    # === Public API ===

    def predict(self, xray: Any, *, roi: Any = None) -> dict[str, np.ndarray]:
        """Reconstruct MRI volumes.

        Args:
            xray: a 2-D image, a batch (B, H, W) or (B, H, W, 1), or an X-ray file path.
            roi: None (`xray` is the knee ROI already), or an ROI source that crops the full
                X-ray first (`crop_to_roi`): for the one the model was trained with,
                `kneetf.inference.loading.model_roi_source(run_or_export_folder)`.

        Returns:
            `{"mri": (B, 128, 128, 20), "xray_recon": (B, 128, 128, 1)}` float32 in [0, 1]
            (the sizes of `output_shapes`).
        """
        if roi is not None:
            xray = crop_to_roi(xray, roi)
        batch = as_batch(xray, self.signature, image_size=self.image_size, resize=self.resize)
        self._check_batch(batch)
        self.check_metadata()
        parts = [self._predict_chunk(chunk) for chunk in split_batches(batch, self.max_batch)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def output_shapes(self) -> dict[str, tuple[int, int, int]]:
        """The shape of each output per X-ray that this client accepts:
        `{"xray_recon": (S, S, 1), "mri": (S, S, num_slices)}` with S = `image_size`."""
        return dict(self._expected)

    def check_metadata(self) -> None:
        """Once per client: compare the outputs the server's signature declares (TF Serving's
        model metadata) with `output_shapes`, so that a model of another geometry is named
        before any answer is read. A server that gives no metadata is checked against the
        documented contract only (every answer still is)."""
        if self._metadata_checked:
            return
        try:
            dims = self._signature_outputs()
        except ServerUnavailableError:
            raise
        except ServingError as e:  # no metadata (or no such model: the predict call says so)
            log.debug("no signature metadata from %s (%s); checking answers against %s", self.address, e,
                      self._expected)
            dims = None
        if dims:
            check_metadata_shapes(dims, self._expected, self._describe())
        self._metadata_checked = True

    def status(self) -> list[dict[str, Any]]:
        """The server's view of the model: one dict per version with `version`, `state`
        (e.g. AVAILABLE, LOADING) and `error_code` / `error_message`."""
        raise NotImplementedError

    def health(self) -> bool:
        """True when the server answers and the model (version) is AVAILABLE."""
        try:
            return any(s["state"] == "AVAILABLE" for s in self.status())
        except ServingError as e:
            log.info("health check of %s failed: %s", self.address, e)
            return False

    def close(self) -> None:
        """Release the connection (nothing to release for one connection per request)."""

    def __enter__(self) -> "BaseClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # === Internals ===

    def _check_batch(self, batch: np.ndarray) -> None:
        """Refuse a batch the transport cannot carry (nothing by default)."""

    def _predict_chunk(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _signature_outputs(self) -> dict[str, list[int]] | None:
        """Output name -> dims the server declares for `signature` (None: not described)."""
        return None

    def _response_bytes(self, batch_size: int) -> int:
        return response_bytes(batch_size, self._expected)

    def _describe(self) -> str:
        version = "latest version" if self.version is None else f"version {self.version}"
        return f"model {self.model!r} ({version}) at {self.address}"


__all__ = ["as_batch", "crop_to_roi", "split_batches", "BaseClient"]
