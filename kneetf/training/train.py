"""`train(...)`: data -> cache -> KneeNet.fit -> run folder.

The run folder holds `model.keras` (best on validation), `config.json`, `history.csv`,
`tensorboard/`, `metrics.json` (validation PSNR / SSIM of the model next to the
mean-training-volume baseline and, for a model with a kernel ridge prior, the prior alone;
how many epochs ran, the best one, and why training stopped) and `samples.png`.

Training stops at `epochs`, when the validation loss has not improved for
`early_stopping_patience` epochs, or at a time budget: `time_budget_s` for any run, or
`demo_time_budget_s` for runs on the built-in synthetic knees only (a user's data is never cut
short by the demo's budget).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kneetf.config import ModelConfig, PreprocessConfig, TrainConfig, replace, to_dict
from kneetf.data.cache import DATASET_JSON
from kneetf.errors import ConfigError, InputError
from kneetf.io.atomic import write_text_atomic
from kneetf.protocol import RUN_BACKUP_DIR, RUN_CONFIG_FILE, RUN_HISTORY_FILE, RUN_MODEL_FILE
from kneetf.training.distribute import STRATEGIES
from kneetf.version import __version__

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PRIOR_FILE = "prior.json"
#: why a run stopped (metrics.json "stop_reason")
STOP_REASONS = ("epochs", "early_stopping", "time_budget", "nan")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


@dataclass
class DataSpec:
    """Where the training pairs come from: a cache folder, a manifest CSV, or (path None)
    the built-in synthetic knees."""

    path: str | None = field(default=None, metadata={
        "help": "a cache folder (from `kneetf prepare`) or a manifest CSV; default: built-in synthetic knees"})
    synthetic_n: int = field(default=512, metadata={"help": "number of synthetic knees"})
    synthetic_seed: int = 0
    workers: int = field(default=2, metadata={"help": "processes that decode / generate data"})


def resolve_cache(data: DataSpec, out_dir: Path, prep: PreprocessConfig, progress: bool = True) -> Path:
    """A ready cache folder for `data`: built (or completed) under `out_dir/data/` if needed."""
    from kneetf.data import sources

    if data.path is None:
        cache = out_dir / "data" / f"synthetic-n{data.synthetic_n}-seed{data.synthetic_seed}"
        sources.build_synthetic_cache(cache, n=data.synthetic_n, seed=data.synthetic_seed, config=prep,
                                      workers=data.workers, progress=progress)
        return cache
    path = Path(data.path)
    if path.is_dir() and (path / DATASET_JSON).exists():
        return path
    if path.is_file() and path.suffix.lower() == ".csv":
        cache = out_dir / "data" / f"{path.stem}-cache"
        result = sources.prepare_manifest(path, cache, config=prep, workers=data.workers, progress=progress)
        if result.total == 0:
            raise InputError(path, "no valid pair could be prepared; see errors.csv in " + str(cache))
        return cache
    if not path.exists():
        raise InputError(path, "does not exist")
    raise InputError(path, "is neither a kneetf cache folder (with dataset.json) nor a manifest .csv")


def _mean_volume(cache: Path, split: str, batch_size: int) -> np.ndarray:
    from kneetf.data.pipeline import make_dataset

    total, n = None, 0
    for _, y in make_dataset(cache, split, batch_size):
        s = y["mri"].numpy().sum(axis=0, dtype=np.float64)
        total = s if total is None else total + s
        n += y["mri"].shape[0]
    return (total / max(n, 1)).astype("float32")


@dataclass
class RunOptions:
    """How a run executes (not what it learns): devices, precision, resuming."""

    strategy: str = field(default="auto", metadata={
        "help": "tf.distribute strategy (auto: mirrored when several GPUs are visible; multiworker reads TF_CONFIG)",
        "choices": STRATEGIES})
    precision: str = field(default="float32", metadata={
        "help": "Keras dtype policy while training (saved models are float32)", "choices": PRECISIONS})
    jit: bool = field(default=False, metadata={"help": "XLA-compile the training step (slower on CPU)"})
    fresh: bool = field(default=False, metadata={"help": "discard the backup in --out and start over"})
    steps_per_execution: int = 1


def _check_same_run(out: Path, blob: dict[str, Any], fresh: bool) -> None:
    """A backup may only be resumed by the same model, preprocessing and data."""
    previous = out / RUN_CONFIG_FILE
    if fresh or not previous.exists() or not (out / RUN_BACKUP_DIR).exists():
        return
    old = json.loads(previous.read_text())
    for key in ("model", "preprocess", "data"):
        if old.get(key) != blob.get(key):
            raise ConfigError(f"{out} holds an interrupted run with another {key} config; "
                              "use another --out or --fresh to start over")


def _val_losses(history: Path, monitor: str = "val_loss") -> list[tuple[int, float]]:
    """(epoch, monitored value) rows of a history.csv (epochs 0-based, as Keras writes them)."""
    import csv

    if not history.exists():
        return []
    with history.open() as f:
        return [(int(r["epoch"]), float(r[monitor])) for r in csv.DictReader(f) if r.get(monitor)]


def _best_val_loss(history: Path, monitor: str = "val_loss") -> float | None:
    values = [v for _, v in _val_losses(history, monitor)]
    return min(values) if values else None


def time_budget(train_config: TrainConfig, data: DataSpec) -> float:
    """The run's time budget in seconds (0 = none): `time_budget_s` for any run, else
    `demo_time_budget_s` on the built-in synthetic knees only."""
    if train_config.time_budget_s:
        return float(train_config.time_budget_s)
    return float(train_config.demo_time_budget_s) if data.path is None else 0.0


def train(model_config: ModelConfig, train_config: TrainConfig, out_dir: str | Path, *,
          data: DataSpec | None = None, preprocess: PreprocessConfig | None = None, preset: str = "",
          options: RunOptions | None = None, recipe: str = "", verbose: int | str = "auto") -> dict[str, Any]:
    """Train KneeNet and write the run folder; returns the validation metrics dict.

    Started again on the same `out_dir`, it resumes from the last completed epoch (optimizer
    state and learning rates included); with more `epochs` it trains a finished run further.
    """
    import shutil

    import keras

    from kneetf.data.cache import read_info
    from kneetf.data.pipeline import load_arrays, make_dataset, split_size
    from kneetf.data.sources import copy_roi_detector
    from kneetf.models.kneenet import KneeNet
    from kneetf.training.callbacks import ImageSummary, LearningRateLogger, StopReason, TimeBudget
    from kneetf.training.distribute import is_chief, make_strategy, worker_index

    data = data or DataSpec()
    options = options or RunOptions()
    if options.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}. Received: {options.precision!r}")
    prep = preprocess or PreprocessConfig(image_size=model_config.image_size, num_slices=model_config.num_slices)
    chief = is_chief()
    out = Path(out_dir)
    # non-chief workers of a multi-worker run write only to a private scratch folder
    work = out if chief else out / f".worker-{worker_index()}"
    work.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(train_config.seed)
    t0 = time.monotonic()
    strategy = make_strategy(options.strategy)

    cache = resolve_cache(data, work, prep, progress=verbose != 0)
    info = read_info(cache)
    shape = info["shapes"]["mri"]
    if (shape[0], shape[2]) != (model_config.image_size, model_config.num_slices):
        raise ConfigError(f"cache {cache} holds {shape} MRI volumes but the model expects "
                          f"{model_config.image_size}x{model_config.image_size}x{model_config.num_slices}")
    n_train, n_val = split_size(cache, "train"), split_size(cache, "val")
    if n_train == 0:
        raise InputError(cache, "the train split is empty")
    val_split = "val" if n_val else "train"
    if not n_val:
        log.warning("no validation split in %s: validating on the training split", cache)
    data_s = time.monotonic() - t0
    prior = None
    if model_config.residual_template and model_config.residual_prior == "kernel_ridge":
        from kneetf.training.prior import fit_model_prior, iterate_split

        prior = fit_model_prior(iterate_split(cache, "train"), model_config, train_config, seed=train_config.seed)
        # the layer's sizes follow the data: fewer landmarks (and a lower rank) on a small split
        model_config = replace(model_config, prior_landmarks=prior.num_landmarks, prior_rank=prior.rank)
        if chief:
            write_text_atomic(work / PRIOR_FILE, json.dumps(prior.info, indent=2))
    prior_s = time.monotonic() - t0 - data_s

    blob = {"kneetf_version": __version__, "preset": preset, "recipe": recipe, "model": to_dict(model_config),
            "train": to_dict(train_config), "preprocess": info["preprocess"],
            "data": info.get("source") or str(cache), "run": {"strategy": options.strategy,
                                                             "precision": options.precision, "jit": options.jit}}
    _check_same_run(out, blob, options.fresh)
    if options.fresh and (work / RUN_BACKUP_DIR).exists():
        shutil.rmtree(work / RUN_BACKUP_DIR)
    write_text_atomic(work / RUN_CONFIG_FILE, json.dumps(blob, indent=2))
    copy_roi_detector(cache, work)  # the ROI detector, if any, travels with the model

    keras.mixed_precision.set_global_policy(options.precision)
    try:
        with strategy.scope():
            model = KneeNet(model_config)
            if prior is not None:
                model.set_prior(prior.values)
            elif model_config.residual_template:
                model.set_template(_mean_volume(cache, "train", train_config.batch_size))
            model.compile_for_training(train_config, learning_rate=_learning_rate(train_config, n_train),
                                       jit_compile=options.jit, steps_per_execution=options.steps_per_execution)
    finally:
        keras.mixed_precision.set_global_policy("float32")

    replicas = strategy.num_replicas_in_sync
    steps = max(1, n_train // train_config.batch_size) if replicas > 1 else None
    transform = None
    if prior is not None and train_config.prior_loo_targets:
        from kneetf.training.prior import offset_transform

        transform = offset_transform(prior, model_config.image_size)
    train_ds = make_dataset(cache, "train", train_config.batch_size, shuffle=True, seed=train_config.seed,
                            repeat=replicas > 1, drop_remainder=replicas > 1, augment=train_config.augment,
                            shift=train_config.shift_augment, transform=transform)
    val_ds = make_dataset(cache, val_split, train_config.batch_size, drop_remainder=replicas > 1 and
                          split_size(cache, val_split) >= train_config.batch_size)
    sample = load_arrays(cache, val_split, limit=8)
    resumed = (work / RUN_BACKUP_DIR).exists()
    monitor = train_config.monitor
    threshold = _best_val_loss(work / RUN_HISTORY_FILE, monitor) if resumed else None
    initial = None
    if not resumed and model_config.residual_template:
        # the untrained model predicts its template (the mean volume or the kernel ridge
        # prior): it is the model to beat on validation, kept unless an epoch does better
        logs = model.evaluate(val_ds, verbose=0, return_dict=True)
        initial = threshold = float(logs[monitor.removeprefix("val_")])
        model.save(work / RUN_MODEL_FILE)
        log.info("untrained model (its template alone): %s %.5g", monitor, initial)
    callbacks: list[keras.callbacks.Callback] = [
        LearningRateLogger(),
    ]
    if train_config.ema_momentum:
        # first: validation, checkpoints and backups see the averaged weights, and a resumed
        # run swaps them back at the start of its next epoch
        callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    callbacks += [
        # history first: a kill between the two writes then repeats an epoch, never loses a row
        keras.callbacks.CSVLogger(str(work / RUN_HISTORY_FILE), append=resumed),
        keras.callbacks.ModelCheckpoint(str(work / RUN_MODEL_FILE), monitor=monitor, mode="min",
                                        save_best_only=True, initial_value_threshold=threshold),
        keras.callbacks.BackupAndRestore(str(work / RUN_BACKUP_DIR), double_checkpoint=True, delete_checkpoint=False),
        keras.callbacks.TerminateOnNaN(),
    ]
    if chief:
        callbacks += [
            keras.callbacks.TensorBoard(str(out / "tensorboard"), write_graph=False),
            ImageSummary(str(out / "tensorboard" / "images"), sample["xray"], sample["mri"],
                         every=max(1, train_config.epochs // 10)),
        ]
    stoppers: dict[str, keras.callbacks.Callback] = {}
    if train_config.early_stopping_patience:
        stoppers["early_stopping"] = keras.callbacks.EarlyStopping(monitor=monitor, mode="min",
                                                                   patience=train_config.early_stopping_patience)
    budget = time_budget(train_config, data)
    if budget:  # counted from the start of the run, data preparation included
        stoppers["time_budget"] = TimeBudget(budget, start=t0)
    reason = StopReason(stoppers)
    callbacks += list(stoppers.values()) + [reason]
    t1 = time.monotonic()
    model.fit(train_ds, validation_data=val_ds, epochs=train_config.epochs, steps_per_epoch=steps,
              callbacks=callbacks, verbose=verbose)
    train_s = time.monotonic() - t1
    if not chief:
        return {"chief": False}

    best_path = out / RUN_MODEL_FILE
    if not best_path.exists():  # no epoch improved on a resumed run's best: keep the last weights
        model.save(best_path)
    best = keras.saving.load_model(best_path, safe_mode=True)
    if options.precision != "float32":  # serve and export in float32
        best = _as_float32(best)
        best.save(best_path)
    metrics = _validation_metrics(best, cache, val_split)
    losses = _val_losses(out / RUN_HISTORY_FILE, monitor)
    best_epoch = min(losses, key=lambda r: r[1])[0] + 1 if losses else None
    if best_epoch is not None and initial is not None and min(v for _, v in losses) >= initial:
        best_epoch = 0  # no epoch beat the untrained model
    metrics.update(train_pairs=n_train, val_pairs=n_val, val_split=val_split, data_s=round(data_s, 1),
                   train_s=round(train_s, 1), total_s=round(time.monotonic() - t0, 1),
                   epochs_run=len(model.history.epoch) if model.history else 0, resumed=resumed,
                   epochs_done=losses[-1][0] + 1 if losses else 0, epochs=train_config.epochs,
                   best_epoch=best_epoch, stop_reason=reason.reason, time_budget_s=budget, monitor=monitor,
                   untrained_val=initial)
    if prior is not None:
        metrics.update(prior_s=round(prior_s, 1), prior=prior.info)
    log.info("%s", stop_summary(metrics))
    write_text_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2))
    _write_samples(best, load_arrays(cache, val_split, limit=4), out / "samples.png")
    return metrics


def stop_summary(metrics: dict[str, Any]) -> str:
    """One line: how many epochs ran, why training stopped and which epoch was kept."""
    done, total = metrics.get("epochs_done", 0), metrics.get("epochs", 0)
    why = {"epochs": f"all {total} epochs done",
           "early_stopping": f"early stop at epoch {done} of {total}: the validation loss had not improved "
                             "for the patience",
           "time_budget": f"time budget of {metrics.get('time_budget_s', 0):.0f} s reached at epoch {done} of {total}",
           "nan": f"stopped at epoch {done} of {total}: the loss became NaN"}.get(metrics.get("stop_reason"), "")
    best = metrics.get("best_epoch")
    if best == 0:
        return f"training: {why}; no epoch beat the untrained model (its template), which model.keras keeps"
    return f"training: {why}; best epoch {best} (kept in model.keras)" if best else f"training: {why}"


def _learning_rate(train_config: TrainConfig, n_train: int) -> Any:
    """The encoder/decoder rate or schedule (the generator follows it at its own ratio)."""
    import keras

    if train_config.lr_schedule == "cosine":
        steps = max(1, -(-n_train // train_config.batch_size)) * train_config.epochs
        return keras.optimizers.schedules.CosineDecay(train_config.lr_encdec, decay_steps=steps, alpha=0.02)
    return train_config.lr_encdec


def _as_float32(model: Any) -> Any:
    from kneetf.models.kneenet import KneeNet

    clone = KneeNet(model.model_config)  # built under the float32 global policy
    clone.set_weights(model.get_weights())
    clone.compile_for_training(TrainConfig())
    return clone


def _validation_metrics(model: Any, cache: Path, split: str) -> dict[str, Any]:
    """PSNR / SSIM (data_range 1) of the model on `split`, next to the mean training volume."""
    from kneetf import metrics as M
    from kneetf.data.pipeline import load_arrays

    arrays = load_arrays(cache, split)
    pred = model.predict(arrays["xray"], batch_size=16, verbose=0)["mri"]
    mean = _mean_volume(cache, "train", 64)
    base = np.broadcast_to(mean, arrays["mri"].shape)
    model_s = M.summarize(arrays["mri"], pred)
    base_s = M.summarize(arrays["mri"], base)
    out = {
        "split": split,
        "model": model_s,
        "mean_baseline": base_s,
        "psnr_gain_db": model_s["psnr"]["mean"] - base_s["psnr"]["mean"],
        "ssim_gain": model_s["ssim_2d"]["mean"] - base_s["ssim_2d"]["mean"],
    }
    if getattr(model, "prior", None) is not None:  # the kernel ridge prior alone (the untrained model)
        prior = np.concatenate([model.prior(arrays["xray"][i:i + 16]).numpy() for i in range(0, len(pred), 16)])
        out["prior_baseline"] = M.summarize(arrays["mri"], prior)
    return out


def _write_samples(model: Any, arrays: dict[str, Any], path: Path) -> None:
    from kneetf import viz

    pred = model.predict(arrays["xray"], verbose=0)["mri"]
    viz.save_montage(path, arrays["xray"], arrays["mri"], pred, ids=arrays["id"])
