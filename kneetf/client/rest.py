"""REST client of a TF Serving model server (`/v1/models/...`), standard library only.

Same interface as `ServingClient`: `predict`, `status`, `health`. JSON carries every value as
text, so REST is several times slower than gRPC for volumes; prefer gRPC for batches.
"""
from __future__ import annotations

import json
import logging
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kneetf.client.request import BaseClient
from kneetf.errors import ConfigError, InputError, ModelNotFoundError, ServerUnavailableError, ServingError
from kneetf.protocol import DEFAULT_MODEL_NAME, SIGNATURE_DEFAULT, parse_rest_response, rest_body, rest_path

log = logging.getLogger(__name__)


class RestClient(BaseClient):
    """Send X-rays to TF Serving's REST API and get `{"mri", "xray_recon"}` arrays back.

    Args:
        url: base URL of the REST API, e.g. `http://localhost:8501` (TF Serving's
            `--rest_api_port`); `host:port` means `http://host:port`.
        model, version, signature, timeout, retries, max_batch, resize: as `ServingClient`.
        tls: False, True (HTTPS with the system roots) or a CA certificate file for HTTPS.
        form: `inputs` (columnar, default) or `instances` (row) request format.
        headers: extra HTTP headers (for example an authorisation header of a proxy).
    """

    def __init__(self, url: str, model: str = DEFAULT_MODEL_NAME, version: int | None = None,
                 signature: str = SIGNATURE_DEFAULT, timeout: float = 30.0, tls: bool | str | Path = False,
                 retries: int = 3, *, backoff: float = 0.25, max_backoff: float = 8.0, max_batch: int = 32,
                 resize: bool = True, image_size: int = 128, form: str = "inputs",
                 headers: Mapping[str, str] | None = None) -> None:
        if form not in ("inputs", "instances"):
            raise ConfigError(f"form must be 'inputs' or 'instances'. Received: form={form!r}")
        if "://" not in url:
            url = ("https://" if tls else "http://") + url
        super().__init__(url.rstrip("/"), model=model, version=version, signature=signature, timeout=timeout,
                         retries=retries, backoff=backoff, max_backoff=max_backoff, max_batch=max_batch,
                         resize=resize, image_size=image_size)
        self.url = self.address
        self.form = form
        self.headers = dict(headers or {})
        self._ssl: ssl.SSLContext | None = None
        if tls:
            cafile = None if tls is True else str(tls)
            if cafile and not Path(cafile).is_file():
                raise InputError(cafile, "TLS CA certificate file not found")
            self._ssl = ssl.create_default_context(cafile=cafile)

    # === Public API ===

    def status(self) -> list[dict[str, Any]]:
        """One dict per version: `version`, `state`, `error_code`, `error_message`."""
        body = self._request("GET", rest_path(self.model, self.version))
        return [{"version": int(s.get("version", 0)), "state": s.get("state", ""),
                 "error_code": s.get("status", {}).get("error_code", ""),
                 "error_message": s.get("status", {}).get("error_message", "")}
                for s in body.get("model_version_status", [])]

    # === Internals ===

    def _predict_chunk(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        body = self._request("POST", rest_path(self.model, self.version, "predict"),
                             rest_body(chunk, self.signature, self.form))
        return parse_rest_response(body, len(chunk))

    def _request(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        """One JSON request with a timeout; retried with exponential backoff when the server
        cannot be reached or answers 503."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", **self.headers}
        url = self.url + path
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout, context=self._ssl) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code == 503 and attempt < self.retries:
                    self._sleep(attempt, message)
                    continue
                if e.code == 404:
                    raise ModelNotFoundError(f"the server does not serve {self._describe()}: {message}") from None
                if e.code == 400:
                    raise InputError(None, f"{self._describe()} refused the request: {message}") from None
                if e.code == 503:
                    raise ServerUnavailableError(f"{self.url} is unavailable after {attempt + 1} attempt(s): "
                                                 f"{message}") from None
                raise ServingError(f"{method} {url} failed with HTTP {e.code}: {message}") from None
            except (urllib.error.URLError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):
                    raise ServingError(f"no answer from {self.url} within {self.timeout:g} s") from None
                if attempt < self.retries:
                    self._sleep(attempt, str(reason))
                    continue
                raise ServerUnavailableError(f"cannot reach TF Serving at {self.url} after {attempt + 1} "
                                             f"attempt(s): {reason}") from None
            except TimeoutError:
                raise ServingError(f"no answer from {self.url} within {self.timeout:g} s") from None
            except json.JSONDecodeError as e:
                raise ServingError(f"{url} did not answer JSON: {e}") from None
        raise AssertionError("unreachable")

    def _sleep(self, attempt: int, why: str) -> None:
        delay = min(self.backoff * 2 ** attempt, self.max_backoff)
        log.warning("%s unavailable (%s); retry %d/%d in %.2f s", self.url, why, attempt + 1, self.retries, delay)
        time.sleep(delay)


def _error_message(e: urllib.error.HTTPError) -> str:
    """TF Serving's `{"error": "..."}` message, or the raw body."""
    try:
        raw = e.read().decode("utf-8", "replace")
    except OSError:
        return str(e.reason)
    try:
        return str(json.loads(raw).get("error", raw))
    except (json.JSONDecodeError, AttributeError):
        return raw.strip() or str(e.reason)


__all__ = ["RestClient"]
