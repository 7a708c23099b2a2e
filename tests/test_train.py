"""`kneetf-train` end to end on a tiny cache, and the CLI's contract (help, errors)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kneetf.cli.main import main

from cache_factory import learnable_cache as make_cache


def test_help_lists_every_command_without_tensorflow() -> None:
    code = ("import sys; from kneetf.cli.main import main; rc = main(['--help']); "
            "assert 'tensorflow' not in sys.modules, 'TF imported'; sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    for command in ("train", "prepare", "evaluate", "predict", "export", "client", "synth", "import-oai"):
        assert command in res.stdout


def test_bad_arguments_get_a_message_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--preset", "papr"]) == 1
    err = capsys.readouterr().err
    assert "unknown preset 'papr'" in err and "Traceback" not in err
    assert main(["train", "--loss-weights", "1"]) == 1
    assert "--loss-weights takes two numbers" in capsys.readouterr().err
    assert main(["train", "--data", "nowhere.csv"]) == 1
    assert "nowhere.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "many"])
    assert e.value.code == 2
    assert main(["train", "--resume", "--out", "empty"]) == 1
    assert "no run to resume" in capsys.readouterr().err


@pytest.mark.slow
def test_train_writes_a_complete_run_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], recwarn) -> None:
    cache = make_cache(tmp_path / "cache")
    rc = main(["train", "--preset", "tiny", "--recipe", "paper", "--data", str(cache), "--epochs", "3",
               "--batch-size", "4", "--out", str(tmp_path / "run")])
    assert rc == 0
    # neither Keras' note that fit ignores shuffle=True nor that loading the best model skips its optimizer
    assert not [w for w in recwarn if "shuffle" in str(w.message) or "optimizer" in str(w.message)]
    run = tmp_path / "run"
    for name in ("model.keras", "config.json", "history.csv", "metrics.json", "samples.png"):
        assert (run / name).stat().st_size > 0, name
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))
    history = (run / "history.csv").read_text().splitlines()
    header = history[0].split(",")
    assert {"loss", "val_loss", "mri_loss", "xray_recon_loss", "lr_encdec", "lr_generator", "val_psnr",
            "val_ssim"} <= set(header)
    assert len(history) == 1 + 3
    row = dict(zip(header, history[1].split(",")))
    assert float(row["lr_encdec"]) == pytest.approx(1e-3) and float(row["lr_generator"]) == pytest.approx(1e-4)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val_pairs"] == 4 and metrics["train_pairs"] == 20
    assert np.isfinite(metrics["model"]["psnr"]["mean"]) and np.isfinite(metrics["mean_baseline"]["psnr"]["mean"])
    assert metrics["psnr_gain_db"] == pytest.approx(metrics["model"]["psnr"]["mean"]
                                                    - metrics["mean_baseline"]["psnr"]["mean"])
    # the validation PSNR / SSIM logged at the best epoch are those of the saved model
    rows = [dict(zip(header, line.split(","))) for line in history[1:]]
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert float(best["val_psnr"]) == pytest.approx(metrics["model"]["psnr"]["mean"], abs=1e-3)
    assert float(best["val_ssim"]) == pytest.approx(metrics["model"]["ssim_2d"]["mean"], abs=1e-3)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(run / "tensorboard" / "validation")).Reload().Tags()["tensors"]
    assert {"epoch_psnr", "epoch_ssim", "epoch_loss"} <= set(scalars)
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["encoder_filters"] == [2, 2, 4, 4, 8, 8]
    out = capsys.readouterr().out
    assert "gain over the mean volume" in out and "RESULT {" in out
