"""Serving latency and throughput: gRPC (and optionally REST) to the test server over a real
export, against in-process Keras and TFLite.

    python tools/bench_serving.py                      # compact preset, ~1-2 min on 2 cores
    python tools/bench_serving.py --model runs/x/model.keras --requests 50 --rest

Each scenario sends `--requests` requests (per batch size) from `concurrency` threads and
reports p50/p95/p99 latency per request and images per second. The gRPC path includes the
client (read -> resize -> proto), the wire, the server's in-graph preprocessing and the
model; the Keras path is `preprocess_xray` + `model.predict` in this process; TFLite runs
the normalised input with ai_edge_litert. Untrained weights: timing only. Prints a table and
a final line `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import importlib.util
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def load_test_server():
    """tests/serving_server.py, imported by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("kneetf_test_serving_server", ROOT / "tests" / "serving_server.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


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
    ms = np.asarray(latencies) * 1000
    return {"requests": requests, "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "images_per_s": requests * images_per_request / wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help=".keras model (default: the --preset with random weights)")
    parser.add_argument("--preset", default="compact", help="preset when no --model (default compact)")
    parser.add_argument("--requests", type=int, default=24, help="requests per scenario (default 24)")
    parser.add_argument("--batch-sizes", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated client threads (default 1,4)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the raw ROI sent (default 256)")
    parser.add_argument("--rest", action="store_true", help="also time the REST API (JSON; slow)")
    parser.add_argument("--no-tflite", action="store_true", help="skip the TFLite rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import keras
    import tensorflow as tf

    import kneetf.models.kneenet  # noqa: F401
    from kneetf.client import RestClient, ServingClient
    from kneetf.export.samples import structured_samples
    from kneetf.export.savedmodel import export_savedmodel
    from kneetf.preprocess.ops import preprocess_xray

    server_module = load_test_server()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kneetf-bench-") as tmp:
        tmp = Path(tmp)
        model_path = Path(args.model) if args.model else server_module.make_test_model(tmp / "model.keras",
                                                                                        args.preset)
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
        t0 = time.perf_counter()
        export_savedmodel(model_path, tmp / "kneetf", verify=False)
        export_s = time.perf_counter() - t0
        raw = {b: (structured_samples(b, args.image_size, seed=b) * 3000 + 200).astype(np.float32)[..., 0]
               for b in batch_sizes}
        normalized = {b: preprocess_xray(raw[b][..., None]).numpy() for b in batch_sizes}

        def add(path: str, b: int, c: int, fn: Callable[[], object]) -> None:
            fn()  # warm-up (traces, connections)
            n = max(4, args.requests // (1 if b == 1 else 2))
            row = {"path": path, "batch": b, "concurrency": c, **measure(fn, n, c, b)}
            rows.append(row)
            print(f"{path:<14} {b:>5} {c:>5} {row['requests']:>5} {row['p50_ms']:>9.1f} {row['p95_ms']:>9.1f} "
                  f"{row['p99_ms']:>9.1f} {row['images_per_s']:>10.1f}", flush=True)

        print(f"{'path':<14} {'batch':>5} {'conc':>5} {'reqs':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} "
              f"{'images/s':>10}")
        with server_module.LocalServingServer({"kneetf": tmp / "kneetf"}) as server:
            grpc_client = ServingClient(server.grpc_target)
            rest_client = RestClient(server.rest_url)
            for b in batch_sizes:
                for c in concurrency:
                    add("grpc", b, c, lambda b=b: grpc_client.predict(raw[b]))
                if args.rest:
                    add("rest", b, 1, lambda b=b: rest_client.predict(raw[b]))
                add("keras-predict", b, 1,
                    lambda b=b: model.predict(preprocess_xray(tf.constant(raw[b][..., None])), verbose=0))
            grpc_client.close()
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
                    add(f"tflite-{variant}", b, 1, lambda b=b, r=runner: r.predict(normalized[b]))
    result = {"preset": None if args.model else args.preset, "model": args.model, "image_size": args.image_size,
              "export_s": round(export_s, 2), "tflite_bytes": tflite_sizes, "rows": rows,
              "total_s": round(time.perf_counter() - t_start, 1), "cpus": os.cpu_count(),
              "machine": platform.processor() or platform.machine(), "tensorflow": tf.__version__}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
