"""A stand-in for TF Serving, for tests and benchmarks: the real gRPC services
(`PredictionService.Predict`, `ModelService.GetModelStatus` from `tensorflow_serving.apis`)
and TF Serving's REST JSON API, over REAL exported SavedModels loaded with
`tf.saved_model.load`.

It follows TF Serving where clients can tell: the latest version by default, NOT_FOUND
(HTTP 404) for an unknown model, version or signature, INVALID_ARGUMENT (HTTP 400) for a
wrong input name, dtype or rank, named outputs, `output_filter`, the REST `instances` (row)
and `inputs` (columnar) forms, `{"error": ...}` bodies, and the model metadata
(`PredictionService.GetModelMetadata`, REST `/metadata`: the signature definitions of the
SavedModel). Tensors are encoded with TF's own `tf.make_tensor_proto` / `tf.make_ndarray`,
independent of the client's codec.

Hooks make it a lying server for the client's tests (`LocalServingServer.faults`): a
replacement gRPC Predict answer, a raw REST answer (status, headers, body bytes: wrong
shapes, huge bodies, redirects), no metadata.

Not part of the package. Run it by hand when no docker engine is available:

    python tests/serving_server.py saved_models/kneetf --grpc-port 8500 --rest-port 8501
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Mapping

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

log = logging.getLogger("serving_server")
DEFAULT_SIGNATURE = "serving_default"


class NotFound(LookupError):
    """Unknown model, version or signature (gRPC NOT_FOUND, HTTP 404)."""


class BadRequest(ValueError):
    """Malformed input (gRPC INVALID_ARGUMENT, HTTP 400)."""


class ModelStore:
    """Every numeric version under each model's base path, loaded with tf.saved_model.load."""

    def __init__(self, models: Mapping[str, str | Path]) -> None:
        self.models: dict[str, dict[int, Any]] = {}
        self.bases: dict[str, Path] = {}
        for name, base in models.items():
            base = Path(base)
            versions = sorted(int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit())
            if not versions:
                raise FileNotFoundError(f"{base}: no numeric version folder")
            self.models[name] = {v: tf.saved_model.load(str(base / str(v))) for v in versions}
            self.bases[name] = base
        self._lock = threading.Lock()

    def metadata(self, name: str, version: int | None) -> tuple[int, get_model_metadata_pb2.SignatureDefMap]:
        """The signature definitions of the SavedModel, as TF Serving's GetModelMetadata gives them."""
        version, _ = self.resolve(name, version)
        saved = saved_model_pb2.SavedModel()
        saved.ParseFromString((self.bases[name] / str(version) / "saved_model.pb").read_bytes())
        defs = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in saved.meta_graphs[0].signature_def.items():
            if not key.startswith("__"):
                defs.signature_def[key].CopyFrom(sig)
        return version, defs

    def resolve(self, name: str, version: int | None) -> tuple[int, Any]:
        if name not in self.models:
            raise NotFound(f"Servable not found for request: Latest({name})" if version is None
                           else f"Servable not found for request: Specific({name}, {version})")
        versions = self.models[name]
        if version is None:
            version = max(versions)
        if version not in versions:
            raise NotFound(f"Servable not found for request: Specific({name}, {version})")
        return version, versions[version]

    def signature(self, name: str, version: int | None, signature: str) -> tuple[int, Any]:
        version, loaded = self.resolve(name, version)
        signature = signature or DEFAULT_SIGNATURE
        if signature not in loaded.signatures:
            raise NotFound(f"Serving signature name: \"{signature}\" not found in signature def")
        return version, loaded.signatures[signature]

    @staticmethod
    def input_specs(fn: Any) -> dict[str, tf.TensorSpec]:
        return dict(fn.structured_input_signature[1])

    def run(self, name: str, version: int | None, signature: str, inputs: Mapping[str, np.ndarray],
            output_filter: list[str] | None = None) -> tuple[int, dict[str, np.ndarray]]:
        version, fn = self.signature(name, version, signature)
        specs = self.input_specs(fn)
        if set(inputs) != set(specs):
            raise BadRequest(f"input keys {sorted(inputs)} do not match the signature's {sorted(specs)}")
        feed = {}
        for key, value in inputs.items():
            spec = specs[key]
            if value.dtype != spec.dtype.as_numpy_dtype:
                raise BadRequest(f"Expects arg[0] to be {spec.dtype.name} but {tf.as_dtype(value.dtype).name} "
                                 "is provided")
            if not spec.shape.is_compatible_with(value.shape):
                raise BadRequest(f"input {key!r} of shape {value.shape} is not compatible with {spec.shape}")
            feed[key] = tf.constant(value)
        try:
            outputs = fn(**feed)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as e:
            raise BadRequest(str(e).splitlines()[0]) from e
        keys = output_filter or list(outputs)
        unknown = [k for k in keys if k not in outputs]
        if unknown:
            raise BadRequest(f"output tensor alias not found in signature: {unknown[0]}")
        return version, {k: outputs[k].numpy() for k in keys}

    def status(self, name: str, version: int | None) -> list[int]:
        if version is not None:
            return [self.resolve(name, version)[0]]
        if name not in self.models:
            raise NotFound(f"Could not find any versions of model {name}")
        return sorted(self.models[name])


# === gRPC ===

class _Faults:
    """Test hooks: make the next `unavailable` Predict calls fail with UNAVAILABLE, delay
    every call by `delay_s` seconds, answer no metadata (`metadata = False`), or replace the
    model's answer: `grpc_reply(request)` returns a PredictResponse, `rest_reply(body bytes)`
    returns (status, headers, body bytes) of a REST predict; None lets the model answer."""

    def __init__(self) -> None:
        self.reset()
        self.lock = threading.Lock()

    def reset(self) -> None:
        self.unavailable = 0
        self.delay_s = 0.0
        self.calls = 0
        self.grpc_reply: Any = None
        self.rest_reply: Any = None
        self.metadata = True

    def apply(self, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls += 1
            fail = self.unavailable > 0
            if fail:
                self.unavailable -= 1
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "test server: temporarily unavailable")
        if self.delay_s:
            time.sleep(self.delay_s)


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, store: ModelStore, faults: _Faults) -> None:
        self.store = store
        self.faults = faults

    def Predict(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext) -> Any:
        self.faults.apply(context)
        reply = self.faults.grpc_reply(request) if self.faults.grpc_reply else None
        if reply is not None:
            return reply
        spec = request.model_spec
        version = spec.version.value if spec.HasField("version") else None
        signature = spec.signature_name or DEFAULT_SIGNATURE
        try:
            inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
            version, outputs = self.store.run(spec.name, version, signature, inputs, list(request.output_filter))
        except NotFound as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except BadRequest as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        response.model_spec.signature_name = signature
        for key, value in outputs.items():
            response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
        return response

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        if not self.faults.metadata:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "test server: no metadata")
        spec = request.model_spec
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Metadata field signature_def must be requested")
        try:
            version, defs = self.store.metadata(spec.name, spec.version.value if spec.HasField("version") else None)
        except NotFound as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = version
        response.metadata["signature_def"].Pack(defs)
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, store: ModelStore) -> None:
        self.store = store

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        spec = request.model_spec
        try:
            versions = self.store.status(spec.name, spec.version.value if spec.HasField("version") else None)
        except NotFound as e:
            context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        response = get_model_status_pb2.GetModelStatusResponse()
        for v in versions:
            status = response.model_version_status.add()
            status.version = v
            status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
        return response


# === REST ===

_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?::(?P<verb>\w+))?$")


def _make_handler(store: ModelStore, faults: _Faults) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet
            log.debug(fmt, *args)

        def _send(self, code: int, body: Mapping[str, Any]) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> re.Match | None:
            match = _PATH.match(self.path)
            if not match:
                self._send(404, {"error": f"Malformed request: {self.command} {self.path}"})
            return match

        def _send_raw(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
            """A hook's answer as given: no Content-Length unless in `headers` (then the
            connection closes after the body)."""
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            try:
                for start in range(0, len(body), 1 << 16):
                    self.wfile.write(body[start:start + (1 << 16)])
            except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
                pass

        def do_GET(self) -> None:
            meta = re.match(r"^(?P<path>/v1/models/[^:]+)/metadata$", self.path)
            if meta:
                return self._metadata(meta["path"])
            match = self._route()
            if not match:
                return
            version = int(match["version"]) if match["version"] else None
            try:
                versions = store.status(match["name"], version)
            except NotFound as e:
                return self._send(404, {"error": str(e)})
            self._send(200, {"model_version_status": [
                {"version": str(v), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
                for v in versions]})

        def _metadata(self, path: str) -> None:
            match = _PATH.match(path)
            if not match or match["verb"] or not faults.metadata:
                return self._send(404, {"error": f"Malformed request: GET {self.path}"})
            try:
                version, defs = store.metadata(match["name"], int(match["version"]) if match["version"] else None)
            except NotFound as e:
                return self._send(404, {"error": str(e)})
            self._send(200, {"model_spec": {"name": match["name"], "signature_name": "", "version": str(version)},
                             "metadata": {"signature_def": json_format.MessageToDict(
                                 defs, preserving_proto_field_name=True)}})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            reply = faults.rest_reply(raw) if faults.rest_reply else None
            if reply is not None:
                return self._send_raw(*reply)
            match = self._route()
            if not match:
                return
            if match["verb"] != "predict":
                return self._send(404, {"error": f"Malformed request: POST {self.path}"})
            version = int(match["version"]) if match["version"] else None
            try:
                body = json.loads(raw or b"{}")
                signature = body.get("signature_name", DEFAULT_SIGNATURE)
                _, fn = store.signature(match["name"], version, signature)
                specs = ModelStore.input_specs(fn)
                if ("instances" in body) == ("inputs" in body):
                    raise BadRequest("JSON Value: must have exactly one of 'instances' or 'inputs'")
                row = "instances" in body
                raw = body["instances"] if row else body["inputs"]
                if not isinstance(raw, dict):
                    if len(specs) != 1:
                        raise BadRequest("named inputs are required for a multi-input signature")
                    raw = {next(iter(specs)): raw}
                inputs = {}
                for key, value in raw.items():
                    if key not in specs:
                        raise BadRequest(f"input {key!r} is not in the signature ({sorted(specs)})")
                    inputs[key] = np.asarray(value, dtype=specs[key].dtype.as_numpy_dtype)
                used_version, outputs = store.run(match["name"], version, signature, inputs)
            except NotFound as e:
                return self._send(404, {"error": str(e)})
            except (BadRequest, json.JSONDecodeError, TypeError) as e:
                return self._send(400, {"error": str(e)})
            except ValueError as e:  # np.asarray of ragged / non-numeric values
                return self._send(400, {"error": f"JSON Value could not be converted: {e}"})
            if row:
                n = len(next(iter(outputs.values())))
                self._send(200, {"predictions": [{k: v[i].tolist() for k, v in outputs.items()} for i in range(n)]})
            else:
                self._send(200, {"outputs": {k: v.tolist() for k, v in outputs.items()}})

    return Handler


# === Server ===

class LocalServingServer:
    """gRPC + REST test server on localhost (ports chosen by the OS unless given).

    Args:
        models: model name -> base folder holding numeric version folders.
        grpc_port, rest_port: 0 for a free port.
        tls: (private key PEM path, certificate PEM path) to serve gRPC over TLS.
    """

    def __init__(self, models: Mapping[str, str | Path], *, host: str = "127.0.0.1", grpc_port: int = 0,
                 rest_port: int = 0, tls: tuple[str | Path, str | Path] | None = None, workers: int = 8) -> None:
        self.store = ModelStore(models)
        self.faults = _Faults()
        self.host = host
        limit = 512 * 1024 * 1024
        self._grpc = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=workers),
                                 options=[("grpc.max_send_message_length", limit),
                                          ("grpc.max_receive_message_length", limit)])
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
            PredictionServicer(self.store, self.faults), self._grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(self.store), self._grpc)
        if tls:
            key, cert = (Path(p).read_bytes() for p in tls)
            creds = grpc.ssl_server_credentials([(key, cert)])
            self.grpc_port = self._grpc.add_secure_port(f"{host}:{grpc_port}", creds)
        else:
            self.grpc_port = self._grpc.add_insecure_port(f"{host}:{grpc_port}")
        self._http = ThreadingHTTPServer((host, rest_port), _make_handler(self.store, self.faults))
        self._http.daemon_threads = True
        self.rest_port = self._http.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def rest_url(self) -> str:
        return f"http://{self.host}:{self.rest_port}"

    def start(self) -> "LocalServingServer":
        self._grpc.start()
        self._thread = threading.Thread(target=self._http.serve_forever, name="rest", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._grpc.stop(grace=None)
        self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> "LocalServingServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# === Test models ===

def make_test_model(path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Save a `preset` KneeNet with seeded He-scaled random weights as `path` (.keras).

    Freshly initialised KneeNets output an almost constant 0.5 (the signal fades through the
    untrained stack), which would make every comparison trivially pass; these weights give
    outputs that vary with the pixel and the input.
    """
    from kneetf.models.kneenet import KneeNet

    model = KneeNet.from_preset(preset)
    rng = np.random.default_rng(seed)
    for w in model.weights:
        name, shape = w.path, tuple(w.shape)
        if name.endswith("kernel"):
            transpose = "deconv" in name
            fan = int(np.prod(shape[:-2])) * (shape[-1] if transpose else shape[-2])
            fan = max(1, fan // 4) if transpose else fan
            w.assign(rng.normal(0.0, np.sqrt(2.0 / fan), shape).astype("float32"))
        elif name.endswith("bias") or name.endswith("beta"):
            w.assign(rng.normal(0.0, 0.1, shape).astype("float32"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base_path", help="model base folder with numeric version folders")
    parser.add_argument("--name", default="kneetf", help="model name (default: kneetf)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=8500)
    parser.add_argument("--rest-port", type=int, default=8501)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    with LocalServingServer({args.name: args.base_path}, host=args.host, grpc_port=args.grpc_port,
                           rest_port=args.rest_port) as server:
        log.info("serving %s: gRPC %s, REST %s (Ctrl-C to stop)", args.name, server.grpc_target, server.rest_url)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
