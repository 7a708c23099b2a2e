"""Why a run stops: epochs, early stopping, the demo's time budget; and the summary line."""
from __future__ import annotations

import keras
import numpy as np
import pytest

from kneetf.config import TrainConfig
from kneetf.errors import ConfigError
from kneetf.training.callbacks import StopReason, TimeBudget
from kneetf.training.train import DataSpec, stop_summary, time_budget


def _fit(callbacks, epochs: int = 6, lr: float = 0.05):
    """A one-weight regression whose validation target disagrees with training after a
    couple of epochs (so the validation loss rises while the training loss falls)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(lr), "mse")
    x = np.linspace(-1, 1, 32)[:, None].astype("float32")
    history = model.fit(x, 3 * x, validation_data=(x, 0.5 * x), epochs=epochs, batch_size=8, verbose=0,
                        callbacks=callbacks)
    return history


def test_stop_reasons():
    reason = StopReason()
    assert len(_fit([reason]).epoch) == 6 and reason.reason == "epochs"
    early = keras.callbacks.EarlyStopping(patience=1)
    reason = StopReason({"early_stopping": early})
    epochs = len(_fit([early, reason], epochs=30).epoch)
    assert reason.reason == "early_stopping" and epochs < 30
    budget = TimeBudget(1e-9)
    reason = StopReason({"time_budget": budget})
    assert len(_fit([budget, reason]).epoch) == 1 and reason.reason == "time_budget"
    reason = StopReason()
    _fit([keras.callbacks.TerminateOnNaN(), reason], lr=1e30)
    assert reason.reason == "nan"


def test_the_demo_budget_never_cuts_a_users_run():
    cfg = TrainConfig(demo_time_budget_s=500.0)
    assert time_budget(cfg, DataSpec(path=None)) == 500.0
    assert time_budget(cfg, DataSpec(path="cache")) == 0.0
    assert time_budget(TrainConfig(time_budget_s=60.0, demo_time_budget_s=500.0), DataSpec(path="cache")) == 60.0
    with pytest.raises(ConfigError, match="demo_time_budget_s"):
        TrainConfig(demo_time_budget_s=-1)


def test_stop_summary_says_why():
    line = stop_summary({"epochs_done": 23, "epochs": 80, "stop_reason": "early_stopping", "best_epoch": 13})
    assert "early stop at epoch 23 of 80" in line and "best epoch 13" in line
    line = stop_summary({"epochs_done": 31, "epochs": 40, "stop_reason": "time_budget", "time_budget_s": 500,
                         "best_epoch": 31})
    assert "time budget of 500 s reached at epoch 31 of 40" in line
    assert "all 40 epochs done" in stop_summary({"epochs_done": 40, "epochs": 40, "stop_reason": "epochs"})
