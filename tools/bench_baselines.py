"""Time, memory and error of the cross-validated baselines (`kneetf.baselines.fit_baselines`).

Two modes:

- scale (default): synthetic pairs streamed in batches, never held whole, with the real
  sizes (32x32 X-ray features, 128x128x20 MRI volumes): time of each stage and peak RSS for
  `--pairs` training pairs (tens of thousands = OAI scale) and `--eval` evaluated ones;
- `--cache CACHE`: on a real cache, the exact fit against the approximate regime forced by a
  lower `--exact-limits` (cross-validation on a subset, Nystrom kernel ridge): the test
  PSNR / SSIM-2D of each baseline and its fit time.

    python tools/bench_baselines.py --pairs 20000 --eval 200
    python tools/bench_baselines.py --cache CACHE --exact-limits 512,1024

Prints a table and one final line `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import json
import logging
import resource
import time

import numpy as np


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def synthetic_batches(pairs: int, batch: int = 64, size: int = 128, slices: int = 20, rank: int = 8, seed: int = 0):
    """A callable giving fresh batches of `pairs` synthetic pairs: the MRI is a smooth function
    of a few latent factors that the X-ray shows, plus noise (same data on every call)."""
    rng = np.random.default_rng(seed)
    comps = rng.standard_normal((rank, size * size * slices)).astype(np.float32) * 0.05
    base = np.full(size * size * slices, 0.4, np.float32)
    xcomps = rng.standard_normal((rank, size * size)).astype(np.float32) * 0.1

    def batches():
        for s in range(0, pairs, batch):
            r = np.random.default_rng([seed, s])
            n = min(batch, pairs - s)
            lat = r.standard_normal((n, rank)).astype(np.float32)
            mri = np.clip(base + np.tanh(lat) @ comps + 0.02 * r.standard_normal((n, base.size), np.float32), 0, 1)
            xray = np.clip(0.5 + lat @ xcomps + 0.05 * r.standard_normal((n, size * size), np.float32), 0, 1)
            yield {"id": [f"s{s + i}" for i in range(n)], "xray": xray.reshape(n, size, size, 1),
                   "mri": mri.reshape(n, size, size, slices)}

    return batches


def scale(args: argparse.Namespace) -> dict:
    from kneetf import baselines as B

    train = synthetic_batches(args.pairs, seed=0)
    ev = next(iter(synthetic_batches(args.eval, batch=args.eval, seed=1)()))
    t0 = time.monotonic()
    fit = B.fit_baselines(train, ev["xray"], ev["id"], exact_limit=args.exact_limit)
    total = time.monotonic() - t0
    d = fit.details
    row = {"pairs": args.pairs, "eval": args.eval, "exact_limit": args.exact_limit, "total_s": round(total, 1),
           "cv_pairs": d["cv"]["pairs"], "cv_knn_s": d["knn_cv"]["seconds"],
           "cv_krr_linear_s": d["krr_linear"]["seconds"], "cv_krr_rbf_s": d["krr_rbf"]["seconds"],
           "fit_krr_rbf_s": d["krr_rbf"]["fit_seconds"], "nystrom": d["krr_rbf"]["nystrom"],
           "peak_rss_gib": round(_rss_gib(), 2)}
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")
    return row


def accuracy(args: argparse.Namespace) -> dict:
    from kneetf import baselines as B
    from kneetf import metrics as M
    from kneetf.data.pipeline import load_arrays

    train = load_arrays(args.cache, "train")
    test = load_arrays(args.cache, args.split)
    limits = [len(train["id"])] + [int(v) for v in args.exact_limits.split(",")]
    rows = []
    for limit in limits:
        t0 = time.monotonic()
        fit = B.fit_baselines(lambda: [train], test["xray"], test["id"], exact_limit=limit)
        seconds = time.monotonic() - t0
        for name in B.STRONG:
            s = M.summarize(test["mri"], fit.predictions[name])
            rows.append({"exact_limit": limit, "baseline": name, "psnr": round(s["psnr"]["mean"], 3),
                         "ssim_2d": round(s["ssim_2d"]["mean"], 4), "fit_s": round(seconds, 1),
                         "label": fit.labels[name]})
    print(f"{len(train['id'])} training pairs, {len(test['id'])} evaluated ({args.split})")
    print("| exact limit | baseline | PSNR | SSIM-2D | fit (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['exact_limit']} | {r['label']} | {r['psnr']:.3f} | {r['ssim_2d']:.4f} | {r['fit_s']} |")
    return {"train_pairs": len(train["id"]), "rows": rows, "peak_rss_gib": round(_rss_gib(), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=20000, help="synthetic training pairs (scale mode)")
    p.add_argument("--eval", type=int, default=200, help="evaluated pairs (scale mode)")
    p.add_argument("--exact-limit", type=int, default=None, help="exact_limit of the fit (scale mode)")
    p.add_argument("--cache", default=None, help="a cache: compare the exact and approximate regimes on it")
    p.add_argument("--split", default="test", help="evaluated split of --cache")
    p.add_argument("--exact-limits", default="512,1024", help="approximate regimes to compare (with --cache)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from kneetf import baselines as B

    if args.exact_limit is None:
        args.exact_limit = B.EXACT_LIMIT
    result = accuracy(args) if args.cache else scale(args)
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
