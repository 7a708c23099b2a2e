"""The optimizer update alone: TwoRateAdam's fused update (one ResourceApplyAdam per variable)
against Keras' element-wise Adam, on a preset's trainable variables, alternating in one process.

    python tools/perf/adambench.py --preset paper --rounds 3

One optimizer (one set of moments) and two `tf.function`s that apply random gradients to all
trainable variables, one traced with `fused = False` and one with `fused = True`; each round
times `--steps` calls of each (after one warm-up call), wall and this process's CPU time.
Prints a table and one final line `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Sequence

from benchutil import seeded_kneenet  # beside this script, as torch_ref.py imports it


def measure(preset: str, rounds: int, steps: int) -> dict[str, Any]:
    import numpy as np
    import tensorflow as tf

    from kneetf.config import TrainConfig

    model = seeded_kneenet(preset)
    model.compile_for_training(TrainConfig(batch_size=1))
    variables = model.trainable_weights
    opt = model.optimizer
    opt.build(variables)
    rng = np.random.default_rng(0)
    grads = [tf.constant(rng.standard_normal(v.shape).astype("float32") * 1e-3) for v in variables]

    def traced(fused: bool) -> Any:
        @tf.function
        def apply() -> Any:
            opt.apply(grads, variables)
            return opt.iterations

        opt.fused = fused
        apply.get_concrete_function()  # the flag is read while tracing
        apply()
        return apply

    fns = {"keras": traced(False), "fused": traced(True)}
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(steps):
                w, c = time.perf_counter(), time.process_time()
                int(fn())
                times[name]["wall"].append(time.perf_counter() - w)
                times[name]["cpu"].append(time.process_time() - c)
    params = int(sum(np.prod(v.shape) for v in variables))
    rows = {name: {f"{k}_s_median": round(statistics.median(v), 4) for k, v in t.items()} |
            {f"{k}_s_range": [round(min(v), 4), round(max(v), 4)] for k, v in t.items()}
            for name, t in times.items()}
    return {"preset": preset, "params": params, "variables": len(variables), "rounds": rounds, "steps": steps,
            "update": rows}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="paper")
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two updates")
    p.add_argument("--steps", type=int, default=3, help="timed calls of each update per round")
    a = p.parse_args(argv)
    res = measure(a.preset, a.rounds, a.steps)
    print(f"{a.preset}: {res['params']:,} parameters in {res['variables']} variables")
    print(f"{'update':8s} {'wall s (median, range)':>28s} {'CPU s (median, range)':>28s}")
    for name, r in res["update"].items():
        print(f"{name:8s} {r['wall_s_median']:>10.4f} ({r['wall_s_range'][0]:.4f}-{r['wall_s_range'][1]:.4f})"
              f" {r['cpu_s_median']:>10.4f} ({r['cpu_s_range'][0]:.4f}-{r['cpu_s_range'][1]:.4f})")
    print("RESULT " + json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
