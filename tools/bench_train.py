"""Training-speed benchmark of KneeNet: step time, samples/s, achieved GFLOP/s against the
measured matmul peak, peak RSS, the input pipeline's share of the step, and (optionally) the
PyTorch twin of the same network side by side.

    python tools/bench_train.py --quick                              # compact only, ~2-4 min
    python tools/bench_train.py --compare-torch                      # paper + compact, both modes
    python tools/bench_train.py --presets compact --batches compact=32 --mode train --compare-torch
    python tools/bench_train.py --presets paper --profile            # where the step's time goes

What is timed is what users get: `KneeNet` + `compile_for_training` + `model.fit` on a
repeated in-memory tf.data dataset of random data (train mode; the step time is the gap
between consecutive `on_train_batch_end` calls after `--warmup` steps), and
`model.predict_on_batch` (infer mode, as `kneetf predict` does). Every measurement runs in its
own subprocess (so TensorFlow and torch never share a thread pool, and peak RSS is per
measurement); with `--compare-torch` TF and torch alternate (TF, torch, TF, torch ...), each
side reporting the best of its per-round medians. Achieved GFLOP/s use the analytic FLOPs of
`tools/perf/flops.py` (convolutions only, training step = 3x forward); the peak is a large TF
fp32 matmul (`tools/perf/peak.py`). The torch twin runs in its own environment
(`--torch-python`, default `.venv-torch/` in the repository, ignored by git; the project never
depends on torch). Results and how they were measured: `docs/performance.md`.

Prints a table and one final line `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
PERF = ROOT / "tools" / "perf"
#: The twin's environment when `--torch-python` is not given (ignored by git), created by
#: `python3 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 numpy`
TORCH_VENV = ROOT / ".venv-torch"

#: the project's speed targets (docs/performance.md)
TARGETS = {
    "paper_train_b4_speedup": 1.5,     # torch step / our step
    "paper_train_b4_peak_frac": 0.40,  # achieved / matmul peak
    "compact_train_b32_speedup": 1.5,
    "paper_infer_b1_s": 0.2,
}
DEFAULT_TRAIN_BATCHES = {"paper": [2, 4], "compact": [8, 32], "tiny": [8]}
DEFAULT_INFER_BATCHES = {"paper": [1], "compact": [1], "tiny": [1]}


def _perf_modules() -> tuple[Any, Any, Any]:
    """tools/perf's spec, flops and benchutil (plain scripts, imported by path)."""
    if str(PERF) not in sys.path:
        sys.path.insert(0, str(PERF))
    import benchutil
    import flops
    import spec

    return spec, flops, benchutil


# --- architecture: the presets as tools/perf/spec.py reads them ------------------------------
def twin_notes(preset: str) -> list[str]:
    """Where kneetf's network differs from the PyTorch twin's, element-wise (no FLOPs change)."""
    spec, _, _ = _perf_modules()
    from kneetf.presets import get_preset

    return spec.twin_notes(get_preset(preset))


def flops_summary(preset: str) -> dict[str, Any]:
    """flops.py's summary of a preset's architecture, without the per-layer list."""
    _, flops, _ = _perf_modules()
    s = flops.summary(preset)
    s.pop("layers", None)
    return s


# --- subprocess workers ------------------------------------------------------------------------
def _step_stats(times: Sequence[float]) -> dict[str, Any]:
    med = statistics.median(times)
    return dict(step_s_median=round(med, 4), step_s_min=round(min(times), 4),
                step_s_all=[round(t, 4) for t in times])


def worker_tf(a: argparse.Namespace) -> dict[str, Any]:
    """One TF measurement (train via fit, or infer via predict_on_batch) in this process."""
    import tensorflow as tf

    if a.intra_op:
        tf.config.threading.set_intra_op_parallelism_threads(a.intra_op)
    if a.inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(a.inter_op)
    import keras

    from kneetf.config import TrainConfig

    _, _, bu = _perf_modules()
    t0 = time.perf_counter()
    model = bu.seeded_kneenet(a.preset, a.precision)
    b = a.batch
    x, y = bu.random_batch(model.model_config, b)
    res: dict[str, Any] = dict(framework="tf", tf=tf.__version__, keras=keras.__version__, preset=a.preset,
                               mode=a.mode, batch=b, data=a.data, params=model.count_params(),
                               intra_op=tf.config.threading.get_intra_op_parallelism_threads(),
                               inter_op=tf.config.threading.get_inter_op_parallelism_threads(),
                               steps_per_execution=a.steps_per_execution, precision=a.precision, jit=a.jit,
                               onednn=os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"))
    rss_before = bu.rss_mib()
    if a.mode == "infer":
        res["build_s"] = round(time.perf_counter() - t0, 2)
        r = bu.time_steps(lambda: float(model.predict_on_batch(x)["mri"][0, 0, 0, 0]), a.warmup, a.steps)
        res.update(r)
    else:
        model.compile_for_training(TrainConfig(batch_size=b), jit_compile=a.jit,
                                   steps_per_execution=a.steps_per_execution)
        res["build_s"] = round(time.perf_counter() - t0, 2)
        if a.data == "memory":
            ds = tf.data.Dataset.from_tensors((x, {"xray_recon": x, "mri": y})).repeat()
        else:
            from kneetf.data.pipeline import make_dataset

            ds = make_dataset(a.data, "train", b, shuffle=True, repeat=True, drop_remainder=True)
        spe = a.steps_per_execution
        warm_calls = -(-a.warmup // spe)
        timed_calls = -(-a.steps // spe)
        timer = _step_timer(warm_calls, bu)
        model.fit(ds, epochs=1, steps_per_epoch=(warm_calls + timed_calls) * spe, verbose=0, callbacks=[timer],
                  shuffle=False)
        deltas = [d / spe for d in timer.deltas()]
        res.update(_step_stats(deltas[warm_calls:]))
        res.update(first_step_s=round(deltas[0] * spe, 3), last_value=timer.last_loss,
                   own_cpu_per_wall=round(timer.meter.own_cpu_per_wall, 2),
                   foreign_cpu_frac=round(timer.meter.foreign, 2))
    res.update(rss_after_build_mib=round(rss_before, 1), peak_rss_mib=round(bu.peak_rss_mib(), 1),
               per_sample_ms_median=round(1e3 * res["step_s_median"] / b, 3))
    return res


def _step_timer(warm_calls: int, bu: Any) -> Any:
    """A Keras callback stamping each train batch end; a LoadMeter spans the timed calls."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.stamps: list[float] = []
            self.meter: Any = None
            self.last_loss = float("nan")

        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if not self.stamps:
                self.stamps.append(time.perf_counter())

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.stamps.append(time.perf_counter())
            if len(self.stamps) - 1 == warm_calls:
                self.meter = bu.LoadMeter().__enter__()

        def on_train_end(self, logs: Any = None) -> None:
            if self.meter is not None:
                self.meter.__exit__(None, None, None)
            if logs and "loss" in logs:
                self.last_loss = float(logs["loss"])

        def deltas(self) -> list[float]:
            return [b - a for a, b in zip(self.stamps, self.stamps[1:])]

    return StepTimer()


def worker_cache(a: argparse.Namespace) -> dict[str, Any]:
    """Write a cache of `a.n` random pairs to `a.data` (for the input-pipeline measurement)."""
    from kneetf.data.cache import CacheTask, build_cache

    tasks = [CacheTask(id=f"r{i:04d}", split="train", payload=i) for i in range(a.n)]
    t0 = time.perf_counter()
    build_cache(tasks, random_pair, a.data, shard_size=16, workers=0, progress=False)
    return {"cache": a.data, "n": a.n, "build_s": round(time.perf_counter() - t0, 2)}


def random_pair(payload: int, config: Any) -> Any:
    """A random (X-ray, MRI window) pair already at model size (module level: picklable)."""
    import numpy as np

    from kneetf.data.cache import RawPair

    rng = np.random.default_rng(payload)
    s = config.image_size
    return RawPair(id=str(payload), xray=rng.random((s, s), dtype=np.float32),
                   mri=rng.random((config.num_slices, s, s), dtype=np.float32), side="right")


def worker_pipeline(a: argparse.Namespace) -> dict[str, Any]:
    """The training tf.data pipeline over a cache, alone: batches/s and samples/s."""
    from kneetf.data.pipeline import make_dataset

    _, _, bu = _perf_modules()
    ds = make_dataset(a.data, "train", a.batch, shuffle=True, repeat=True, drop_remainder=True)
    it = iter(ds)
    r = bu.time_steps(lambda: float(next(it)[0][0, 0, 0, 0]), a.warmup, a.steps)
    r.update(batch=a.batch, samples_per_s=round(a.batch / r["step_s_median"], 1))
    return r


def worker_profile(a: argparse.Namespace) -> dict[str, Any]:
    """Forward+backward time of each sub-model, the optimizer update, and each generator layer."""
    import numpy as np
    import tensorflow as tf

    from kneetf.config import TrainConfig

    _, _, bu = _perf_modules()
    model = bu.seeded_kneenet(a.preset, a.precision)
    model.compile_for_training(TrainConfig(batch_size=a.batch))
    b = a.batch
    rng = np.random.default_rng(0)

    def fwd_bwd(fn_model: Any, shape: tuple) -> dict[str, Any]:
        inp = tf.constant(rng.random((b,) + tuple(shape[1:]), dtype=np.float32))
        weights = fn_model.trainable_weights

        @tf.function
        def step() -> Any:
            with tf.GradientTape() as tape:
                tape.watch(inp)
                out = fn_model(inp, training=True)
                outs = tf.nest.flatten(out)
                loss = tf.add_n([tf.reduce_mean(tf.square(tf.cast(o, tf.float32))) for o in outs])
            grads = tape.gradient(loss, [inp] + list(weights))
            return tf.add_n([tf.reduce_sum(g) for g in grads if g is not None])

        @tf.function
        def fwd() -> Any:
            return tf.add_n([tf.reduce_sum(o) for o in tf.nest.flatten(fn_model(inp, training=True))])

        f = bu.time_steps(lambda: float(fwd()), a.warmup, a.steps)
        t = bu.time_steps(lambda: float(step()), a.warmup, a.steps)
        return dict(fwd_s=f["step_s_median"], fwd_bwd_s=t["step_s_median"])

    rows = {}
    for name in ("encoder", "decoder", "generator"):
        sub = getattr(model, name)
        rows[name] = fwd_bwd(sub, sub.inputs[0].shape)
    # the optimizer update alone (random gradients for every trainable variable)
    grads = [tf.constant(rng.standard_normal(v.shape).astype("float32") * 1e-3) for v in model.trainable_weights]
    opt = model.optimizer
    opt.build(model.trainable_weights)

    @tf.function
    def apply() -> Any:
        opt.apply(grads, model.trainable_weights)
        return opt.iterations

    rows["optimizer"] = {"fwd_bwd_s": bu.time_steps(lambda: float(apply()), a.warmup, a.steps)["step_s_median"]}
    layers = []
    gen = model.generator
    for layer in gen.layers:
        if not layer.trainable_weights or layer.__class__.__name__ in ("InputLayer",):
            continue
        shape = layer.input.shape
        r = fwd_bwd(_single_layer_model(layer, shape), shape)
        layers.append(dict(layer=layer.name, kind=layer.__class__.__name__, input=list(shape[1:]), **r))
    return {"preset": a.preset, "batch": b, "submodels": rows, "generator_layers": layers}


def _single_layer_model(layer: Any, shape: tuple) -> Any:
    import keras

    inp = keras.Input(tuple(shape[1:]))
    return keras.Model(inp, layer(inp))


WORKERS = {"tf": worker_tf, "cache": worker_cache, "pipeline": worker_pipeline, "profile": worker_profile}


# --- orchestration -----------------------------------------------------------------------------
def _parse_result(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError("no RESULT line in the output:\n" + stdout[-3000:])


def run_json(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
             timeout: float | None = None) -> dict[str, Any]:
    """Run `cmd`, return its `RESULT {json}`; stderr is shown only when it fails."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    p = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return _parse_result(p.stdout)


def tf_cmd(kind: str, **kw: Any) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    for k, v in kw.items():
        if v is None or v is False:
            continue
        cmd += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return cmd


def torch_python(explicit: str | None) -> str:
    """The python of the twin's environment: `explicit`, else `TORCH_VENV`'s; it must import torch."""
    python = explicit or str(TORCH_VENV / "bin" / "python")
    if not Path(python).exists() or subprocess.run([python, "-c", "import torch"], capture_output=True).returncode:
        raise SystemExit(f"--compare-torch needs a python with torch: {python} has none. Create it with\n"
                         f"  python3 -m venv {TORCH_VENV} && {TORCH_VENV}/bin/pip install torch==2.13.0 numpy\n"
                         "(the CPU build; the project itself never depends on torch) or pass --torch-python.")
    return python


def torch_cmd(python: str, preset: str, mode: str, batch: int, steps: int, warmup: int) -> list[str]:
    return [python, str(PERF / "torch_ref.py"), "--preset", preset, "--mode", mode, "--batch", str(batch),
            "--steps", str(steps), "--warmup", str(warmup)]


#: the peaks `measure_peak` reports: the fp32 matmul, and with `bf16` the bf16 matmul and the
#: 3-D convolution in fp32 and bf16
PEAK_KEYS = ("tf", "tf_bf16", "tf_conv3d", "tf_conv3d_bf16")


def measure_peak(quick: bool, twin_python: str | None, bf16: bool = True) -> dict[str, Any]:
    n, reps = (2048, 3) if quick else (4096, 5)
    tf_peak = run_json([sys.executable, str(PERF / "peak.py"), "--which", "tf", "--n", str(n),
                        "--reps", str(reps), *(["--bf16"] if bf16 else [])])
    out = {k: tf_peak[k] for k in PEAK_KEYS if k in tf_peak}
    if twin_python:
        out["torch"] = run_json([twin_python, str(PERF / "peak.py"), "--which", "torch", "--n", str(n),
                                 "--reps", str(reps)])["torch"]
    return out


def parse_batches(values: Sequence[str] | None, presets: Sequence[str], default: dict[str, list[int]]) -> dict[str, list[int]]:
    """`paper=2,4` / `compact=8,32` / `8,32` (all presets) -> {preset: [batches]}."""
    out = {p: list(default.get(p, [8])) for p in presets}
    for v in values or []:
        name, _, nums = v.rpartition("=")
        batches = [int(n) for n in nums.split(",") if n]
        for p in ([name] if name else presets):
            out[p] = batches
    return out


def _row(res: dict[str, Any], fl: dict[str, Any], peak: float) -> dict[str, Any]:
    gflop = fl["train_gflop_per_sample"] if res["mode"] == "train" else fl["fwd_gflop_per_sample"]
    step = res["step_s_median"]
    gflops = gflop * res["batch"] / step
    return dict(step_s=step, step_s_min=res["step_s_min"], samples_per_s=round(res["batch"] / step, 2),
                gflops=round(gflops, 1), peak_frac=round(gflops / peak, 3) if peak else None,
                peak_rss_mib=res.get("peak_rss_mib"), foreign=res.get("foreign_cpu_frac"),
                first_step_s=res.get("first_step_s"))


def input_wait(a: argparse.Namespace, tmp: Path, env: dict[str, str]) -> dict[str, Any]:
    """fit's step on the real cache pipeline vs the in-memory dataset, and the pipeline alone."""
    preset = "compact" if "compact" in a.presets else a.presets[0]
    batch = max(parse_batches(a.batches, [preset], DEFAULT_TRAIN_BATCHES)[preset])
    n = 32 if a.quick else 96
    cache = tmp / "cache"
    built = run_json(tf_cmd("cache", data=cache, n=max(n, 2 * batch)), env)
    common = dict(preset=preset, batch=batch, mode="train", steps=a.steps, warmup=a.warmup)
    mem = run_json(tf_cmd("tf", data="memory", **common), env)
    disk = run_json(tf_cmd("tf", data=cache, **common), env)
    pipe = run_json(tf_cmd("pipeline", data=cache, batch=batch, steps=max(a.steps, 10), warmup=2), env)
    t_mem, t_disk = mem["step_s_median"], disk["step_s_median"]
    return dict(preset=preset, batch=batch, cache_pairs=built["n"], step_memory_s=t_mem, step_cache_s=t_disk,
                wait_frac=round(max(0.0, 1 - t_mem / t_disk), 3), pipeline_samples_per_s=pipe["samples_per_s"],
                pipeline_batch_s=pipe["step_s_median"],
                pipeline_over_step=round(pipe["step_s_median"] / t_mem, 3),
                foreign=[mem.get("foreign_cpu_frac"), disk.get("foreign_cpu_frac"), pipe.get("foreign_cpu_frac")])


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def find(preset: str, mode: str, batch: int) -> dict[str, Any] | None:
        return next((r for r in rows if (r["preset"], r["mode"], r["batch"]) == (preset, mode, batch)), None)

    out: dict[str, Any] = {}
    r = find("paper", "train", 4)
    if r and r.get("speedup") is not None:
        out["paper_train_b4_speedup"] = {"value": r["speedup"], "target": TARGETS["paper_train_b4_speedup"],
                                         "met": r["speedup"] >= TARGETS["paper_train_b4_speedup"]}
    if r:
        out["paper_train_b4_peak_frac"] = {"value": r["tf"]["peak_frac"], "target": TARGETS["paper_train_b4_peak_frac"],
                                           "met": (r["tf"]["peak_frac"] or 0) >= TARGETS["paper_train_b4_peak_frac"]}
    r = find("compact", "train", 32)
    if r and r.get("speedup") is not None:
        out["compact_train_b32_speedup"] = {"value": r["speedup"], "target": TARGETS["compact_train_b32_speedup"],
                                            "met": r["speedup"] >= TARGETS["compact_train_b32_speedup"]}
    r = find("paper", "infer", 1)
    if r:
        out["paper_infer_b1_s"] = {"value": r["tf"]["step_s"], "target": TARGETS["paper_infer_b1_s"],
                                   "met": r["tf"]["step_s"] < TARGETS["paper_infer_b1_s"]}
    return out


def print_peaks(peak: dict[str, Any]) -> None:
    """The bf16 ceiling next to the fp32 one (TF, this run, both measured at its start): a large
    matmul and a wide 3-D convolution."""
    parts = []
    peak = {**peak, "tf": peak.get("tf_start", peak.get("tf"))}
    for name, k32, k16 in (("matmul", "tf", "tf_bf16"), ("conv3d 3x3x3 64->64", "tf_conv3d", "tf_conv3d_bf16")):
        if k32 in peak and k16 in peak:
            f32, f16 = peak[k32]["gflops_best"], peak[k16]["gflops_best"]
            parts.append(f"{name}: fp32 {f32:.0f}, bf16 {f16:.0f} GFLOP/s (x{f16 / f32:.2f})")
    if parts:
        print("bf16 ceiling (TF): " + "; ".join(parts))


def print_table(rows: list[dict[str, Any]], peak: float) -> None:
    print(f"\nmatmul peak (TF fp32, best of start and end): {peak:.0f} GFLOP/s   "
          "step = median of timed steps, best round")
    head = (f"{'preset':8s} {'mode':5s} {'batch':>5s} {'side':5s} {'step s':>8s} {'min s':>8s} {'samples/s':>9s} "
            f"{'GFLOP/s':>8s} {'%peak':>6s} {'RSS MiB':>8s} {'load':>5s} {'torch/tf':>8s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        for side in ("tf", "torch"):
            s = r.get(side)
            if not s:
                continue
            ratio = f"{r['speedup']:8.2f}" if side == "tf" and r.get("speedup") is not None else f"{'':8s}"
            pf = f"{100 * s['peak_frac']:5.1f}%" if s.get("peak_frac") is not None else f"{'':6s}"
            print(f"{r['preset']:8s} {r['mode']:5s} {r['batch']:5d} {side:5s} {s['step_s']:8.4f} {s['step_s_min']:8.4f} "
                  f"{s['samples_per_s']:9.2f} {s['gflops']:8.1f} {pf} {s['peak_rss_mib'] or 0:8.0f} "
                  f"{s['foreign'] if s['foreign'] is not None else '':>5} {ratio}")


def run_benchmark(a: argparse.Namespace) -> dict[str, Any]:
    env = {}
    for kv in a.tf_env or []:
        k, _, v = kv.partition("=")
        env[k] = v
    twin_python = torch_python(a.torch_python) if a.compare_torch else None
    load0 = os.getloadavg()
    peak = measure_peak(a.quick, twin_python)
    peak_tf = peak["tf"]["gflops_best"]  # provisional; the best of start and end is reported
    modes = ["train", "infer"] if a.mode == "both" else [a.mode]
    train_b = parse_batches(a.batches, a.presets, DEFAULT_TRAIN_BATCHES)
    infer_b = parse_batches(a.infer_batches, a.presets, DEFAULT_INFER_BATCHES)
    arch = {}
    rows = []
    for preset in a.presets:
        fl = flops_summary(preset)
        arch[preset] = dict(trainable_params=fl["trainable_params"], train_gflop_per_sample=round(fl["train_gflop_per_sample"], 3),
                            fwd_gflop_per_sample=round(fl["fwd_gflop_per_sample"], 3), notes=twin_notes(preset))
        twin = twin_python is not None
        for mode in modes:
            for batch in (train_b if mode == "train" else infer_b)[preset]:
                tf_runs, torch_runs = [], []
                for _ in range(a.rounds):
                    tf_runs.append(run_json(tf_cmd("tf", preset=preset, mode=mode, batch=batch, steps=a.steps,
                                                   warmup=a.warmup, steps_per_execution=a.steps_per_execution,
                                                   intra_op=a.intra_op, inter_op=a.inter_op,
                                                   precision=a.precision), env))
                    if twin:
                        torch_runs.append(run_json(torch_cmd(twin_python, preset, mode, batch, a.steps, a.warmup),
                                                   cwd=PERF))
                best_tf = min(tf_runs, key=lambda r: r["step_s_median"])
                row: dict[str, Any] = dict(preset=preset, mode=mode, batch=batch, tf=_row(best_tf, fl, peak_tf),
                                           tf_rounds=[r["step_s_median"] for r in tf_runs])
                if torch_runs:
                    best_t = min(torch_runs, key=lambda r: r["step_s_median"])
                    row["torch"] = _row(best_t, fl, peak_tf)
                    row["torch_rounds"] = [r["step_s_median"] for r in torch_runs]
                    row["speedup"] = round(best_t["step_s_median"] / best_tf["step_s_median"], 3)
                rows.append(row)
                print(f"  {preset} {mode} b{batch}: tf {row['tf']['step_s']:.4f} s"
                      + (f", torch {row['torch']['step_s']:.4f} s (x{row['speedup']})" if "torch" in row else ""),
                      file=sys.stderr, flush=True)
    result: dict[str, Any] = dict(peak=peak, architecture=arch, rows=rows)
    if a.input_check and "train" in modes:
        with tempfile.TemporaryDirectory(prefix="kneetf-bench-") as tmp:
            result["input"] = input_wait(a, Path(tmp), env)
    if a.profile:
        result["profile"] = {p: run_json(tf_cmd("profile", preset=p, batch=max(train_b[p]), steps=a.steps,
                                                warmup=a.warmup, precision=a.precision), env) for p in a.presets}
    # the fp32 matmul peak once more at the end (the bf16 and conv3d peaks only at the start):
    # other processes share this machine, the better of the two is closer to the machine's own
    # figure; every row's %peak is relative to it
    peak_end = measure_peak(a.quick, twin_python, bf16=False)
    result["peak"] = {**peak, "tf_start": peak["tf"], "tf_end": peak_end["tf"]}
    for k in PEAK_KEYS + ("torch",):
        if k in peak or k in peak_end:
            result["peak"][k] = max((p[k] for p in (peak, peak_end) if k in p), key=lambda r: r["gflops_best"])
    best = result["peak"]["tf"]["gflops_best"]
    for row in rows:
        for side in ("tf", "torch"):
            if side in row:
                row[side]["peak_frac"] = round(row[side]["gflops"] / best, 3)
    result["targets"] = targets(rows)
    result["loadavg"] = {"start": [round(v, 2) for v in load0], "end": [round(v, 2) for v in os.getloadavg()]}
    result["cpus"] = os.cpu_count()
    result["options"] = dict(steps=a.steps, warmup=a.warmup, rounds=a.rounds, steps_per_execution=a.steps_per_execution,
                             intra_op=a.intra_op, inter_op=a.inter_op, precision=a.precision, tf_env=env)
    return result


def print_report(result: dict[str, Any]) -> None:
    for preset, info in result["architecture"].items():
        print(f"{preset}: {info['trainable_params']:,d} params (flops.py count), train {info['train_gflop_per_sample']} "
              "GFLOP/sample" + (f"; twin differs element-wise: {'; '.join(info['notes'])}" if info["notes"] else ""))
    print_table(result["rows"], result["peak"]["tf"]["gflops_best"])
    print_peaks(result["peak"])
    if "input" in result:
        i = result["input"]
        print(f"\ninput pipeline ({i['preset']} b{i['batch']}, cache of {i['cache_pairs']} pairs): fit step "
              f"{i['step_memory_s']:.4f} s in memory vs {i['step_cache_s']:.4f} s from the cache -> waiting on input "
              f"{100 * i['wait_frac']:.1f}% of the step; the pipeline alone delivers {i['pipeline_samples_per_s']:.0f} "
              f"samples/s ({100 * i['pipeline_over_step']:.1f}% of a step's time per batch)")
    for p, prof in result.get("profile", {}).items():
        print(f"\nprofile {p} b{prof['batch']} (median s; forward / forward+backward)")
        for name, r in prof["submodels"].items():
            print(f"  {name:28s} {r.get('fwd_s', float('nan')):8.4f} {r['fwd_bwd_s']:8.4f}")
        for r in prof["generator_layers"]:
            print(f"  {r['layer']:28s} {r['fwd_s']:8.4f} {r['fwd_bwd_s']:8.4f}  in {'x'.join(map(str, r['input']))}")
    for name, t in result["targets"].items():
        print(f"target {name}: {t['value']} (target {t['target']}) -> {'met' if t['met'] else 'NOT met'}")
    la = result["loadavg"]
    print(f"machine: {result['cpus']} CPUs, load average {la['start'][0]} at start, {la['end'][0]} at end "
          "(column 'load': share of the CPUs other processes used during the timed steps)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="paper,compact", help="comma-separated kneetf presets (default paper,compact)")
    p.add_argument("--batches", action="append", metavar="[PRESET=]B,B",
                   help="training batch sizes, per preset (repeatable); default paper=2,4 compact=8,32")
    p.add_argument("--infer-batches", action="append", metavar="[PRESET=]B,B",
                   help="inference batch sizes, per preset; default 1")
    p.add_argument("--mode", default="both", choices=["train", "infer", "both"])
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (tracing; default 2)")
    p.add_argument("--rounds", type=int, default=2, help="measurements per side, alternating TF/torch (default 2)")
    p.add_argument("--compare-torch", action="store_true", help="also time the PyTorch twin (own venv)")
    p.add_argument("--torch-python", default=None,
                   help="python of an environment with torch (default: .venv-torch/bin/python in the repository)")
    p.add_argument("--no-input-check", dest="input_check", action="store_false",
                   help="skip the cache-vs-memory input pipeline measurement")
    p.add_argument("--profile", action="store_true", help="time each sub-model, the optimizer and generator layers")
    p.add_argument("--quick", action="store_true", help="compact only, batch 8 train / 1 infer, 3 steps, 1 round")
    g = p.add_argument_group("TF options to try (none changes the math except --precision)")
    g.add_argument("--steps-per-execution", type=int, default=1)
    g.add_argument("--intra-op", type=int, default=0, help="intra-op threads (0 = TF default)")
    g.add_argument("--inter-op", type=int, default=0, help="inter-op threads (0 = TF default)")
    g.add_argument("--precision", default="float32", choices=["float32", "mixed_float16", "mixed_bfloat16"])
    g.add_argument("--tf-env", action="append", metavar="KEY=VALUE", help="environment of the TF subprocesses")
    # internal: one measurement in this process
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--data", default="memory", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--jit", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.worker:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        print("RESULT " + json.dumps(WORKERS[a.worker](a)), flush=True)
        return 0
    if a.quick:
        a.presets = a.presets if a.presets != "paper,compact" else "compact"
        a.batches = a.batches or ["8"]
        a.steps, a.warmup, a.rounds = min(a.steps, 3), min(a.warmup, 1), 1
    a.presets = [p for p in a.presets.split(",") if p]
    from kneetf.presets import preset_names

    unknown = [p for p in a.presets if p not in preset_names()]
    if unknown:
        print(f"unknown preset(s) {unknown}; available: {preset_names()}", file=sys.stderr)
        return 2
    result = run_benchmark(a)
    print_report(result)
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
