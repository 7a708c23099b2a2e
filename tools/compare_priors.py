"""Kernel ridge priors of the model against the kernel ridge baseline, without training a network.

On a prepared cache, fits on the training split (in memory):

- the `krr_rbf`, `knn_cv` and `mean` baselines of `kneetf evaluate` (`kneetf.baselines.fit_baselines`:
  32x32 X-ray standardised per pixel, RBF kernel, ridge strength and width by one 5-fold
  cross-validation; the MRI voxels as targets);
- each prior in `PRIORS` with `kneetf.training.prior.fit_prior`, predicted by the model's
  `KernelRidgePrior` layer (the untrained network of a `residual_prior=kernel_ridge` model,
  before its sigmoid head);

and scores all of them on the evaluated splits (val and test by default) with
`kneetf.metrics.subject_scores`. The gain columns are paired over the evaluated knees
(mean ± standard error) against `krr_rbf`.

    python tools/compare_priors.py --data CACHE
    python tools/compare_priors.py --data CACHE --splits test --priors default

Prints a table and one final line `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

#: prior name -> `fit_prior` arguments (the layer's sizes follow)
PRIORS = {
    "previous": {"features": "pixels", "downsample": 4, "rank": 64, "basis_size": 32, "cv_repeats": 1},
    "default": {"features": "pixels+gradient", "downsample": 8, "rank": 128, "basis_size": 64, "cv_repeats": 5,
                "gradient_weight": 0.5},
}


def prior_predictions(train: dict, xray: np.ndarray, spec: dict, seed: int = 0) -> tuple[np.ndarray, dict]:
    """The in-model prior fitted on `train` with `spec`, applied to `xray`."""
    from kneetf.models.prior import KernelRidgePrior
    from kneetf.training.prior import fit_prior

    fit = fit_prior(lambda: [train], seed=seed, **spec)
    size, slices = train["mri"].shape[1], train["mri"].shape[3]
    layer = KernelRidgePrior(image_size=size, num_slices=slices, downsample=spec["downsample"],
                             num_landmarks=fit.num_landmarks, rank=fit.rank, basis_size=spec["basis_size"],
                             features=spec["features"])
    layer.build((None, size, size, 1))
    layer.set_prior(fit.values)
    pred = np.concatenate([layer(xray[i:i + 16]).numpy() for i in range(0, len(xray), 16)])
    return pred, fit.info


def main(argv: list[str] | None = None) -> dict:
    from kneetf import baselines as B
    from kneetf import metrics as M
    from kneetf.data.pipeline import load_arrays

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="a prepared cache")
    p.add_argument("--splits", default="val,test", help="evaluated splits, comma-separated")
    p.add_argument("--priors", default=",".join(PRIORS), help=f"priors to fit: {', '.join(PRIORS)}")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    train = load_arrays(args.data, "train")
    parts = [load_arrays(args.data, s) for s in args.splits.split(",")]
    xray = np.concatenate([a["xray"] for a in parts])
    mri = np.concatenate([a["mri"] for a in parts])
    ids = [i for a in parts for i in a["id"]]

    preds, seconds, info = {}, {}, {}
    t0 = time.monotonic()
    base = B.fit_baselines(lambda: [train], xray, ids, seed=args.seed)
    seconds["baselines"] = round(time.monotonic() - t0, 1)
    preds["krr_rbf"], preds["knn_cv"] = base.predictions["krr_rbf"], base.predictions["knn_cv"]
    preds["mean"] = np.broadcast_to(base.predictions["mean"], mri.shape)
    for name in args.priors.split(","):
        t0 = time.monotonic()
        preds[f"prior_{name}"], info[name] = prior_predictions(train, xray, PRIORS[name], args.seed)
        seconds[f"prior_{name}"] = round(time.monotonic() - t0, 1)

    scores = {k: M.subject_scores(mri, v) for k, v in preds.items()}
    ref = scores["krr_rbf"]
    rows = {}
    print(f"{len(ids)} knees ({args.splits}), {len(train['id'])} training pairs: {args.data}")
    print(f"{'predictor':16s} {'PSNR':>7s} {'SSIM-2D':>8s} {'PSNR gain vs krr_rbf':>22s} {'SSIM-2D gain':>16s}")
    for k, s in scores.items():
        dp = np.subtract(s["psnr"], ref["psnr"])
        ds = np.subtract(s["ssim_2d"], ref["ssim_2d"])
        se = lambda d: float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0  # noqa: E731
        rows[k] = {"psnr": float(np.mean(s["psnr"])), "ssim_2d": float(np.mean(s["ssim_2d"])),
                   "psnr_gain": float(dp.mean()), "psnr_gain_se": se(dp),
                   "ssim_2d_gain": float(ds.mean()), "ssim_2d_gain_se": se(ds)}
        r = rows[k]
        print(f"{k:16s} {r['psnr']:7.3f} {r['ssim_2d']:8.4f} {r['psnr_gain']:+14.3f} ± {r['psnr_gain_se']:.3f} "
              f"{r['ssim_2d_gain']:+9.4f} ± {r['ssim_2d_gain_se']:.4f}")
    result = {"data": args.data, "splits": args.splits, "knees": len(ids), "rows": rows, "seconds": seconds,
              "krr_rbf": base.details.get("krr_rbf", {}).get("best"),
              "priors": {k: {f: v[f] for f in ("alpha", "gamma_relative", "rank", "pca_variance_kept", "bytes")}
                         for k, v in info.items()}}
    print("RESULT " + json.dumps(result))
    return result


if __name__ == "__main__":
    main()
