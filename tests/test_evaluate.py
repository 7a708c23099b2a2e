"""Baselines and `kneetf evaluate` on a tiny cache with a tiny model."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from kneetf import baselines as B
from kneetf import metrics as M
from kneetf.data.cache import CacheTask, build_cache

from cache_factory import DISC_SLICES as SLICES, load_disc_pair as load_pair

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    tasks = [CacheTask(f"k{i:03d}", "train", i) for i in range(12)]
    tasks += [CacheTask(f"k{i:03d}", "test", i) for i in range(100, 104)]
    build_cache(tasks, load_pair, out, workers=0, progress=False)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, cache):
    from kneetf.data.cache import read_info
    from kneetf.models.kneenet import KneeNet

    run = tmp_path_factory.mktemp("run")
    model = KneeNet.from_preset("tiny")
    model.save(run / "model.keras")
    (run / "config.json").write_text(json.dumps({"preprocess": read_info(cache)["preprocess"]}))
    (run / "history.csv").write_text("epoch,loss,mri_loss,val_loss,val_mri_loss,xray_recon_loss,"
                                     "val_xray_recon_loss,learning_rate\n"
                                     "0,0.5,0.3,0.6,0.35,0.2,0.25,0.001\n1,0.3,0.2,0.4,0.25,0.1,0.15,0.001\n")
    return run


# === baselines ===

def _arrays(n: int, seed: int, ids_prefix: str = "t") -> dict:
    rng = np.random.default_rng(seed)
    return {"id": [f"{ids_prefix}{i}" for i in range(n)],
            "xray": rng.random((n, 16, 16, 1)).astype("float32"),
            "mri": rng.random((n, 16, 16, 4)).astype("float32")}


def test_nn_baseline_is_exactly_right_when_the_xray_was_seen():
    train = _arrays(10, 0)
    order = [7, 2, 9]
    evald = {"id": ["e0", "e1", "e2"], "xray": train["xray"][order] + 1e-4}
    preds = B.baseline_predictions(train, evald, k=3, downsample=2)
    np.testing.assert_array_equal(preds["nn"], train["mri"][order])
    np.testing.assert_allclose(preds["mean"], np.broadcast_to(train["mri"].mean(0), (3, 16, 16, 4)), atol=1e-6)
    assert M.psnr(train["mri"][order], preds["nn"]) == float("inf")


def test_knn_average_matches_brute_force():
    train, evald = _arrays(15, 1), _arrays(4, 2, "e")
    preds = B.baseline_predictions(train, evald, k=5, downsample=4)
    f_tr = train["xray"].reshape(15, 4, 4, 4, 4, 1).mean(axis=(2, 4)).reshape(15, -1)
    f_ev = evald["xray"].reshape(4, 4, 4, 4, 4, 1).mean(axis=(2, 4)).reshape(4, -1)
    for i in range(4):
        nearest = np.argsort(((f_tr - f_ev[i]) ** 2).sum(1))[:5]
        np.testing.assert_allclose(preds["knn5"][i], train["mri"][nearest].mean(0), atol=1e-6)
        np.testing.assert_array_equal(preds["nn"][i], train["mri"][nearest[0]])


def test_same_id_is_never_its_own_neighbour_and_streaming_matches():
    train = _arrays(8, 3)
    preds = B.baseline_predictions(train, train, k=2, downsample=1)
    for i in range(8):
        assert not np.array_equal(preds["nn"][i], train["mri"][i])
    batches = [{k: v[s:s + 3] for k, v in train.items()} for s in range(0, 8, 3)]
    streamed = B.streamed_baseline_predictions(lambda: batches, train["xray"], train["id"], k=2, downsample=1)
    np.testing.assert_allclose(streamed["knn2"], preds["knn2"], atol=1e-6)
    np.testing.assert_array_equal(streamed["nn"], preds["nn"])


def test_k_is_lowered_for_a_tiny_training_set(caplog):
    train, evald = _arrays(3, 4), _arrays(2, 5, "e")
    preds = B.baseline_predictions(train, evald, k=5, downsample=1)
    assert "knn3" in preds and "knn5" not in preds
    np.testing.assert_allclose(preds["knn3"][0], train["mri"].mean(0), atol=1e-6)


# === evaluate ===

def _snapshot(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.slow
def test_evaluate_writes_a_sane_report(tmp_path, cache, run_dir, capsys):
    from kneetf.cli.main import main
    from kneetf.data.pipeline import load_arrays
    from kneetf.inference.loading import load_model

    before_cache, before_run, before_tmp = _snapshot(cache), _snapshot(run_dir), _snapshot(tmp_path)
    out = tmp_path / "report"
    assert main(["evaluate", "--model", str(run_dir), "--data", str(cache), "--out", str(out),
                 "--knn", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for label in ("model", "mean baseline", "NN baseline", "3-NN baseline", "PSNR (dB)", "SSIM-2D", "±"):
        assert label in printed
    assert "does NOT beat" in printed  # an untrained model loses to the NN baseline

    expected = {"per_subject.csv", "summary.json", "montage_best.png", "montage_median.png",
                "montage_worst.png", "slice_psnr.png", "learning_curves.png"}
    assert {p.name for p in out.iterdir()} == expected
    for name in expected - {"per_subject.csv", "summary.json"}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _snapshot(cache) == before_cache and _snapshot(run_dir) == before_run
    after_tmp = _snapshot(tmp_path)  # the working folder and HOME (conftest) are here too
    assert {p for p in after_tmp if after_tmp[p] != before_tmp.get(p) and out not in p.parents} == {out}

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_subjects"] == 4 and summary["n_baseline_subjects"] == 12
    assert set(summary["methods"]) == {"model", "mean", "nn", "knn3", "knn_cv", "krr_linear", "krr_rbf"}
    assert summary["gain_over_best_baseline"]["psnr"]["gain"] < 0
    assert "alpha" in summary["baselines"]["krr_rbf"]["best"]
    assert summary["beats"]["nn"]["psnr"] is False
    assert len(summary["per_slice_psnr"]["model"]["mean"]) == SLICES

    # every number recomputed independently from the cache and the model
    test = load_arrays(cache, "test")
    train = load_arrays(cache, "train")
    pred = load_model(run_dir).predict(test["xray"], verbose=0)["mri"]
    rows = {r["id"]: r for r in csv.DictReader((out / "per_subject.csv").open())}
    mean_vol = train["mri"].mean(0)
    for i, sid in enumerate(test["id"]):
        assert float(rows[sid]["model_psnr"]) == pytest.approx(M.psnr(test["mri"][i], pred[i]), abs=1e-3)
        assert float(rows[sid]["model_ssim_2d"]) == pytest.approx(M.ssim_2d(test["mri"][i], pred[i]), abs=1e-4)
        assert float(rows[sid]["mean_psnr"]) == pytest.approx(M.psnr(test["mri"][i], mean_vol), abs=1e-3)
    psnrs = [float(rows[s]["model_psnr"]) for s in test["id"]]
    assert summary["subjects"]["best"] == test["id"][int(np.argmax(psnrs))]
    assert summary["subjects"]["worst"] == test["id"][int(np.argmin(psnrs))]
    assert summary["methods"]["model"]["psnr"]["mean"] == pytest.approx(np.mean(psnrs), abs=1e-3)
    # the retrieval baseline learns something from this data: it beats the mean volume
    assert summary["methods"]["nn"]["psnr"]["mean"] > summary["methods"]["mean"]["psnr"]["mean"]


def test_evaluate_in_memory_model_without_out_dir(tmp_path, cache):
    from kneetf.evaluate import evaluate, format_table
    from kneetf.models.kneenet import KneeNet

    result = evaluate(KneeNet.from_preset("tiny"), cache, "test", None, k=1, limit=2, progress=False, strong=False)
    assert result["n_subjects"] == 2 and set(result["methods"]) == {"model", "mean", "nn"}
    assert len(result["per_subject"]) == 2
    assert "NN baseline" in format_table(result)
    assert [p.name for p in tmp_path.rglob("*")] == ["home"]


def test_evaluate_refuses_missing_split(tmp_path, cache, run_dir):
    from kneetf.errors import InputError
    from kneetf.evaluate import evaluate

    with pytest.raises(InputError, match="'val'"):
        evaluate(run_dir, cache, "val", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_evaluate_refuses_a_cache_of_other_slices_and_warns_on_other_percentiles(tmp_path, cache, run_dir,
                                                                                caplog):
    """A model trained on slices [20, 40) scored against slices [10, 30) is another task (it gave
    10.97 dB against the baselines' 15.5 without a word but a warning); other percentiles only warn."""
    from kneetf.data.cache import read_info
    from kneetf.errors import InputError
    from kneetf.evaluate import evaluate

    prep = read_info(cache)["preprocess"]
    for changes, refused in (({"slice_start": prep["slice_start"] + 10}, True), ({"mirror_left": True}, True),
                             ({"high_percentile": 99.0}, False)):
        run = tmp_path / f"run{len(changes)}{refused}{next(iter(changes))}"
        shutil.copytree(run_dir, run)
        (run / "config.json").write_text(json.dumps({"preprocess": {**prep, **changes}}))
        caplog.clear()
        if refused:
            field = next(iter(changes))
            with pytest.raises(InputError, match=f"trained on pairs prepared with {field} "):
                evaluate(run, cache, "test", tmp_path / "out", progress=False)
        else:
            with caplog.at_level("WARNING"):
                evaluate(run, cache, "test", None, progress=False)
            assert "high_percentile 99.0 (cache: 99.5)" in caplog.text


def test_evaluate_volumes_are_this_runs_and_a_bad_out_is_refused_first(tmp_path, cache, run_dir, monkeypatch):
    """A rerun with --limit left the earlier run's volumes in volumes/, and a run without
    --save-volumes listed that folder; an --out that is a file failed after all the work."""
    import kneetf.evaluate as E
    from kneetf.errors import ConfigError

    out = tmp_path / "report"
    common = dict(baseline_split="train", progress=False, log_verdict=False, strong=False)
    E.evaluate(run_dir, cache, "test", out, save_volumes=True, **common)
    assert len(list((out / "volumes").glob("*.nii.gz"))) == 4
    (out / "volumes" / "notes.txt").write_text("mine")
    (out / "volumes" / "truth.nii.gz").write_bytes(b"mine too")  # no subject of the report: stays
    result = E.evaluate(run_dir, cache, "test", out, save_volumes=True, limit=1, **common)
    assert sorted(p.name for p in (out / "volumes").glob("*.nii.gz")) == \
        [f"{result['per_subject'][0]['id']}.nii.gz", "truth.nii.gz"]
    assert (out / "volumes" / "notes.txt").read_text() == "mine"
    result = E.evaluate(run_dir, cache, "test", out, limit=1, **common)
    assert "volumes/" not in result["files"]
    assert "volumes/" not in json.loads((out / "summary.json").read_text())["files"]

    monkeypatch.setattr(E.B, "fit_baselines", lambda *a, **k: pytest.fail("work began before --out was checked"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="afile exists and is not a folder"):
        E.evaluate(run_dir, cache, "test", tmp_path / "afile", **common)
    with pytest.raises(ConfigError, match=r"--out .*afile/sub: .*afile is a file, not a folder"):
        E.evaluate(run_dir, cache, "test", tmp_path / "afile" / "sub", **common)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "volumes").write_text("x")
    with pytest.raises(ConfigError, match=r"--save-volumes folder .*volumes exists and is not a folder"):
        E.evaluate(run_dir, cache, "test", tmp_path / "other", save_volumes=True, **common)
