"""Score a model on a cache split next to the baselines it must beat (`kneetf evaluate`).

Methods compared on the same evaluated subjects, with the same metrics (`kneetf.metrics`):
the model, the mean training volume, nearest-neighbour retrieval, the k-NN average and (with
`strong`, the default) the cross-validated k-NN average and kernel ridge regression, linear
and RBF (`kneetf.baselines`, all fitted on `baseline_split` only). Everything happens in the cache's normalised
space (data range 1); the split is streamed, so memory grows with the number of evaluated
subjects only through the baselines' accumulators.

With `out_dir`: `per_subject.csv`, `summary.json`, montages of the best, median and worst
subjects (by the model's PSNR), `slice_psnr.png` and, for a run folder, `learning_curves.png`;
with `save_volumes`, each subject's reconstruction as `volumes/<id>.nii.gz` (the output
geometry of `kneetf predict`, `kneetf.inference.outputs.write_volume`); the volumes of the
subjects an earlier report listed and this run does not evaluate are removed from it, and a run without
`save_volumes` does not list the folder. Nothing is written anywhere else.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from kneetf import baselines as B
from kneetf import metrics as M
from kneetf.errors import ConfigError, InputError
from kneetf.io.atomic import write_text_atomic
from kneetf.io.outdir import check_output_folder
from kneetf.protocol import RUN_HISTORY_FILE
from kneetf.version import __version__

log = logging.getLogger(__name__)

SUMMARY_JSON = "summary.json"
PER_SUBJECT_CSV = "per_subject.csv"
SLICE_PSNR_PNG = "slice_psnr.png"
LEARNING_CURVES_PNG = "learning_curves.png"
VOLUMES_DIR = "volumes"
#: metrics on which "the model beats a baseline" is judged
JUDGED = ("psnr", "ssim_2d")
METRIC_LABELS = {"psnr": "PSNR (dB)", "ssim_2d": "SSIM-2D", "ssim_3d": "SSIM-3D", "mae": "MAE"}


def _iter_split(cache_dir: str | Path, split: str, batch_size: int, limit: int | None = None
                ) -> Iterator[dict[str, Any]]:
    """Numpy batches {"id", "side", "xray", "mri"} of a cache split, at most `limit` subjects."""
    from kneetf.data.pipeline import make_dataset

    seen = 0
    for ex in make_dataset(cache_dir, split, batch_size, with_meta=True):
        n = len(ex["id"])
        take = n if limit is None else min(n, limit - seen)
        yield {"id": [v.decode() for v in ex["id"].numpy()[:take]],
               "side": [v.decode() for v in ex["side"].numpy()[:take]],
               "xray": ex["xray"].numpy()[:take], "mri": ex["mri"].numpy()[:take]}
        seen += take
        if limit is not None and seen >= limit:
            return


def baseline_predictions(train_arrays: dict[str, Any], eval_arrays: dict[str, Any], *,
                         k: int = B.DEFAULT_K, downsample: int = B.DEFAULT_DOWNSAMPLE) -> dict[str, np.ndarray]:
    """In-memory baselines for the trainer (`kneetf.baselines.baseline_predictions`)."""
    return B.baseline_predictions(train_arrays, eval_arrays, k=k, downsample=downsample)


def summarize(true: Any, pred: Any) -> dict[str, dict[str, float]]:
    """Means/stds of the per-subject metrics of batches (N, H, W, S) (`kneetf.metrics.summarize`)."""
    return M.summarize(true, pred)


def _history_path(model: Any) -> Path | None:
    if not isinstance(model, (str, Path)):
        return None
    p = Path(model)
    folder = p if p.is_dir() else p.parent
    h = folder / RUN_HISTORY_FILE
    return h if h.is_file() else None


#: preprocessing fields that decide which slices and which way round a pair is: a cache that
#: differs from the model's in one of them is refused, in another (percentiles) only warned about
SAME_PAIRS_FIELDS = frozenset({"image_size", "slice_start", "num_slices", "mirror_left"})


def evaluate(model: Any, cache_dir: str | Path, split: str = "test", out_dir: str | Path | None = None, *,
             baseline_split: str = "train", k: int = B.DEFAULT_K, downsample: int = B.DEFAULT_DOWNSAMPLE,
             batch_size: int = 16, limit: int | None = None, progress: bool = True,
             log_verdict: bool = True, strong: bool = True, folds: int = B.DEFAULT_FOLDS,
             save_volumes: bool = False, trust_model: bool = False) -> dict[str, Any]:
    """Score `model` (path of a .keras / run folder / SavedModel / .tflite, or a keras.Model)
    on `split` of the cache against the baselines; write the report to `out_dir` if given.
    `strong` adds the cross-validated baselines (`folds`-fold CV on `baseline_split`).

    Returns the summary dict (what summary.json holds) plus "per_subject" (list of rows).
    `log_verdict` logs `verdict_lines` (the CLI prints them itself). `save_volumes` writes
    the model's reconstructions to `out_dir/volumes/<id>.nii.gz`. A SavedModel / TFLite model
    with operations outside kneetf's allow list is refused unless `trust_model`.
    """
    from tqdm.auto import tqdm

    from kneetf.config import PreprocessConfig, config_hash, from_dict
    from kneetf.data.cache import read_info
    from kneetf.inference.loading import read_preprocess_config, resolve_model_path
    from kneetf.inference.predictor import load_predictor

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1. Received: batch_size={batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1. Received: limit={limit}")
    if out_dir is not None:  # before any work, not when the report is written
        check_output_folder(out_dir)
        if save_volumes:
            check_output_folder(Path(out_dir) / VOLUMES_DIR, "--save-volumes folder")
    cache_dir = Path(cache_dir)
    info = read_info(cache_dir)
    for s in (split, baseline_split):
        if int(info.get("counts", {}).get(s, 0)) == 0:
            raise InputError(cache_dir, f"split {s!r} is empty or missing (counts: {info.get('counts')})")
    cache_prep = from_dict(PreprocessConfig, info["preprocess"])
    recorded = read_preprocess_config(resolve_model_path(model)[1]) if isinstance(model, (str, Path)) else None
    if recorded is not None and config_hash(recorded) != info.get("preprocess_hash"):
        differ = {f.name: (getattr(recorded, f.name), getattr(cache_prep, f.name))
                  for f in dataclasses.fields(PreprocessConfig) if getattr(recorded, f.name) != getattr(cache_prep, f.name)}
        said = ", ".join(f"{k} {model_v} (cache: {cache_v})" for k, (model_v, cache_v) in differ.items())
        if set(differ) & SAME_PAIRS_FIELDS:  # other slices or unmirrored knees: scores of another task
            raise InputError(cache_dir, f"the model was trained on pairs prepared with {said}; prepare the data "
                                        "with the model's settings (kneetf prepare --slice-start / --num-slices / "
                                        "--mirror-left) to evaluate it")
        log.warning("the model was trained with another preprocessing config than the cache's (%s: %s): "
                    "scores may be off", cache_dir, said or "hash only")
    predictor = load_predictor(model, recorded or cache_prep, trust_model=trust_model)
    shape = tuple(info["shapes"]["mri"])
    if (predictor.image_size, predictor.num_slices) != (shape[0], shape[2]):
        raise InputError(cache_dir, f"cache holds {shape} volumes; the model works on "
                                    f"{predictor.image_size}x{predictor.image_size}x{predictor.num_slices}")

    # 1. baselines from `baseline_split`, for the evaluated X-rays
    ev_ids, ev_xray = [], []
    for batch in _iter_split(cache_dir, split, batch_size, limit):
        ev_ids += batch["id"]
        ev_xray.append(batch["xray"])
    xray_all = np.concatenate(ev_xray)
    fit = B.fit_baselines(lambda: _iter_split(cache_dir, baseline_split, 64), xray_all, ev_ids,
                          k=k, downsample=downsample, strong=strong, folds=folds)
    base = fit.predictions
    n_base = read_info(cache_dir)["counts"][baseline_split]
    methods = ["model"] + list(base)

    # 2. every method on every evaluated subject
    scores: dict[str, dict[str, list]] = {m: {} for m in methods}
    sides: list[str] = []
    bar = tqdm(total=len(ev_ids), desc="evaluate", unit="subject", disable=not progress)
    offset = 0
    for batch in _iter_split(cache_dir, split, batch_size, limit):
        n = len(batch["id"])
        true = batch["mri"]
        preds = {"model": predictor(batch["xray"])}
        for name, vol in base.items():
            preds[name] = np.broadcast_to(vol, true.shape) if name == "mean" else vol[offset:offset + n]
        for name, pred in preds.items():
            for key, v in M.subject_scores(true, pred).items():
                scores[name].setdefault(key, []).extend(list(v))
        sides += batch["side"]
        if save_volumes and out_dir is not None:
            _write_volumes(Path(out_dir) / VOLUMES_DIR, batch["id"], batch["side"], preds["model"], cache_prep)
        offset += n
        bar.update(n)
    bar.close()
    if offset != len(ev_ids):
        raise InputError(cache_dir, f"split {split!r} changed while it was read ({len(ev_ids)} then {offset})")

    result = _summary(scores, methods, ev_ids, model, cache_dir, split, baseline_split, n_base, predictor,
                      fit.labels, fit.details)
    result["per_subject"] = _rows(scores, methods, ev_ids, sides)
    for line in verdict_lines(result) if log_verdict else ():
        (log.warning if "NOT" in line else log.info)(line)
    if out_dir is not None:
        if save_volumes:
            _remove_earlier_volumes(Path(out_dir), ev_ids)
        _write_report(Path(out_dir), result, model, predictor, cache_dir, split, batch_size, limit,
                      volumes=save_volumes)
    return result


def _remove_earlier_volumes(out: Path, ids: Sequence[str]) -> None:
    """Remove from `out/volumes` the volumes of the subjects the earlier report in `out`
    lists and this run (`ids`) does not evaluate: they are not this report's. Only those
    names go (a user's file in the folder is never one of them)."""
    from kneetf.inference.batch import safe_id

    try:
        with (out / PER_SUBJECT_CSV).open(newline="", encoding="utf-8") as f:
            reported = {safe_id(r["id"]) for r in csv.DictReader(f) if r.get("id")}
    except (OSError, UnicodeDecodeError, csv.Error, KeyError):
        return
    for name in reported - {safe_id(i) for i in ids}:
        (out / VOLUMES_DIR / f"{name}.nii.gz").unlink(missing_ok=True)


def _write_volumes(folder: Path, ids: Sequence[str], sides: Sequence[str], mri: np.ndarray, prep: Any) -> None:
    """Model outputs (N, H, W, slices) of a cache batch as `<id>.nii.gz`, mirroring undone."""
    from kneetf.inference.batch import safe_id
    from kneetf.inference.outputs import write_volume
    from kneetf.preprocess.xray import mirrors, to_output_volume

    for sid, side, vol in zip(ids, sides, mri):
        write_volume(folder / f"{safe_id(sid)}.nii.gz", to_output_volume(vol, mirrors(prep, side)))


def _summary(scores: dict[str, dict[str, list]], methods: Sequence[str], ids: Sequence[str], model: Any,
             cache_dir: Path, split: str, baseline_split: str, n_base: int, predictor: Any,
             labels: dict[str, str] | None = None, details: dict[str, Any] | None = None) -> dict[str, Any]:
    labels = labels or {}
    summary = {m: M.summarize_scores(scores[m]) for m in methods}
    beats: dict[str, dict[str, Any]] = {}
    for m in methods[1:]:
        entry: dict[str, Any] = {}
        for metric in JUDGED:
            mine, theirs = np.asarray(scores["model"][metric]), np.asarray(scores[m][metric])
            entry[metric] = bool(summary["model"][metric]["mean"] > summary[m][metric]["mean"])
            entry[f"{metric}_win_rate"] = float(np.mean(mine > theirs))
            entry[f"{metric}_gain"] = float(summary["model"][metric]["mean"] - summary[m][metric]["mean"])
        beats[m] = entry
    psnr = np.asarray(scores["model"]["psnr"])
    order = np.argsort(psnr, kind="stable")
    picks = {"best": ids[int(order[-1])], "median": ids[int(order[len(order) // 2])], "worst": ids[int(order[0])]}
    slice_psnr = {}
    for m in methods:
        sp = np.asarray(scores[m]["slice_psnr"])
        slice_psnr[m] = {"mean": sp.mean(axis=0).round(4).tolist(), "std": sp.std(axis=0).round(4).tolist()}
    return {
        "model": str(model) if isinstance(model, (str, Path)) else getattr(model, "name", "model"),
        "model_kind": predictor.kind,
        "cache": str(cache_dir),
        "split": split,
        "baseline_split": baseline_split,
        "n_subjects": len(ids),
        "n_baseline_subjects": int(n_base),
        "methods": {m: {"label": "model" if m == "model" else labels.get(m, B.label(m)), **summary[m]}
                    for m in methods},
        "beats": beats,
        "model_beats_all_baselines": all(all(b[x] for x in JUDGED) for b in beats.values()),
        "gain_over_best_baseline": _best_gains(summary, methods),
        "baselines": details or {},
        "subjects": picks,
        "per_slice_psnr": slice_psnr,
        "metric_settings": {"data_range": 1.0, "psnr_cap_db": M.PSNR_CAP_DB, "ssim_window": "gaussian",
                            "ssim_sigma": M.SSIM_SIGMA, "ssim_truncate": M.SSIM_TRUNCATE,
                            "ssim_k1": M.SSIM_K1, "ssim_k2": M.SSIM_K2},
        "kneetf_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _best_gains(summary: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """Per judged metric: the best baseline and the model's gain over it (the headline figure)."""
    out = {}
    for metric in JUDGED:
        best = max(methods[1:], key=lambda m: summary[m][metric]["mean"])
        out[metric] = {"baseline": best, "gain": float(summary["model"][metric]["mean"] - summary[best][metric]["mean"])}
    return out


def _rows(scores: dict[str, dict[str, list]], methods: Sequence[str], ids: Sequence[str],
          sides: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for i, sid in enumerate(ids):
        row: dict[str, Any] = {"id": sid, "side": sides[i]}
        for m in methods:
            for metric in M.METRICS:
                row[f"{m}_{metric}"] = round(float(scores[m][metric][i]), 6)
        rows.append(row)
    return rows


def format_table(result: dict[str, Any]) -> str:
    """The methods x metrics table, each cell `mean ± std`."""
    cols = list(M.METRICS)
    head = ["method"] + [METRIC_LABELS[c] for c in cols]
    lines = []
    for name, entry in result["methods"].items():
        cells = [entry["label"]]
        for c in cols:
            digits = 2 if c == "psnr" else 4
            cells.append(f"{entry[c]['mean']:.{digits}f} ± {entry[c]['std']:.{digits}f}")
        lines.append(cells)
    widths = [max(len(r[i]) for r in [head] + lines) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    title = (f"{result['n_subjects']} subject(s) of split {result['split']!r}; baselines from "
             f"{result['n_baseline_subjects']} subject(s) of {result['baseline_split']!r}")
    return "\n".join([title, fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in lines])


def verdict_lines(result: dict[str, Any]) -> list[str]:
    """One line per baseline and judged metric that the model does NOT beat (or one line
    saying it beats them all)."""
    out = []
    model = result["methods"]["model"]
    for name, b in result["beats"].items():
        base = result["methods"][name]
        for metric in JUDGED:
            if not b[metric]:
                out.append(f"the model does NOT beat the {base['label']} on {METRIC_LABELS[metric]}: "
                           f"{model[metric]['mean']:.4g} vs {base[metric]['mean']:.4g} "
                           f"(better on {100 * b[f'{metric}_win_rate']:.0f}% of subjects)")
    if not out:
        out.append("the model beats every baseline on " + " and ".join(METRIC_LABELS[m] for m in JUDGED))
    gains = result.get("gain_over_best_baseline")
    if gains:
        out.append("gain over the best baseline: " + ", ".join(
            f"{gains[m]['gain']:+.4g} {METRIC_LABELS[m]} (best: {result['methods'][gains[m]['baseline']]['label']})"
            for m in JUDGED))
    return out


def _write_report(out: Path, result: dict[str, Any], model: Any, predictor: Any, cache_dir: Path, split: str,
                  batch_size: int, limit: int | None, *, volumes: bool = False) -> None:
    from kneetf import viz

    out.mkdir(parents=True, exist_ok=True)
    files = [PER_SUBJECT_CSV, SUMMARY_JSON]
    rows = result["per_subject"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / PER_SUBJECT_CSV, buf.getvalue())

    # montages of the best / median / worst subjects (model's PSNR)
    wanted = {sid: kind for kind, sid in result["subjects"].items()}
    found: dict[str, tuple] = {}
    for batch in _iter_split(cache_dir, split, batch_size, limit):
        for i, sid in enumerate(batch["id"]):
            if sid in wanted and sid not in found:
                found[sid] = (batch["xray"][i], batch["mri"][i])
        if len(found) == len(wanted):
            break
    psnr = {r["id"]: r["model_psnr"] for r in rows}
    for kind in ("best", "median", "worst"):
        sid = result["subjects"][kind]
        x, t = found[sid]
        p = predictor(x[None])[0]
        name = f"montage_{kind}.png"
        viz.save_montage(out / name, x[None], t[None], p[None], [sid],
                         titles=[f"{kind}: {sid}\nPSNR {psnr[sid]:.2f} dB"])
        files.append(name)

    curves = {result["methods"][m]["label"]: (v["mean"], v["std"]) for m, v in result["per_slice_psnr"].items()}
    viz.save_slice_psnr_plot(out / SLICE_PSNR_PNG, curves, title=f"PSNR per slice ({split})")
    files.append(SLICE_PSNR_PNG)
    history = _history_path(model)
    if history is not None and viz.save_learning_curves(out / LEARNING_CURVES_PNG, history) is not None:
        files.append(LEARNING_CURVES_PNG)
    if volumes:
        files.append(VOLUMES_DIR + "/")
    summary = {k: v for k, v in result.items() if k != "per_subject"}
    summary["files"] = files
    result["files"] = files
    write_text_atomic(out / SUMMARY_JSON, json.dumps(summary, indent=2))


__all__ = ["evaluate", "summarize", "baseline_predictions", "format_table", "verdict_lines"]
