"""Keras callbacks of a training run: learning rates, validation PSNR / SSIM, per-epoch
scalars and image summaries in TensorBoard, a wall-clock budget, early stopping that a
resumed run continues where it stopped, and why the run stopped.

Callbacks whose decisions depend on earlier epochs keep that in a small JSON-safe state
(`state_key`, `get_state()`, `set_state(state)`), which `kneetf.training.checkpoint`
commits with every epoch and gives back to a resumed run.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kneetf import faults

log = logging.getLogger(__name__)


class LearningRateLogger(keras.callbacks.Callback):
    """Adds both learning rates to the epoch logs (so CSVLogger and TensorBoard record them)."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        opt = self.model.optimizer
        inner = getattr(opt, "inner_optimizer", opt)
        lr = float(keras.ops.convert_to_numpy(inner.learning_rate))
        logs["lr_encdec"] = lr
        logs["lr_generator"] = lr * float(getattr(inner, "generator_ratio", 1.0))


class ImageSummary(keras.callbacks.Callback):
    """Every `every` epochs, writes X-ray / true / predicted slice montages of a fixed batch
    to TensorBoard (`images/...`)."""

    def __init__(self, log_dir: str, xray: np.ndarray, mri: np.ndarray, every: int = 5, max_images: int = 3):
        super().__init__()
        self.writer = tf.summary.create_file_writer(log_dir)
        self.xray = xray[:max_images]
        self.mri = mri[:max_images]
        self.every = max(1, every)

    @staticmethod
    def _strip(vol: np.ndarray, slices: tuple[int, ...]) -> np.ndarray:
        # (N, H, W, S) -> (N, H, W * len(slices), 1): chosen slices side by side
        return np.concatenate([vol[..., s:s + 1] for s in slices], axis=2)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch % self.every and epoch != self.params.get("epochs", 0) - 1:
            return
        # a direct call, not predict(): under MultiWorkerMirroredStrategy predict() is a
        # collective, and this callback runs on the chief only
        pred = {k: keras.ops.convert_to_numpy(v) for k, v in self.model(self.xray, training=False).items()}
        n = self.mri.shape[-1]
        slices = (0, n // 4, n // 2, 3 * n // 4, n - 1)
        with self.writer.as_default():
            tf.summary.image("images/xray_and_recon", np.concatenate([self.xray, pred["xray_recon"]], axis=2),
                             step=epoch, max_outputs=len(self.xray))
            tf.summary.image("images/mri_true", self._strip(self.mri, slices), step=epoch, max_outputs=len(self.xray))
            tf.summary.image("images/mri_pred", np.clip(self._strip(pred["mri"], slices), 0, 1), step=epoch,
                             max_outputs=len(self.xray))
        self.writer.flush()


class StopReason(keras.callbacks.Callback):
    """Records why `fit` ended: the name of the first of `stoppers` (name -> callback) that set
    `model.stop_training`, "nan" for a NaN loss, else "epochs". Put it after the stoppers."""

    def __init__(self, stoppers: dict[str, keras.callbacks.Callback] | None = None):
        super().__init__()
        self.stoppers = dict(stoppers or {})
        self.reason = "epochs"

    state_key = "stop_reason"

    def get_state(self) -> dict[str, Any]:
        return {"reason": self.reason}

    def set_state(self, state: dict[str, Any]) -> None:
        self.reason = str(state.get("reason", "epochs"))

    def on_train_begin(self, logs: Any = None) -> None:
        self.reason = "epochs"

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            self.reason = "nan"

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if not self.model.stop_training or self.reason != "epochs":
            return
        for name, cb in self.stoppers.items():
            if getattr(cb, "stopped_epoch", 0) or getattr(cb, "stopped", False):
                self.reason = name
                return


class TimeBudget(keras.callbacks.Callback):
    """Stops training after the epoch during which `seconds` have passed since `start`
    (a `time.monotonic()` value; by default when training begins)."""

    def __init__(self, seconds: float, start: float | None = None):
        super().__init__()
        self.seconds = seconds
        self.start = start
        self.stopped = False

    def on_train_begin(self, logs: Any = None) -> None:
        if self.start is None:
            self.start = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        if self.seconds and time.monotonic() - self.start > self.seconds:
            log.info("time budget of %.0f s reached after epoch %d; stopping", self.seconds, epoch + 1)
            self.model.stop_training = True
            self.stopped = True


class ValidationImageMetrics(keras.callbacks.Callback):
    """Adds `val_psnr` and `val_ssim` to the epoch logs: PSNR and SSIM-2D of the MRI over the
    validation batches `dataset` (pairs `(xray, {"mri": ...})`), data range 1, mean over
    volumes, as `kneetf.metrics` defines them. One forward pass over the validation split per
    epoch, compiled once; training steps are not slowed."""

    def __init__(self, dataset: Any):
        super().__init__()
        self.dataset = dataset
        self._scores = None

    def _compile(self) -> Any:
        from kneetf.metrics import keras_psnr, keras_ssim_2d

        model = self.model

        @tf.function(reduce_retracing=True)
        def scores(x: tf.Tensor, mri: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            pred = tf.cast(model(x, training=False)["mri"], tf.float32)
            return keras_psnr(mri, pred), keras_ssim_2d(mri, pred)

        return scores

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        self._scores = self._scores or self._compile()
        psnr, ssim = [], []
        for x, y in self.dataset:
            p, s = self._scores(x, y["mri"])
            psnr.append(p.numpy())
            ssim.append(s.numpy())
        if psnr:
            logs["val_psnr"] = float(np.mean(np.concatenate(psnr)))
            logs["val_ssim"] = float(np.mean(np.concatenate(ssim)))


class EpochSummaries(keras.callbacks.Callback):
    """The epoch logs as TensorBoard scalars, named as `keras.callbacks.TensorBoard` names
    them (`epoch_<name>`; training values in `train/`, `val_*` values in `validation/`, step =
    epoch), flushed at the end of every epoch. Keras' own callback flushes every two minutes:
    a killed run would lose the summaries of epochs it has already committed."""

    def __init__(self, log_dir: str):
        super().__init__()
        self.log_dir = log_dir
        self.writers: dict[str, Any] = {}

    def on_train_begin(self, logs: Any = None) -> None:
        import os

        self.writers = {kind: tf.summary.create_file_writer(os.path.join(self.log_dir, kind))
                        for kind in ("train", "validation")}

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        faults.point("train.tensorboard.before", epoch)
        for name, value in (logs or {}).items():
            kind, tag = ("validation", name[4:]) if name.startswith("val_") else ("train", name)
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            with self.writers[kind].as_default():
                tf.summary.scalar(f"epoch_{tag}", value, step=epoch)
        for writer in self.writers.values():
            writer.flush()
        faults.point("train.tensorboard.after", epoch)

    def on_train_end(self, logs: Any = None) -> None:
        for writer in self.writers.values():
            writer.close()


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """`keras.callbacks.EarlyStopping` whose patience count survives a resumed run: its state
    (best value and epoch, epochs waited) is committed with every epoch."""

    state_key = "early_stopping"

    def get_state(self) -> dict[str, Any]:
        best = None if self.best is None else float(self.best)
        return {"wait": int(self.wait), "best": best, "best_epoch": int(self.best_epoch),
                "stopped_epoch": int(self.stopped_epoch)}

    def set_state(self, state: dict[str, Any]) -> None:
        self.wait = int(state.get("wait", 0))
        self.best = state.get("best")
        self.best_epoch = int(state.get("best_epoch", 0))
        self.stopped_epoch = int(state.get("stopped_epoch", 0))
