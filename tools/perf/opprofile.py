"""Where a KneeNet training step's time goes, per class of TensorFlow op, in fp32 and in mixed
bf16, and the bound that the fp32-only work puts on the bf16 step (Amdahl).

    python tools/perf/opprofile.py --preset paper --batch 4 --rounds 2
    python tools/perf/opprofile.py --preset compact --batch 32 --rounds 2

Each measurement runs in its own process (precisions alternating, `--rounds` times): the step
`model.fit` runs (`make_train_function`) on random data, `--steps` steps untimed by the
profiler, then the same under the TF profiler, whose host trace gives every executed op's time
on TF's inter-op threads. Two inter-op threads run ops side by side, so the ops' times add up
to more than the step's wall time; the classes' shares and ratios are what to read. Prints a
table and one final line `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

_LAYER = re.compile(r"((?:encoder|decoder|generator)_(?:block\d+|head\d)_(?:deconv|conv|bn|lrelu|relu|sigmoid)"
                    r"|decoder_output|generator_template|generator_reshape|generator_depth_to_channels)")

CLASSES = ("wide Conv3DTranspose forward", "wide Conv3DTranspose input gradient", "wide Conv3DTranspose kernel gradient",
           "wide Conv3DTranspose bias and the rest", "narrow phase-decomposed Conv3DTranspose (fwd+grad)",
           "tiny-input matmul transposed convs (fwd+grad)", "2-D encoder/decoder convs (fwd+grad)",
           "generator 1x1 head convs (fwd+grad)", "BatchNorm (fwd+grad)", "BatchNorm casts",
           "weight casts (conv layers)", "other casts", "activations (fwd+grad)", "optimizer (Adam)",
           "losses and metrics", "other")
#: classes whose work stays in float32 under mixed precision (master weights, loss)
FP32_ONLY = ("optimizer (Adam)", "losses and metrics")
CASTS = ("BatchNorm casts", "weight casts (conv layers)", "other casts")


def layer_kinds(ops: dict[str, float]) -> dict[str, str]:
    """Each transposed-conv layer's path, read from its forward ops: matmul, phase or wide."""
    kinds: dict[str, str] = {}
    for name in ops:
        m = _LAYER.search(name)
        if name.startswith("gradient_tape") or not m or "_deconv" not in m.group(1):
            continue
        layer = m.group(1)
        if "/MatMul" in name:
            kinds[layer] = "matmul"
        elif re.search(r"_deconv_\d+/(Conv3D|Pad):", name) and kinds.get(layer) != "matmul":
            kinds[layer] = "phase"
        elif re.search(r"_deconv_\d+/conv_transpose:", name) and kinds.get(layer) not in ("matmul", "phase"):
            kinds[layer] = "wide"
    return kinds


def classify(op: str, kinds: dict[str, str]) -> str:
    """The class of one traced op, `name:Type`."""
    base, typ = op.rsplit(":", 1)
    if base.startswith(("two_rate_adam", "adam")):
        return "optimizer (Adam)"
    if "compile_loss" in base or (re.fullmatch(r"(Mean|Mean_1|Square|sub|mul|div_no_nan.*|Add.*|AssignVariableOp.*"
                                               r"|Sum_\d+)(/ReadVariableOp)?", base) and not base.startswith("AddN")):
        return "losses and metrics"
    m = _LAYER.search(base)
    layer = m.group(1) if m else ""
    if typ == "Cast":
        if "_bn" in layer:
            return "BatchNorm casts"
        return "weight casts (conv layers)" if re.search(r"_(deconv|conv)$", layer) else "other casts"
    if not layer:
        # the phase-decomposed layers' gradients (a custom gradient: its ops carry no layer scope)
        if re.fullmatch(r"Conv3D(_\d+)?|Conv3DBackpropFilterV2(_\d+)?", base):
            return "narrow phase-decomposed Conv3DTranspose (fwd+grad)"
        return "other"
    if "_bn" in layer:
        return "BatchNorm (fwd+grad)"
    if re.search(r"_(lrelu|relu|sigmoid)$", layer):
        return "activations (fwd+grad)"
    if layer.startswith("generator_head") and layer.endswith("_conv"):
        return "generator 1x1 head convs (fwd+grad)"
    if layer.endswith("_deconv") and kinds.get(layer) == "matmul":
        return "tiny-input matmul transposed convs (fwd+grad)"
    if layer.startswith(("encoder", "decoder")):
        return "2-D encoder/decoder convs (fwd+grad)"
    if layer.endswith("_deconv") and kinds.get(layer) == "phase":
        return "narrow phase-decomposed Conv3DTranspose (fwd+grad)"
    if layer.endswith("_deconv"):
        grad = base.startswith("gradient_tape")
        if "Conv3DBackpropFilter" in typ:
            return "wide Conv3DTranspose kernel gradient"
        if grad and "Conv3D" in typ:
            return "wide Conv3DTranspose input gradient"
        if not grad and "Conv3DBackpropInput" in typ:
            return "wide Conv3DTranspose forward"
        return "wide Conv3DTranspose bias and the rest"
    return "other"


def class_times(ops: dict[str, float]) -> dict[str, float]:
    kinds = layer_kinds(ops)
    out = dict.fromkeys(CLASSES, 0.0)
    for op, s in ops.items():
        out[classify(op, kinds)] += s
    return out


def amdahl(fp32: dict[str, float], bf16: dict[str, float]) -> dict[str, float]:
    """Whole-step fp32/bf16 ratios reachable if every class but the fp32-only ones ran at 2x."""
    total = sum(fp32.values())
    fixed = sum(fp32[c] for c in FP32_ONLY)
    bn = fp32["BatchNorm (fwd+grad)"]
    casts = sum(bf16[c] for c in CASTS)
    rest = total - fixed - bn - sum(fp32[c] for c in CASTS)
    return {"fp32_only_share": fixed / total, "batchnorm_share": bn / total,
            "bound_batchnorm_fp32": total / (fixed + bn + casts + rest / 2),
            "bound_batchnorm_2x": total / (fixed + casts + (rest + bn) / 2),
            "bound_no_casts": total / (fixed + (rest + bn) / 2)}


# --- the measurement, in its own process -------------------------------------------------------
def worker(a: argparse.Namespace) -> dict[str, Any]:
    import benchutil  # beside this script, which the worker runs as
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    from kneetf.config import TrainConfig

    model = benchutil.seeded_kneenet(a.preset, a.precision)
    model.compile_for_training(TrainConfig(batch_size=a.batch))
    x, y = benchutil.random_batch(model.model_config, a.batch)
    ds = tf.data.Dataset.from_tensors((x, {"xray_recon": x, "mri": y})).repeat()
    model.fit(ds, epochs=1, steps_per_epoch=2, verbose=0, shuffle=False)
    data = next(iter(ds))
    step = model.make_train_function()

    def run() -> list[float]:
        times = []
        for _ in range(a.steps):
            t = time.perf_counter()
            float(step(iter([data]))["loss"])
            times.append(time.perf_counter() - t)
        return times

    run()  # the first call through this iterator retraces
    plain = run()
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        profiled = run()
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    ops: dict[str, float] = collections.defaultdict(float)
    for plane in space.planes:
        if "host" not in plane.name.lower():
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for ev in line.events:
                name = plane.event_metadata[ev.metadata_id].name
                if ":" in name and "::" not in name:
                    ops[name] += ev.duration_ps / 1e12 / a.steps
    return {"preset": a.preset, "batch": a.batch, "precision": a.precision, "step_s": statistics.median(plain),
            "step_s_profiled": statistics.median(profiled), "ops_s": sum(ops.values()), "classes": class_times(ops)}


def _run_worker(a: argparse.Namespace, precision: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--preset", a.preset, "--batch", str(a.batch),
           "--steps", str(a.steps), "--precision", precision]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(next(line for line in reversed(p.stdout.splitlines()) if line.startswith("RESULT "))[7:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="steps timed and steps profiled per process")
    p.add_argument("--rounds", type=int, default=1, help="fp32 and bf16 processes, alternating, this many times")
    p.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(a)))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {"float32": [], "mixed_bfloat16": []}
    for _ in range(a.rounds):
        for precision in runs:
            runs[precision].append(_run_worker(a, precision))
    med = {pr: {c: statistics.median(r["classes"][c] for r in rs) for c in CLASSES} for pr, rs in runs.items()}
    f32, b16 = med["float32"], med["mixed_bfloat16"]
    t32, t16 = sum(f32.values()), sum(b16.values())
    print(f"{a.preset} batch {a.batch}: op time per step, median of {a.rounds} process(es) per precision "
          "(range over them)")
    print(f"{'op class':52s} {'fp32 s':>16s} {'bf16 s':>16s} {'fp32/bf16':>9s} {'bf16 share':>10s}")

    def rng(pr: str, c: str) -> str:
        v = [r["classes"][c] for r in runs[pr]]
        return f"{statistics.median(v):.3f} ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else f"{v[0]:.3f}"

    for c in CLASSES:
        ratio = f"{f32[c] / b16[c]:.2f}x" if b16[c] > 1e-4 else "-"
        print(f"{c:52s} {rng('float32', c):>16s} {rng('mixed_bfloat16', c):>16s} {ratio:>9s} {100 * b16[c] / t16:9.1f}%")
    print(f"{'all ops':52s} {t32:16.3f} {t16:16.3f} {t32 / t16:8.2f}x")
    walls = {pr: [r["step_s"] for r in rs] for pr, rs in runs.items()}
    print("step wall time (not profiled): fp32 " + ", ".join(f"{w:.3f}" for w in walls["float32"])
          + " s; bf16 " + ", ".join(f"{w:.3f}" for w in walls["mixed_bfloat16"]) + " s")
    bound = amdahl(f32, b16)
    print(f"fp32-only work (Adam on the float32 weights, losses): {100 * bound['fp32_only_share']:.1f} % of the fp32 "
          f"ops; BatchNorm {100 * bound['batchnorm_share']:.1f} %")
    print(f"bf16 step bound (every other class at 2x its fp32 time): {bound['bound_batchnorm_fp32']:.2f}x with "
          f"BatchNorm at its fp32 time, {bound['bound_batchnorm_2x']:.2f}x with BatchNorm at 2x too, "
          f"{bound['bound_no_casts']:.2f}x without any casts either")
    print("RESULT " + json.dumps({"preset": a.preset, "batch": a.batch, "rounds": a.rounds, "classes": med,
                                  "ops_s": {"float32": t32, "mixed_bfloat16": t16}, "step_s": walls, "amdahl": bound}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
