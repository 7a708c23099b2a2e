"""`train(...)`: data -> cache -> KneeNet.fit -> run folder.

The run folder holds `model.keras` (best on validation), `config.json`, `history.csv`,
`tensorboard/`, `metrics.json` (validation PSNR / SSIM of the model next to the
mean-training-volume baseline and, for a model with a kernel ridge prior, the prior alone;
how many epochs ran, the best one, and why training stopped) and `samples.png`.

Training stops at `epochs`, when the validation loss has not improved for
`early_stopping_patience` epochs, or at a time budget: `time_budget_s` for any run, or
`demo_time_budget_s` for runs on the built-in synthetic knees only (a user's data is never cut
short by the demo's budget).

After every epoch the run commits its
state to `backup/` (`kneetf.training.checkpoint`): killed at any moment and started again,
it resumes after its last committed epoch and ends with the files an uninterrupted run
writes.
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
#: the fitted prior with its training-target offsets, reused by a resumed run
PRIOR_FIT_FILE = "prior_fit.npz"
#: why a run stopped (metrics.json "stop_reason")
STOP_REASONS = ("epochs", "early_stopping", "time_budget", "nan")
SAMPLES_FILE = "samples.png"
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
    rois: str | None = field(default=None, metadata={
        "help": "with a manifest --data: boxes CSV id,x0,y0,x1,y1 (pixels of the full X-ray), as `kneetf prepare "
                "--rois`"})
    roi_detector: str | None = field(default=None, metadata={
        "help": "with a manifest --data and no --rois: 'builtin' (default), a detector .keras from `kneetf "
                "train-roi`, or 'classical', as `kneetf prepare --roi-detector`"})

    def __post_init__(self) -> None:
        manifest = self.path is not None and str(self.path).lower().endswith(".csv")
        given = [flag for flag, value in (("--rois", self.rois), ("--roi-detector", self.roi_detector)) if value]
        if given and not manifest:
            why = f"a cache holds its boxes already (--data {self.path})" if self.path else "the synthetic knees need none"
            raise ConfigError(f"{' and '.join(given)} choose the knee boxes of a manifest --data; {why}")
        if len(given) == 2:
            raise ConfigError("give --rois or --roi-detector, not both")


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
        result = sources.prepare_manifest(path, cache, config=prep, rois=data.rois, detector=data.roi_detector,
                                          workers=data.workers, progress=progress)
        if result.total == 0:
            raise InputError(path, "no valid pair could be prepared; see errors.csv in " + str(cache))
        if result.errors:
            listed = "".join(f"\n  {e.get('id') or '-'}: {e.get('file')}: {e.get('reason')}" for e in result.errors[:10])
            more = f"\n  ... and {len(result.errors) - 10} more" if len(result.errors) > 10 else ""
            log.warning("%s: %d pair(s) skipped, training on the other %d (all listed in %s):%s%s", path,
                        len(result.errors), result.total, cache / "errors.csv", listed, more)
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
    resume: bool = field(default=False, metadata={
        "help": "continue the run in --out (an error if there is none), also one that early stopping or the "
                "time budget ended; with a larger --epochs, train a finished run further"})
    steps_per_execution: int = 1


#: TrainConfig fields a resumed run may change: they decide how long it trains, not what it learns
RESUMABLE_CHANGES = ("epochs", "time_budget_s", "demo_time_budget_s", "early_stopping_patience")


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(f"{prefix}.{key}" if prefix else key, sub).items()}
    return {prefix: value}


def setting_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings of run config `new` that differ from `old` in what defines the model, its
    loss or its data ("lr_encdec 0.001 -> 0.5"); the `RESUMABLE_CHANGES` are allowed."""
    from kneetf.config import TrainConfig

    changes = []
    for key in ("model", "preprocess", "data"):
        a, b = _flat("", old.get(key)), _flat("", new.get(key))
        changes += [f"{key} {name or ''} {a.get(name)!r} -> {b.get(name)!r}".replace("  ", " ")
                    for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]
    defaults = to_dict(TrainConfig())
    before = {**defaults, **(old.get("train") or {})}
    for name, value in (new.get("train") or {}).items():
        if name not in RESUMABLE_CHANGES and before.get(name) != value:
            changes.append(f"{name} {before.get(name)!r} -> {value!r}")
    return changes


def _check_same_run(out: Path, blob: dict[str, Any], fresh: bool) -> None:
    """A backup may only be resumed with the model, loss, preprocessing and data it was
    trained with; a longer run or another budget are fine."""
    previous = out / RUN_CONFIG_FILE
    if fresh or not previous.exists() or not (out / RUN_BACKUP_DIR).exists():
        return
    try:
        old = json.loads(previous.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(previous, f"the run's config cannot be read ({e}); use --fresh to start the run over, "
                                   "or another --out") from None
    changes = setting_changes(old, blob)
    if changes:
        raise ConfigError(f"{out} holds a run trained with other settings: {'; '.join(changes)}. They define the "
                          "model, its loss or its data, so the run cannot continue with them; use --fresh to start "
                          "it over with the new settings, or another --out")


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

    Started again on the same `out_dir`, it resumes after the last completed epoch (optimizer
    state, learning rates, best epoch, early-stopping count and data order included) and
    ends with the files an uninterrupted run writes; with more `epochs` it trains a finished
    run further. A resume whose model, loss, preprocessing or data settings differ from the
    run's is refused (`setting_changes`).
    """
    import shutil

    import keras

    from kneetf.data.cache import read_info
    from kneetf.data.pipeline import load_arrays, make_dataset, split_size, steps_per_pass
    from kneetf.data.sources import copy_roi_detector
    from kneetf.models.kneenet import KneeNet
    from kneetf.training import checkpoint
    from kneetf.training.callbacks import (EpochSummaries, ImageSummary, LearningRateLogger, ResumableEarlyStopping,
                                           StopReason, TimeBudget, ValidationImageMetrics)
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

    cache = resolve_cache(data, work, prep, progress=verbose in ("auto", 1))
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
        from kneetf.training.prior import fit_key, fit_model_prior, iterate_split, load_fit, save_fit

        # a resumed run reuses its fit: at thousands of pairs fitting takes many minutes
        key = fit_key(cache, info, model_config, train_config)
        prior = None if options.fresh else load_fit(work / PRIOR_FIT_FILE, key)
        if prior is not None:
            log.info("kernel ridge prior: reusing the fit in %s", work / PRIOR_FIT_FILE)
        else:
            prior = fit_model_prior(iterate_split(cache, "train"), model_config, train_config, seed=train_config.seed)
            if chief:
                save_fit(prior, work / PRIOR_FIT_FILE, key)
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
    write_text_atomic(work / RUN_CONFIG_FILE, json.dumps(blob, indent=2), fault="train.config")
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
            state = checkpoint.restore(model, work / RUN_BACKUP_DIR, work / RUN_HISTORY_FILE)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    checkpoint.recover(work, state, model, history=work / RUN_HISTORY_FILE, model_file=work / RUN_MODEL_FILE,
                       tensorboard=out / "tensorboard" if chief else None,
                       outputs=[work / METRICS_FILE, work / SAMPLES_FILE])
    resumed = state is not None
    start = state.epoch if state else 0
    # a run that early stopping or the budget ended is finished; --resume trains it further
    stop = start if state and state.stopped and not options.resume else max(start, train_config.epochs)

    replicas = strategy.num_replicas_in_sync
    steps = steps_per_pass(cache, "train", train_config.batch_size, drop_remainder=replicas > 1)
    if not steps:
        raise ConfigError(f"the train split of {cache} ({n_train} pairs) is smaller than one global batch "
                          f"({train_config.batch_size}) over {replicas} replicas; use a smaller --batch-size")
    transform = None
    if prior is not None and train_config.prior_loo_targets:
        from kneetf.training.prior import offset_transform

        transform = offset_transform(prior, model_config.image_size)
    # one pass per epoch, each ordered and augmented by (seed, epoch): a resumed run sees the
    # batches an uninterrupted one would
    train_ds = make_dataset(cache, "train", train_config.batch_size, shuffle=True, seed=train_config.seed,
                            drop_remainder=replicas > 1, augment=train_config.augment,
                            shift=train_config.shift_augment, epochs=(start, stop), transform=transform)
    val_ds = make_dataset(cache, val_split, train_config.batch_size, drop_remainder=replicas > 1 and
                          split_size(cache, val_split) >= train_config.batch_size)
    sample = load_arrays(cache, val_split, limit=8)
    monitor = train_config.monitor
    if state is None and model_config.residual_template:
        # the untrained model predicts its template (the mean volume or the kernel ridge
        # prior): it is the model to beat on validation, kept unless an epoch does better
        logs = model.evaluate(val_ds, verbose=0, return_dict=True)
        untrained = float(logs[monitor.removeprefix("val_")])
        state = checkpoint.RunState(best={"epoch": -1, "value": untrained}, untrained=untrained)
        if chief:
            checkpoint.save_model(model, work / RUN_MODEL_FILE, fault="train.template")
        log.info("untrained model (its template alone): %s %.5g", monitor, untrained)
    callbacks: list[keras.callbacks.Callback] = [LearningRateLogger(), ValidationImageMetrics(val_ds),
                                                 keras.callbacks.TerminateOnNaN()]
    if train_config.ema_momentum:
        # first: validation, checkpoints and backups see the averaged weights, and a resumed
        # run swaps them back at the start of its next epoch
        callbacks.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    if chief:
        callbacks += [
            ImageSummary(str(out / "tensorboard" / "images"), sample["xray"], sample["mri"],
                         every=max(1, train_config.epochs // 10)),
            EpochSummaries(str(out / "tensorboard")),
        ]
    stoppers: dict[str, keras.callbacks.Callback] = {}
    if train_config.early_stopping_patience:
        stoppers["early_stopping"] = ResumableEarlyStopping(monitor=monitor, mode="min",
                                                            patience=train_config.early_stopping_patience)
    budget = time_budget(train_config, data)
    if budget:  # counted from the start of the run, data preparation included
        stoppers["time_budget"] = TimeBudget(budget, start=t0)
    reason = StopReason(stoppers)
    stateful = [cb for cb in stoppers.values() if hasattr(cb, "state_key")] + [reason]
    callbacks += list(stoppers.values()) + [reason]
    # last: commits the epoch once every other callback has logged it or stopped the run
    run_checkpoint = checkpoint.RunCheckpoint(work, state, backup=RUN_BACKUP_DIR, history=RUN_HISTORY_FILE,
                                              model_file=RUN_MODEL_FILE, stateful=stateful, monitor=monitor)
    callbacks.append(run_checkpoint)
    t1 = time.monotonic()
    if stop > start:
        model.fit(train_ds, validation_data=val_ds, initial_epoch=start, epochs=stop, steps_per_epoch=steps,
                  callbacks=callbacks, verbose=verbose, shuffle=False)  # the tf.data pipeline shuffles
    train_s = time.monotonic() - t1
    if not chief:
        return {"chief": False}

    best_path = out / RUN_MODEL_FILE
    if not best_path.exists():  # no epoch had a finite validation loss: keep the last weights
        checkpoint.save_model(model, best_path)
    from kneetf.models.kneenet import load_saved_model

    try:
        best = load_saved_model(best_path, compile=False)  # for its predictions only
    except (OSError, ValueError) as e:
        raise InputError(best_path, f"cannot be loaded ({e}); use --fresh to start the run over") from None
    if options.precision != "float32":  # serve and export in float32
        best = _as_float32(best)
        checkpoint.save_model(best, best_path)
    metrics = _validation_metrics(best, cache, val_split)
    final = run_checkpoint.state  # the last commit (of this process or of the run it resumed)
    best_epoch = final.best["epoch"] + 1 if final.best else None  # 0: no epoch beat the untrained model
    metrics.update(train_pairs=n_train, val_pairs=n_val, val_split=val_split, data_s=round(data_s, 1),
                   train_s=round(train_s, 1), total_s=round(time.monotonic() - t0, 1),
                   epochs_run=len(model.history.epoch) if stop > start and model.history else 0,
                   resumed=resumed, epochs_done=final.epoch, epochs=train_config.epochs,
                   best_epoch=best_epoch, stop_reason=reason.reason, time_budget_s=budget, monitor=monitor,
                   untrained_val=final.untrained)
    if prior is not None:
        metrics.update(prior_s=round(prior_s, 1), prior=prior.info)
    log.info("%s", stop_summary(metrics))
    write_text_atomic(out / METRICS_FILE, json.dumps(metrics, indent=2), fault="train.metrics")
    _write_samples(best, load_arrays(cache, val_split, limit=4), out / SAMPLES_FILE)
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
    viz.save_montage(path, arrays["xray"], arrays["mri"], pred, ids=arrays["id"], fault="train.samples")
