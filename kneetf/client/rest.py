"""REST client of a TF Serving model server (`/v1/models/...`), standard library only.

Same interface as `ServingClient`: `predict`, `status`, `health`. JSON carries every value as
text, so REST is several times slower than gRPC for volumes; prefer gRPC for batches.

The server is not trusted: answers are read in chunks up to a size limit (what the expected
outputs take as JSON), checked like gRPC answers (`kneetf.protocol.parse_rest_response`), and
redirects are not followed (urllib would send the request's headers, an Authorization header
included, to wherever the server points).
"""
from __future__ import annotations

import http.client
import json
import logging
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kneetf.client.request import BaseClient
from kneetf.errors import ConfigError, InputError, ModelNotFoundError, ServerUnavailableError, ServingError
from kneetf.protocol import (CONTRACT_IMAGE_SIZE, CONTRACT_NUM_SLICES, DEFAULT_MODEL_NAME, SERVING_BATCH_SIZES,
                             SIGNATURE_DEFAULT, parse_rest_metadata, parse_rest_response, rest_body, rest_path)

log = logging.getLogger(__name__)

#: Bytes a float may take in TF Serving's JSON ("-1.23456789e-05, "), for the answer limit.
JSON_BYTES_PER_VALUE = 32
#: Size limit of answers without arrays (status, metadata, errors).
SMALL_ANSWER_BYTES = 1 << 20
_CHUNK = 1 << 16


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: TF Serving never redirects, and following one would carry the
    request's headers (credentials) to another address."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


class RestClient(BaseClient):
    """Send X-rays to TF Serving's REST API and get `{"mri", "xray_recon"}` arrays back.

    Args:
        url: base URL of the REST API, e.g. `http://localhost:8501` (TF Serving's
            `--rest_api_port`); `host:port` means `http://host:port`.
        model, version, signature, timeout, retries, max_batch, resize: as `ServingClient`.
        tls: False, True (HTTPS with the system roots) or a CA certificate file for HTTPS.
        form: `inputs` (columnar, default) or `instances` (row) request format.
        headers: extra HTTP headers (for example an authorisation header of a proxy); never
            sent anywhere but `url` (redirects are refused).
        image_size, num_slices: the outputs accepted per X-ray, as `ServingClient`.
        max_response_mb: size limit of one predict answer; by default what `max_batch`
            X-rays' outputs take as JSON.
    """

    def __init__(self, url: str, model: str = DEFAULT_MODEL_NAME, version: int | None = None,
                 signature: str = SIGNATURE_DEFAULT, timeout: float = 30.0, tls: bool | str | Path = False,
                 retries: int = 3, *, backoff: float = 0.25, max_backoff: float = 8.0,
                 max_batch: int = max(SERVING_BATCH_SIZES), resize: bool = True,
                 image_size: int = CONTRACT_IMAGE_SIZE, num_slices: int = CONTRACT_NUM_SLICES, form: str = "inputs",
                 headers: Mapping[str, str] | None = None, max_response_mb: float | None = None) -> None:
        if form not in ("inputs", "instances"):
            raise ConfigError(f"form must be 'inputs' or 'instances'. Received: form={form!r}")
        if "://" not in url:
            url = ("https://" if tls else "http://") + url
        scheme = url.split("://", 1)[0].lower()
        try:
            parts = urllib.parse.urlsplit(url)
            parts.port  # noqa: B018  (raises ValueError for a port that is not a number in 0-65535)
        except ValueError:
            parts = None
        if scheme not in ("http", "https") or parts is None or not parts.hostname:
            raise ConfigError(f"a REST server address is http://HOST:PORT or https://HOST:PORT. Received: {url!r}")
        super().__init__(url.rstrip("/"), model=model, version=version, signature=signature, timeout=timeout,
                         retries=retries, backoff=backoff, max_backoff=max_backoff, max_batch=max_batch,
                         resize=resize, image_size=image_size, num_slices=num_slices)
        self.url = self.address
        values = (self._response_bytes(self.max_batch) - 4096) // 4
        self.max_response_bytes = (int(float(max_response_mb) * 2**20) if max_response_mb is not None
                                   else values * JSON_BYTES_PER_VALUE + SMALL_ANSWER_BYTES)
        self.form = form
        self.headers = dict(headers or {})
        self._ssl: ssl.SSLContext | None = None
        if tls:
            cafile = None if tls is True else str(tls)
            if cafile and not Path(cafile).is_file():
                raise InputError(cafile, "TLS CA certificate file not found")
            self._ssl = ssl.create_default_context(cafile=cafile)
        handlers: list[Any] = [_NoRedirect()]
        if self._ssl is not None:
            handlers.append(urllib.request.HTTPSHandler(context=self._ssl))
        self._opener = urllib.request.build_opener(*handlers)

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
                             rest_body(chunk, self.signature, self.form),
                             limit=self._json_limit(len(chunk)))
        return parse_rest_response(body, len(chunk), self._expected)

    def _signature_outputs(self) -> dict[str, list[int]] | None:
        return parse_rest_metadata(self._request("GET", rest_path(self.model, self.version) + "/metadata"),
                                   self.signature)

    def _json_limit(self, batch_size: int) -> int:
        values = (self._response_bytes(batch_size) - 4096) // 4
        return min(self.max_response_bytes, values * JSON_BYTES_PER_VALUE + SMALL_ANSWER_BYTES)

    def _request(self, method: str, path: str, body: Any = None, limit: int = SMALL_ANSWER_BYTES) -> dict[str, Any]:
        """One JSON request with a timeout and an answer of at most `limit` bytes; retried
        with exponential backoff when the server cannot be reached or answers 503."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json", **self.headers}
        url = self.url + path
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with self._opener.open(request, timeout=self.timeout) as response:
                    return _read_json(response, limit, url)
            except urllib.error.HTTPError as e:
                if 300 <= e.code < 400:
                    raise ServingError(f"{method} {url} answered HTTP {e.code}, a redirect to "
                                       f"{e.headers.get('Location', '?')!r}; redirects are not followed (they would "
                                       "carry this request's headers elsewhere): give the final URL") from None
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
            except http.client.HTTPException as e:  # a gRPC port, or anything that does not speak HTTP
                raise ServerUnavailableError(f"{self.url} is not a TF Serving REST endpoint: its answer is not HTTP "
                                             f"({type(e).__name__}); the REST port is 8501 by default, gRPC "
                                             "(--server) 8500") from None
        raise AssertionError("unreachable")

    def _sleep(self, attempt: int, why: str) -> None:
        delay = min(self.backoff * 2 ** attempt, self.max_backoff)
        log.warning("%s unavailable (%s); retry %d/%d in %.2f s", self.url, why, attempt + 1, self.retries, delay)
        time.sleep(delay)


def _read_capped(response: Any, limit: int, url: str) -> bytes:
    """The body of `response`, read in chunks; more than `limit` bytes is a ServingError."""
    declared = response.headers.get("Content-Length") if response.headers else None
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise ServingError(f"{url} announced an answer of {int(declared)} bytes; at most {limit} are read")
    parts, size = [], 0
    while True:
        part = response.read(_CHUNK)
        if not part:
            return b"".join(parts)
        size += len(part)
        if size > limit:
            raise ServingError(f"{url} sent more than {limit} bytes; the answer is not read further")
        parts.append(part)


def _read_json(response: Any, limit: int, url: str) -> Any:
    raw = _read_capped(response, limit, url)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ServingError(f"{url} did not answer JSON: {str(e)[:200]}") from None


def _error_message(e: urllib.error.HTTPError) -> str:
    """TF Serving's `{"error": "..."}` message, or the raw body (at most 64 KiB read)."""
    try:
        raw = e.read(_CHUNK).decode("utf-8", "replace")
    except OSError:
        return str(e.reason)
    try:
        return str(json.loads(raw).get("error", raw))[:2000]
    except (json.JSONDecodeError, AttributeError, RecursionError):
        return raw.strip()[:2000] or str(e.reason)


__all__ = ["RestClient"]
