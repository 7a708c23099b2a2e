"""The contract between the stages that write models and those that read them: file names of
a run folder and of an export, the TF Serving signatures, and the ONE place where arrays
become TF Serving requests and responses become arrays.

`kneetf.export` writes by it, `kneetf.inference` reads run folders and exports by it, and the
gRPC client, the REST client and the exporter's warm-up writer build their requests with it,
so none of them can disagree on names, dtypes or layout. A base module: numpy only; the
TF Serving protos are imported inside the functions that build or parse them, so importing
it (and the REST client) does not import TensorFlow.

Signatures of an export (every one returns `xray_recon` (batch, 128, 128, 1) and `mri`
(batch, 128, 128, 20)):

- `serving_default`: input `xray` (batch, H, W, 1) float32, any H and W, already cropped to
  the knee ROI; resize and robust normalisation run inside the graph.
- `serving_uint16`: the same graph for raw uint16 pixels (half the bytes of float32 on the wire).
- `predict_normalized`: input `xray` (batch, 128, 128, 1) float32 already normalised to [0, 1].

Requests and responses: `signature_batch` checks an array against a signature;
`predict_request` / `parse_predict_response` are the gRPC `PredictRequest` /
`PredictResponse`; `rest_body` / `parse_rest_response` TF Serving's REST JSON (`instances` or
`inputs` form); `warmup_record` a serialised `PredictionLog` for the warm-up file. Tensors are
packed into `tensor_content` bytes (not repeated float fields): smaller and much faster to
build than `tf.make_tensor_proto` for image-sized arrays.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from kneetf.errors import ConfigError, InputError, ServingError

# === Files ===

#: A training run folder: the model (best on validation), the config it was trained with
#: (its "preprocess" entry is what inference applies), the per-epoch history and the backup
#: an interrupted run resumes from.
RUN_MODEL_FILE = "model.keras"
RUN_CONFIG_FILE = "config.json"
RUN_HISTORY_FILE = "history.csv"
RUN_BACKUP_DIR = "backup"
#: The ROI detector a model's training crops came from, copied beside the model (in a run
#: folder, a cache folder; `assets.extra/` of an export) so that it travels with it.
ROI_DETECTOR_FILE = "roi_detector.keras"
EXPORT_ROI_DETECTOR = "assets.extra/" + ROI_DETECTOR_FILE
#: An export's version folder: its description (with "preprocess"), the TFLite models, the
#: warm-up requests TF Serving replays at load time.
EXPORT_INFO_FILE = "kneetf_export.json"
TFLITE_DIR = "tflite"
WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
DEFAULT_MODEL_NAME = "kneetf"

# === Signatures ===

SIGNATURE_DEFAULT = "serving_default"
SIGNATURE_UINT16 = "serving_uint16"
SIGNATURE_NORMALIZED = "predict_normalized"
#: signature name -> dtype of its `xray` input
SIGNATURE_DTYPES: dict[str, str] = {
    SIGNATURE_DEFAULT: "float32",
    SIGNATURE_UINT16: "uint16",
    SIGNATURE_NORMALIZED: "float32",
}
INPUT_KEY = "xray"
OUTPUT_KEYS: tuple[str, ...] = ("xray_recon", "mri")

#: Smallest accepted image side: catches (H, W, 1) passed where (B, H, W) is expected.
MIN_SIDE = 8

# === What a server may answer ===

#: The documented outputs of an export, used when the server does not describe its model:
#: 128x128 images and 20 MRI slices per X-ray.
CONTRACT_IMAGE_SIZE = 128
CONTRACT_NUM_SLICES = 20
#: The most values one X-ray's outputs may hold, whatever a server claims (2**25 float32
#: values = 128 MiB; a kneetf export answers 344 064).
MAX_OUTPUT_VALUES = 1 << 25
#: The batch sizes TF Serving's batching may form (`allowed_batch_sizes` of
#: serving/batching.config, checked by the tests): the export writes a warm-up request for
#: each, and the clients split bigger batches at the largest.
SERVING_BATCH_SIZES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


def output_shapes(image_size: int = CONTRACT_IMAGE_SIZE, num_slices: int = CONTRACT_NUM_SLICES
                  ) -> dict[str, tuple[int, int, int]]:
    """The shape of each output per X-ray: `{"xray_recon": (S, S, 1), "mri": (S, S, slices)}`."""
    shapes = {"xray_recon": (int(image_size), int(image_size), 1),
              "mri": (int(image_size), int(image_size), int(num_slices))}
    for key, shape in shapes.items():
        if min(shape) < 1 or int(np.prod(shape)) > MAX_OUTPUT_VALUES:
            raise ConfigError(f"output {key!r} of {shape} per X-ray is not a kneetf output "
                              f"(at most {MAX_OUTPUT_VALUES} values)")
    return shapes


def response_bytes(batch_size: int, shapes: Mapping[str, Sequence[int]]) -> int:
    """Bytes of the float32 outputs of one response for `batch_size` X-rays, plus framing."""
    return int(batch_size) * sum(int(np.prod(s)) for s in shapes.values()) * 4 + 4096


def check_metadata_shapes(dims: Mapping[str, Sequence[int]], expected: Mapping[str, Sequence[int]],
                          where: str) -> None:
    """Compare the output dims a server's signature metadata declares (batch first, -1 when
    unknown) with the shapes the client `expected`; a known dimension that differs is a
    ServingError naming `where` (the model on the server)."""
    for key in OUTPUT_KEYS:
        if key not in dims:
            raise ServingError(f"{where}: its signature has no output {key!r} (has {', '.join(dims) or 'none'}); "
                               "was it exported by `kneetf export`?")
        got = [int(d) for d in dims[key]]
        want = list(expected[key])
        if len(got) != len(want) + 1 or any(g not in (-1, w) for g, w in zip(got[1:], want)):
            raise ServingError(f"{where}: output {key!r} is declared as {tuple(got)}; this client takes "
                               f"(B, {', '.join(map(str, want))}) (set image_size / num_slices, or --model-info, "
                               "to the model's)")


def _check_shape(key: str, shape: Sequence[int], batch_size: int | None,
                 expected: Mapping[str, Sequence[int]] | None) -> None:
    shape = tuple(int(d) for d in shape)
    if expected is not None:
        want = (batch_size if batch_size is not None else (shape[0] if shape else -1), *expected[key])
        if shape != want:
            raise ServingError(f"the server returned {key!r} of shape {shape}; expected {want}")
        return
    if len(shape) != 4 or min(shape) < 0 or (batch_size is not None and shape[0] != batch_size):
        raise ServingError(f"the server returned {key!r} of shape {shape}; expected ({batch_size}, H, W, C)")
    if shape[0] and int(np.prod(shape[1:])) > MAX_OUTPUT_VALUES:
        raise ServingError(f"the server returned {key!r} of shape {shape}: more than {MAX_OUTPUT_VALUES} "
                           "values per X-ray")


def _check_values(key: str, array: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(array)):
        raise ServingError(f"the server returned {key!r} with NaN or infinite values")
    return array


def signature_batch(array: Any, signature: str = SIGNATURE_DEFAULT, *, image_size: int = 128,
                    where: Any = None) -> np.ndarray:
    """Check `array` (a 2-D image (H, W), or a batch (B, H, W) or (B, H, W, 1)) and return the
    (B, H, W, 1) array of the dtype `signature` takes. `predict_normalized` requires
    (B, image_size, image_size, 1) values in [0, 1]; `serving_uint16` integer values in
    [0, 65535]. Errors name `where` (the file the array came from)."""
    if signature not in SIGNATURE_DTYPES:
        raise InputError(None, f"unknown signature {signature!r}; the export has {', '.join(SIGNATURE_DTYPES)}")
    given = np.shape(array)
    array = np.asarray(array)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.integer)
                                     or np.issubdtype(array.dtype, np.floating)):
        raise InputError(where, f"expected a numeric image array, got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[None, :, :, None]
    elif array.ndim == 3:
        array = array[..., None]
    elif array.ndim != 4 or array.shape[-1] != 1:
        raise InputError(where, "expected a 2-D image (H, W) or a batch (B, H, W) / (B, H, W, 1); "
                                f"got shape {given}")
    b, h, w, _ = array.shape
    if b == 0:
        raise InputError(where, "the batch is empty")
    if min(h, w) < MIN_SIDE:
        raise InputError(where, f"image of {h}x{w} px is too small (a 3-D array is read as (batch, H, W)); "
                                f"got shape {given}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        raise InputError(where, "the image contains NaN or infinite values")
    if signature == SIGNATURE_NORMALIZED:
        if (h, w) != (image_size, image_size):
            raise InputError(where, f"{signature} takes normalised {image_size}x{image_size} images; got {h}x{w}")
        if array.min() < -1e-6 or array.max() > 1 + 1e-6:
            raise InputError(where, f"{signature} takes values in [0, 1]; got [{array.min()}, {array.max()}]")
    elif SIGNATURE_DTYPES[signature] == "uint16":
        if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
            raise InputError(where, f"{signature} takes integer pixel values; got non-integer floats")
        if array.min() < 0 or array.max() > np.iinfo(np.uint16).max:
            raise InputError(where, f"{signature} takes values in [0, 65535]; got [{array.min()}, {array.max()}]")
    return np.ascontiguousarray(array, dtype=SIGNATURE_DTYPES[signature])


# === TensorProto <-> numpy ===

def _dtype_maps() -> tuple[dict[np.dtype, int], dict[int, np.dtype]]:
    from tensorflow.core.framework import types_pb2

    pairs = [(np.float32, types_pb2.DT_FLOAT), (np.float64, types_pb2.DT_DOUBLE), (np.float16, types_pb2.DT_HALF),
             (np.uint8, types_pb2.DT_UINT8), (np.int8, types_pb2.DT_INT8), (np.uint16, types_pb2.DT_UINT16),
             (np.int16, types_pb2.DT_INT16), (np.int32, types_pb2.DT_INT32), (np.int64, types_pb2.DT_INT64)]
    return {np.dtype(n): t for n, t in pairs}, {t: np.dtype(n) for n, t in pairs}


def tensor_proto(array: np.ndarray) -> Any:
    """A `TensorProto` holding `array` as little-endian `tensor_content` bytes."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    to_enum, _ = _dtype_maps()
    array = np.asarray(array)
    if array.dtype not in to_enum:
        raise InputError(None, f"cannot send dtype {array.dtype} to TF Serving")
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d))
                                                   for d in array.shape])
    content = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    return tensor_pb2.TensorProto(dtype=to_enum[array.dtype], tensor_shape=shape, tensor_content=content)


def tensor_shape(proto: Any) -> tuple[int, ...]:
    """The shape a `TensorProto` declares (read before any value is decoded)."""
    return tuple(int(d.size) for d in proto.tensor_shape.dim)


def to_ndarray(proto: Any) -> np.ndarray:
    """The numpy array of a `TensorProto` (tensor_content or the typed repeated fields).
    The values present must match the declared shape (one value for TF's compact form of a
    constant tensor); check the declared shape (`tensor_shape`) first when it comes from
    someone else: the compact form is expanded to it."""
    from tensorflow.core.framework import types_pb2

    _, from_enum = _dtype_maps()
    if proto.dtype not in from_enum:
        raise ServingError(f"the server returned a tensor of unsupported dtype enum {proto.dtype}")
    dtype = from_enum[proto.dtype]
    shape = tensor_shape(proto)
    if any(d < 0 for d in shape):
        raise ServingError(f"the server returned a tensor of shape {shape}")
    n = int(np.prod(shape)) if shape else 1
    if proto.tensor_content:
        if len(proto.tensor_content) != n * dtype.itemsize:
            raise ServingError(f"tensor of shape {shape} arrived with {len(proto.tensor_content)} bytes")
        values = np.frombuffer(proto.tensor_content, dtype=dtype.newbyteorder("<")).astype(dtype)
    elif proto.dtype == types_pb2.DT_HALF:
        values = np.asarray(proto.half_val, dtype=np.uint16).view(np.float16)
    else:
        field = {np.dtype(np.float32): "float_val", np.dtype(np.float64): "double_val",
                 np.dtype(np.int64): "int64_val"}.get(dtype, "int_val")
        values = np.asarray(getattr(proto, field), dtype=dtype)
    if values.size == 1 and n > 1:  # TF's compact form: one value repeated
        values = np.full(n, values[0], dtype=dtype)
    if values.size != n:
        raise ServingError(f"tensor of shape {shape} arrived with {values.size} values")
    return values.reshape(shape)


# === gRPC ===

def predict_request(batch: np.ndarray, model: str, version: int | None = None,
                    signature: str = SIGNATURE_DEFAULT) -> Any:
    """A `PredictRequest` for `batch` (from `signature_batch`) asking for both named outputs."""
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    request.inputs[INPUT_KEY].CopyFrom(tensor_proto(batch))
    request.output_filter.extend(OUTPUT_KEYS)
    return request


def _check_output_keys(outputs: Any) -> None:
    """A ServingError unless the answer holds every output of `OUTPUT_KEYS`."""
    missing = [k for k in OUTPUT_KEYS if k not in outputs]
    if missing:
        raise ServingError(f"the response lacks output(s) {', '.join(missing)}; it has "
                           f"{', '.join(list(outputs)[:10]) or 'none'} (was the model exported by `kneetf export`?)")


def parse_predict_response(response: Any, batch_size: int | None = None,
                           expected: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """`{"xray_recon": (B, H, W, 1), "mri": (B, H, W, slices)}` float32 from a `PredictResponse`.

    Each output's declared shape is checked before its values are decoded: against
    `(batch_size, *expected[key])` (`output_shapes`) when given, else for rank 4 and at most
    `MAX_OUTPUT_VALUES` per X-ray; NaN or infinite values are a ServingError too."""
    outputs = response.outputs
    _check_output_keys(outputs)
    result = {}
    for key in OUTPUT_KEYS:
        _check_shape(key, tensor_shape(outputs[key]), batch_size, expected)
        result[key] = _check_values(key, to_ndarray(outputs[key]).astype(np.float32, copy=False))
    return result


def metadata_request(model: str, version: int | None = None) -> Any:
    """A `GetModelMetadataRequest` for the signature definitions of `model`."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = int(version)
    request.metadata_field.append("signature_def")
    return request


def parse_metadata_response(response: Any, signature: str) -> dict[str, list[int]] | None:
    """Output name -> declared dims (-1 unknown) of `signature` in a
    `GetModelMetadataResponse`; None when the server does not describe it."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    if "signature_def" not in response.metadata:
        return None
    defs = get_model_metadata_pb2.SignatureDefMap()
    if not response.metadata["signature_def"].Unpack(defs) or signature not in defs.signature_def:
        return None
    return {k: ([int(d.size) for d in v.tensor_shape.dim] if not v.tensor_shape.unknown_rank else [])
            for k, v in defs.signature_def[signature].outputs.items()}


def warmup_record(request: Any) -> bytes:
    """A serialised `PredictionLog` wrapping `request`: one record of TF Serving's warm-up file."""
    from tensorflow_serving.apis import prediction_log_pb2

    entry = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    return entry.SerializeToString()


# === REST ===

def rest_path(model: str, version: int | None = None, verb: str = "") -> str:
    """`/v1/models/<model>[/versions/<v>][:verb]`."""
    path = f"/v1/models/{model}"
    if version is not None:
        path += f"/versions/{int(version)}"
    return path + (f":{verb}" if verb else "")


def rest_body(batch: np.ndarray, signature: str = SIGNATURE_DEFAULT, form: str = "inputs") -> dict[str, Any]:
    """TF Serving REST predict body: columnar `inputs` (default) or row `instances` form."""
    values = batch.tolist()
    if form == "inputs":
        return {"signature_name": signature, "inputs": {INPUT_KEY: values}}
    if form == "instances":
        return {"signature_name": signature, "instances": values}
    raise InputError(None, f"REST form must be 'inputs' or 'instances'. Received: form={form!r}")


def parse_rest_metadata(body: Mapping[str, Any], signature: str) -> dict[str, list[int]] | None:
    """Output name -> declared dims of `signature` in a REST `/metadata` answer (TF Serving's
    JSON of `GetModelMetadataResponse`); None when it does not describe it."""
    try:
        sig = body["metadata"]["signature_def"]["signature_def"][signature]
        return {k: [int(d.get("size", -1)) for d in v.get("tensor_shape", {}).get("dim", [])]
                for k, v in sig["outputs"].items()}
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


def parse_rest_response(body: Mapping[str, Any], batch_size: int | None = None,
                        expected: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """Arrays from a REST predict answer (`outputs` or `predictions`); `error` becomes
    ServingError, and so do outputs of another shape than `(batch_size, *expected[key])`
    (`output_shapes`), or NaN / infinite values (see `parse_predict_response`)."""
    if not isinstance(body, Mapping):
        raise ServingError(f"unexpected REST answer of type {type(body).__name__}")
    if "error" in body:
        raise ServingError(str(body["error"])[:2000])
    if "outputs" in body:
        outputs = body["outputs"]
        if not isinstance(outputs, Mapping):
            raise ServingError("the REST answer has unnamed outputs; expected xray_recon and mri")
    elif "predictions" in body:
        rows = body["predictions"]
        if not isinstance(rows, list) or not rows or not all(isinstance(r, Mapping) for r in rows):
            raise ServingError("the REST answer has unnamed predictions; expected xray_recon and mri")
        outputs = {k: [r.get(k) for r in rows] for k in OUTPUT_KEYS if k in rows[0]}
    else:
        raise ServingError(f"unexpected REST answer with keys {sorted(body)[:10]}")
    _check_output_keys(outputs)
    result = {}
    for key in OUTPUT_KEYS:
        try:
            array = np.asarray(outputs[key], dtype=np.float32)
        except (ValueError, TypeError) as e:  # ragged lists, strings, null
            raise ServingError(f"the server returned {key!r} that is not a numeric array: {str(e)[:200]}") from None
        _check_shape(key, array.shape, batch_size, expected)
        result[key] = _check_values(key, array)
    return result


__all__ = ["RUN_MODEL_FILE", "RUN_CONFIG_FILE", "RUN_HISTORY_FILE", "RUN_BACKUP_DIR", "ROI_DETECTOR_FILE",
           "EXPORT_ROI_DETECTOR", "EXPORT_INFO_FILE", "TFLITE_DIR", "WARMUP_FILE",
           "DEFAULT_MODEL_NAME", "SIGNATURE_DEFAULT", "SIGNATURE_UINT16", "SIGNATURE_NORMALIZED", "SIGNATURE_DTYPES",
           "INPUT_KEY", "OUTPUT_KEYS", "MIN_SIDE", "CONTRACT_IMAGE_SIZE", "CONTRACT_NUM_SLICES",
           "MAX_OUTPUT_VALUES", "SERVING_BATCH_SIZES", "output_shapes", "response_bytes", "check_metadata_shapes",
           "signature_batch", "tensor_proto", "tensor_shape", "to_ndarray", "predict_request",
           "parse_predict_response", "metadata_request", "parse_metadata_response", "warmup_record", "rest_path",
           "rest_body", "parse_rest_metadata", "parse_rest_response"]
