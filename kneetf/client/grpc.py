"""gRPC client of a TF Serving model server (PredictionService / ModelService).

    >>> client = ServingClient("localhost:8500")               # doctest: +SKIP
    >>> out = client.predict("knee.dcm")                       # doctest: +SKIP
    >>> out["mri"].shape                                       # doctest: +SKIP
    (1, 128, 128, 20)
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import grpc
import numpy as np
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc)

from kneetf.client.request import BaseClient
from kneetf.errors import ConfigError, InputError, ModelNotFoundError, ServerUnavailableError, ServingError
from kneetf.protocol import (CONTRACT_IMAGE_SIZE, CONTRACT_NUM_SLICES, DEFAULT_MODEL_NAME, SERVING_BATCH_SIZES,
                             SIGNATURE_DEFAULT, metadata_request, parse_metadata_response, parse_predict_response,
                             predict_request)

log = logging.getLogger(__name__)

TLS_KEYS = ("root_certificates", "private_key", "certificate_chain")


def _read_tls(tls: bool | str | Path | Mapping[str, str | Path]) -> grpc.ChannelCredentials:
    """Channel credentials from `tls`: True (system roots), a CA file, or a mapping of
    `root_certificates` / `private_key` / `certificate_chain` file paths (mutual TLS)."""
    if tls is True:
        return grpc.ssl_channel_credentials()
    paths = {"root_certificates": tls} if isinstance(tls, (str, Path)) else dict(tls)
    unknown = sorted(set(paths) - set(TLS_KEYS))
    if unknown:
        raise ConfigError(f"unknown TLS key(s) {', '.join(unknown)}; use {', '.join(TLS_KEYS)}")
    if ("private_key" in paths) != ("certificate_chain" in paths):
        raise ConfigError("mutual TLS needs both private_key and certificate_chain")
    blobs = {}
    for key, path in paths.items():
        if path is None:
            continue
        try:
            blobs[key] = Path(path).read_bytes()
        except OSError as e:
            raise InputError(path, f"cannot read TLS {key.replace('_', ' ')}: {e.strerror or e}") from e
    return grpc.ssl_channel_credentials(**blobs)


class ServingClient(BaseClient):
    """Send X-rays to TF Serving over gRPC and get `{"mri", "xray_recon"}` arrays back.

    Args:
        target: `host:port` of the gRPC API (TF Serving's `--port`, 8500 by default).
        model: the model name in the server's model config.
        version: a specific version, or None for the server's latest.
        signature: `serving_default` (float32, any size), `serving_uint16` (raw uint16) or
            `predict_normalized` (already normalised 128x128).
        timeout: deadline of each call, in seconds.
        tls: False (plaintext), True (TLS with the system roots), a CA certificate file, or a
            mapping with `root_certificates`, `private_key`, `certificate_chain` paths.
        retries: how many times a call is retried when the server is UNAVAILABLE (only
            then), with exponential backoff from `backoff` seconds.
        max_batch: largest batch per request; bigger inputs are split (by default the largest
            allowed batch size of serving/batching.config, `kneetf.protocol.SERVING_BATCH_SIZES`).
        resize: area-resize on the client (same op as the graph; results unchanged) so every
            request has the fixed shape server-side batching needs. `serving_default` only.
        image_size, num_slices: the outputs accepted per X-ray, `(image_size, image_size,
            num_slices)` MRI (the documented 128 and 20 by default). An answer of another
            shape, or with NaN, is a ServingError; a server whose signature metadata declares
            other sizes is named before the first answer is read.
        max_message_mb: gRPC send limit of the channel (requests).
        max_receive_mb: gRPC receive limit (answers); by default what `max_batch` X-rays'
            outputs take, plus a margin, so a lying server cannot make the client hold more.
        tls_server_name: expected name in the server certificate, when it differs from `target`.
    """

    def __init__(self, target: str, model: str = DEFAULT_MODEL_NAME, version: int | None = None,
                 signature: str = SIGNATURE_DEFAULT, timeout: float = 30.0,
                 tls: bool | str | Path | Mapping[str, str | Path] = False, retries: int = 3, *,
                 backoff: float = 0.25, max_backoff: float = 8.0, max_batch: int = max(SERVING_BATCH_SIZES),
                 resize: bool = True, image_size: int = CONTRACT_IMAGE_SIZE, num_slices: int = CONTRACT_NUM_SLICES,
                 max_message_mb: int = 256, max_receive_mb: float | None = None,
                 tls_server_name: str | None = None) -> None:
        super().__init__(target, model=model, version=version, signature=signature, timeout=timeout,
                         retries=retries, backoff=backoff, max_backoff=max_backoff, max_batch=max_batch,
                         resize=resize, image_size=image_size, num_slices=num_slices)
        self.target = target
        self.max_message_bytes = int(max_message_mb) * 1024 * 1024
        needed = self._response_bytes(self.max_batch)
        if max_receive_mb is None:
            self.max_receive_bytes = needed + needed // 4 + (1 << 20)
        else:
            self.max_receive_bytes = int(float(max_receive_mb) * 1024 * 1024)
            if self.max_receive_bytes < needed:
                raise ConfigError(f"max_receive_mb={max_receive_mb} is below the {needed / 2**20:.1f} MiB an answer "
                                  f"for max_batch={self.max_batch} X-rays takes; lower max_batch or raise it")
        options = [("grpc.max_send_message_length", self.max_message_bytes),
                   ("grpc.max_receive_message_length", self.max_receive_bytes)]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls:
            self._channel = grpc.secure_channel(target, _read_tls(tls), options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        prediction = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._predict = prediction.Predict
        self._metadata = prediction.GetModelMetadata
        self._status = model_service_pb2_grpc.ModelServiceStub(self._channel).GetModelStatus

    # === Public API ===

    def status(self) -> list[dict[str, Any]]:
        """The server's view of the model: one dict per version with `version`, `state`
        (e.g. AVAILABLE, LOADING) and `error_code` / `error_message`."""
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = self.model
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        response = self._call(self._status, request, "GetModelStatus")
        state_name = get_model_status_pb2.ModelVersionStatus.State.Name
        return [{"version": int(s.version), "state": state_name(s.state),
                 "error_code": int(s.status.error_code), "error_message": s.status.error_message}
                for s in response.model_version_status]

    def close(self) -> None:
        self._channel.close()

    # === Internals ===

    def _predict_chunk(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        request = predict_request(chunk, self.model, self.version, self.signature)
        return parse_predict_response(self._call(self._predict, request, "Predict"), len(chunk), self._expected)

    def _signature_outputs(self) -> dict[str, list[int]] | None:
        response = self._call(self._metadata, metadata_request(self.model, self.version), "GetModelMetadata")
        return parse_metadata_response(response, self.signature)

    def _call(self, method: Callable[..., Any], request: Any, what: str) -> Any:
        """Call with a deadline; retry with exponential backoff on UNAVAILABLE only."""
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    delay = min(self.backoff * 2 ** attempt, self.max_backoff)
                    log.warning("%s: %s unavailable (%s); retry %d/%d in %.2f s", what, self.target,
                                e.details() if hasattr(e, "details") else e, attempt + 1, self.retries, delay)
                    time.sleep(delay)
                    continue
                raise self._error(e, what, attempt + 1) from None
        raise AssertionError("unreachable")

    def _error(self, e: grpc.RpcError, what: str, attempts: int) -> Exception:
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        if code == grpc.StatusCode.NOT_FOUND:
            return ModelNotFoundError(f"{what}: the server does not serve {self._describe()}: {details}")
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServerUnavailableError(f"{what}: cannot reach TF Serving at {self.target} "
                                          f"after {attempts} attempt(s): {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServingError(f"{what}: no answer from {self.target} within {self.timeout:g} s (raise timeout?)")
        if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
            return InputError(None, f"{what}: {self._describe()} refused the request: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ServingError(f"{what}: message too large (this client receives at most "
                                f"{self.max_receive_bytes / 2**20:.1f} MiB) or server overloaded at {self.target}: "
                                f"{details}")
        return ServingError(f"{what}: {self._describe()} failed with {code.name if code else 'error'}: {details}")


__all__ = ["ServingClient"]
