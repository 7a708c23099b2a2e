"""Serving latency: gRPC and REST to the test server over a real export, at concurrency 1 and
8, the client's own overhead and the model's compute in the server; Keras and TFLite in
process for comparison.

    python tools/bench_serving.py                      # compact preset, 1-3 min on 2 cores
    python tools/bench_serving.py --model runs/x/model.keras --requests 200 --no-tflite

The server is `tests/serving_server.py` in a process of its own, as TF Serving runs: the real
gRPC services and REST API over the SavedModel of `kneetf export`. Each scenario sends
`--requests` requests (REST: `--rest-requests`) of `--batch-sizes` X-rays of
`--image-size` px from `concurrency` threads of one `ServingClient` / `RestClient` and
reports p50/p95/p99 latency per request and images per second. Where the time of one
request goes:

- `client build` / `client parse`: the client's own work, timed alone over `--repeats`
  calls: the checked batch with the client-side resize (`as_batch`), the request and its
  serialisation (gRPC: `PredictRequest` bytes; REST: the JSON body) / the answer's decoding
  and checks (gRPC: `PredictResponse` from bytes + `parse_predict_response`; REST:
  `json.loads` + `parse_rest_response`) on a real answer of the server;
- `model in server`: the export's signature called in this process on the request's input,
  which is what the server runs per request (in-graph preprocessing + the model);
- the rest of a request's latency is the wire and the server's own decoding and encoding
  (the test server is Python; TF Serving does that part in C++).

Untrained weights: timing only. Prints a table and a final line `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
from testserver import ServerProcess, load_test_server  # tools/testserver.py


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99))}


def measure(fn: Callable[[], object], requests: int, concurrency: int, images_per_request: int) -> dict:
    """Run `fn` `requests` times from `concurrency` threads; latency percentiles in ms."""
    latencies: list[float] = []

    def one(_: int) -> None:
        t0 = time.perf_counter()
        fn()
        latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    if concurrency == 1:
        for i in range(requests):
            one(i)
    else:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    return {"requests": requests, **percentiles(latencies), "images_per_s": requests * images_per_request / wall}


def timed(fn: Callable[[], object], repeats: int) -> dict:
    """`fn` alone, `repeats` times after a warm-up call: percentiles in ms."""
    fn()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return {"requests": repeats, **percentiles(seconds)}


def client_parts(grpc_client, rest_client, raw: np.ndarray, repeats: int) -> dict[str, dict]:
    """The clients' own work per request, timed alone: building and serialising a request,
    decoding and checking a real answer of the server."""
    from tensorflow_serving.apis import predict_pb2

    from kneetf.client.request import as_batch
    from kneetf.protocol import parse_predict_response, parse_rest_response, predict_request, rest_body, rest_path

    batch = as_batch(raw, resize=True)

    def grpc_build() -> bytes:
        b = as_batch(raw, grpc_client.signature, image_size=grpc_client.image_size, resize=True)
        return predict_request(b, grpc_client.model, grpc_client.version, grpc_client.signature).SerializeToString()

    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(grpc_client.target, options=[("grpc.max_receive_message_length", 1 << 28)]) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        answer = stub.Predict(predict_request(batch, grpc_client.model), timeout=60).SerializeToString()

    def grpc_parse() -> dict:
        response = predict_pb2.PredictResponse.FromString(answer)
        return parse_predict_response(response, len(batch), grpc_client.output_shapes())

    def rest_build() -> bytes:
        b = as_batch(raw, rest_client.signature, image_size=rest_client.image_size, resize=True)
        return json.dumps(rest_body(b, rest_client.signature)).encode("utf-8")

    request = urllib.request.Request(rest_client.url + rest_path(rest_client.model, verb="predict"),
                                     data=rest_build(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        body = response.read()

    def rest_parse() -> dict:
        return parse_rest_response(json.loads(body.decode("utf-8")), len(batch), rest_client.output_shapes())

    rest_repeats = max(3, repeats // 10)
    return {"grpc client build": timed(grpc_build, repeats), "grpc client parse": timed(grpc_parse, repeats),
            "rest client build": timed(rest_build, rest_repeats),
            "rest client parse": timed(rest_parse, rest_repeats),
            "sizes": {"grpc_request_bytes": len(grpc_build()), "grpc_answer_bytes": len(answer),
                      "rest_request_bytes": len(rest_build()), "rest_answer_bytes": len(body)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help=".keras model (default: the --preset with random weights)")
    parser.add_argument("--preset", default="compact", help="preset when no --model (default compact)")
    parser.add_argument("--requests", type=int, default=100, help="gRPC requests per scenario (default 100)")
    parser.add_argument("--rest-requests", type=int, default=16, help="REST requests per scenario (default 16)")
    parser.add_argument("--repeats", type=int, default=200, help="calls timing the client's own work (default 200)")
    parser.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default 1)")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated client threads (default 1,8)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the raw ROI sent (default 256)")
    parser.add_argument("--no-rest", action="store_true", help="skip the REST rows (JSON; slow)")
    parser.add_argument("--no-tflite", action="store_true", help="skip the TFLite rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import tensorflow as tf

    import kneetf.models.kneenet  # noqa: F401
    from kneetf.client import RestClient, ServingClient
    from kneetf.client.request import as_batch
    from kneetf.export.samples import structured_samples
    from kneetf.export.savedmodel import export_savedmodel
    from kneetf.inference.loading import load_model, resolve_model_path
    from kneetf.preprocess.ops import preprocess_xray

    server_module = load_test_server()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict] = []
    t_start = time.perf_counter()
    header = (f"{'path':<20} {'batch':>5} {'conc':>5} {'reqs':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} "
              f"{'images/s':>10}")

    def show(row: dict) -> None:
        rate = f"{row['images_per_s']:>10.1f}" if "images_per_s" in row else f"{'':>10}"
        print(f"{row['path']:<20} {row['batch']:>5} {row['concurrency']:>5} {row['requests']:>5} "
              f"{row['p50_ms']:>9.2f} {row['p95_ms']:>9.2f} {row['p99_ms']:>9.2f} {rate}", flush=True)

    with tempfile.TemporaryDirectory(prefix="kneetf-bench-") as tmp:
        tmp = Path(tmp)
        model_path = (resolve_model_path(args.model)[1] if args.model
                      else server_module.make_test_model(tmp / "model.keras", args.preset))
        model = load_model(model_path, compile=False)  # names a missing file; refuses a SavedModel or TFLite
        t0 = time.perf_counter()
        export_savedmodel(model_path, tmp / "kneetf", verify=False)
        export_s = time.perf_counter() - t0
        raw = {b: (structured_samples(b, args.image_size, seed=b) * 3000 + 200).astype(np.float32)[..., 0]
               for b in batch_sizes}
        normalized = {b: preprocess_xray(raw[b][..., None]).numpy() for b in batch_sizes}

        def add(path: str, b: int, c: int, fn: Callable[[], object], requests: int) -> None:
            fn()  # warm-up (traces, connections)
            row = {"path": path, "batch": b, "concurrency": c, **measure(fn, requests, c, b)}
            rows.append(row)
            show(row)

        print(header)
        sizes = {}
        with ServerProcess(tmp / "kneetf") as server:
            grpc_client = ServingClient(server.grpc_target)
            rest_client = RestClient(server.rest_url)
            for b in batch_sizes:
                n = max(4, args.requests // (1 if b == 1 else 2))
                for c in concurrency:
                    add("grpc", b, c, lambda b=b: grpc_client.predict(raw[b]), max(c, n))
                if not args.no_rest:
                    for c in concurrency:
                        add("rest", b, c, lambda b=b: rest_client.predict(raw[b]), max(c, args.rest_requests))
                parts = client_parts(grpc_client, rest_client, raw[b], args.repeats)
                sizes[b] = parts.pop("sizes")
                for name, part in parts.items():
                    if name.startswith("rest") and args.no_rest:
                        continue
                    rows.append({"path": name, "batch": b, "concurrency": 1, **part})
                    show(rows[-1])
            grpc_client.close()
        # what the server runs per request: the signature on the client-resized batch
        signature = tf.saved_model.load(str(tmp / "kneetf" / "1")).signatures["serving_default"]
        for b in batch_sizes:
            sent = tf.constant(as_batch(raw[b], resize=True))
            part = timed(lambda: signature(xray=sent), args.repeats // 2)
            rows.append({"path": "model in server", "batch": b, "concurrency": 1, **part})
            show(rows[-1])
            add("keras-predict", b, 1,
                lambda b=b: model.predict_on_batch(preprocess_xray(tf.constant(raw[b][..., None]))),
                max(4, args.requests // 4))
        tflite_sizes = {}
        if not args.no_tflite:
            from kneetf.export.tflite import convert_tflite
            from kneetf.inference.litert import TFLiteModel

            blobs = convert_tflite(model, ("fp32", "int8"), structured_samples(16, 128, seed=99))
            for variant, blob in blobs.items():
                path = tmp / f"{variant}.tflite"
                path.write_bytes(blob)
                tflite_sizes[variant] = len(blob)
                runner = TFLiteModel(path)
                for b in batch_sizes:
                    add(f"tflite-{variant}", b, 1, lambda b=b, r=runner: r.predict(normalized[b]),
                        max(4, args.requests // 4))
    for b in batch_sizes:
        get = {r["path"]: r for r in rows if r["batch"] == b and r["concurrency"] == 1}
        if "grpc" not in get:
            continue
        client = get["grpc client build"]["p50_ms"] + get["grpc client parse"]["p50_ms"]
        compute = get["model in server"]["p50_ms"]
        rest = get["grpc"]["p50_ms"] - client - compute
        print(f"\nbatch {b}, gRPC at concurrency 1, p50 {get['grpc']['p50_ms']:.1f} ms: client {client:.1f} ms, "
              f"model in server {compute:.1f} ms, wire and the server's decoding/encoding {rest:.1f} ms "
              f"(request {sizes[b]['grpc_request_bytes']} B, answer {sizes[b]['grpc_answer_bytes']} B; REST "
              f"{sizes[b]['rest_request_bytes']} B / {sizes[b]['rest_answer_bytes']} B of JSON)")
    result = {"preset": None if args.model else args.preset, "model": args.model, "image_size": args.image_size,
              "export_s": round(export_s, 2), "tflite_bytes": tflite_sizes, "rows": rows, "sizes": sizes,
              "total_s": round(time.perf_counter() - t_start, 1), "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "tensorflow": tf.__version__}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    from kneetf.errors import KneetfError

    try:
        sys.exit(main())
    except KneetfError as e:  # a missing or unreadable model or cache: the message, not a traceback
        sys.exit(f"error: {e}")
