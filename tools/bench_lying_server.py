"""What a lying TF Serving server costs the kneetf clients: peak memory and outcome per answer.

    python tools/bench_lying_server.py            # tiny preset export, about 1 min on 2 cores

The test server (tests/serving_server.py) serves a real export and, per scenario, replaces
its answer through its hooks: an 81-byte gRPC answer declaring a 1x4000x4000x20 float
volume, a REST body of 256 MiB, a REST answer of shape (1, 5, 5, 3), a NaN volume. Each
client call runs in a fresh process that sends one 128x128 X-ray and reports its outcome and
its peak RSS (VmHWM), next to an honest answer. Prints a table and a final line
`RESULT {json}`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from testserver import load_test_server  # tools/testserver.py

CLIENT = """
import json, re, sys
import numpy as np
transport, address = sys.argv[1], sys.argv[2]
if transport == "grpc":
    from kneetf.client import ServingClient as Client
else:
    from kneetf.client import RestClient as Client
x = np.random.default_rng(0).uniform(0, 4000, (128, 128)).astype("float32")
try:
    out = Client(address, retries=0, timeout=120).predict(x)
    outcome = "accepted " + "x".join(map(str, out["mri"].shape)) + (" with NaN" if np.isnan(out["mri"]).any() else "")
except Exception as e:
    outcome = f"{type(e).__name__}: {e}"[:90]
# VmHWM, not ru_maxrss: Linux carries the parent's peak into ru_maxrss across fork + exec
peak = int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read())[1]) / 1024
print(json.dumps({"outcome": outcome, "peak_rss_mb": peak}))
"""


def compact_lie(mri_shape: tuple[int, ...], fill: float = 0.5):
    """A PredictResponse in TF's compact form: one value standing for the whole tensor."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    response = predict_pb2.PredictResponse()
    for key, shape in (("mri", mri_shape), ("xray_recon", (1, 128, 128, 1))):
        response.outputs[key].CopyFrom(tf.make_tensor_proto(fill, dtype=tf.float32, shape=list(shape)))
    return response


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rest-body-mb", type=int, default=256, help="size of the oversized REST body")
    args = parser.parse_args(argv)
    server_module = load_test_server()
    with tempfile.TemporaryDirectory(prefix="kneetf-lying-") as folder:
        rows = run_scenarios(server_module, Path(folder), args.rest_body_mb)
    print(f"{'answer':<46} {'client':<6} {'peak RSS':>10}  outcome")
    for r in rows:
        rss = f"{r['peak_rss_mb']:.0f} MB" if r["peak_rss_mb"] is not None else "-"
        print(f"{r['scenario']:<46} {r['transport']:<6} {rss:>10}  {r['outcome']}")
    print("RESULT " + json.dumps({"rows": rows}))
    return 0


def run_scenarios(server_module, tmp: Path, rest_body_mb: int) -> list[dict]:
    """One client process per scenario against the test server; its outcome and peak RSS."""
    from kneetf.export.savedmodel import export_savedmodel

    model = server_module.make_test_model(tmp / "model.keras", "tiny", seed=0)
    export_savedmodel(model, tmp / "saved_models" / "kneetf", verify=False, warmup_batch_sizes=())
    big = b"[" * (rest_body_mb << 20)
    lie = compact_lie((1, 4000, 4000, 20))
    nan = compact_lie((1, 128, 128, 20), float("nan"))
    wrong = json.dumps({"outputs": {"mri": np.zeros((1, 5, 5, 3)).tolist(),
                                    "xray_recon": np.zeros((1, 5, 5, 1)).tolist()}}).encode()
    scenarios = [
        ("honest answer", "grpc", {}),
        ("honest answer", "rest", {}),
        (f"{len(lie.SerializeToString())}-byte answer declaring 1x4000x4000x20", "grpc",
         {"grpc_reply": lambda request: lie}),
        ("NaN volume", "grpc", {"grpc_reply": lambda request: nan}),
        (f"{rest_body_mb} MiB body", "rest", {"rest_reply": lambda raw: (200, {}, big)}),
        ("shape (1, 5, 5, 3)", "rest", {"rest_reply": lambda raw: (200, {"Content-Length": str(len(wrong))}, wrong)}),
    ]
    rows = []
    with server_module.LocalServingServer({"kneetf": tmp / "saved_models" / "kneetf"}) as server:
        for name, transport, hooks in scenarios:
            server.faults.reset()
            for key, value in hooks.items():
                setattr(server.faults, key, value)
            address = server.grpc_target if transport == "grpc" else server.rest_url
            done = subprocess.run([sys.executable, "-c", CLIENT, transport, address], capture_output=True, text=True,
                                  timeout=600, cwd=tmp)  # cwd: kneetf from the environment, not this folder
            lines = done.stdout.strip().splitlines()
            result = json.loads(lines[-1]) if lines else {"outcome": f"crashed: {done.stderr[-200:]}",
                                                          "peak_rss_mb": None}
            rows.append({"scenario": name, "transport": transport, **result})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
