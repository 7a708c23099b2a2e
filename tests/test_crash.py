"""Crash consistency: `kneetf-train`, `prepare`, `predict` and `export` killed with SIGKILL at
each of their write points (`kneetf.faults`), then run again with the same command, end with
what an uninterrupted run writes; what a kill leaves in between is never half-written.

The point lists come from a reference run's trace, so a new write point is covered without
editing this file, and every registered point of each command must be reached.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from crash_harness import Reference, chain, choose, debris, read_trace, reference, scenarios
from kneetf import faults

# === Comparing run folders ===

VOLATILE = {"resumed", "epochs_run", "created"}  # per invocation, or a clock


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _stable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in VOLATILE and not k.endswith("_s")}


def _h5(blob: bytes) -> dict[str, np.ndarray]:
    import h5py

    out = {}
    with h5py.File(io.BytesIO(blob), "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _keras_file(path: Path) -> tuple[str, dict[str, np.ndarray]]:
    with zipfile.ZipFile(path) as z:
        return z.read("config.json").decode(), _h5(z.read("model.weights.h5"))


def _inert(name: str) -> bool:
    """A variable BatchNorm makes inert: the bias of a convolution (`.../conv*/vars/1`), which
    BatchNorm after it cancels, and the moving mean (`.../batch_normalization*/vars/2`) that
    follows that bias. The bias's gradient is rounding noise, which Adam scales up to steps of
    the learning rate's size, so two runs whose reductions round differently end with all of
    these apart by up to about the learning rate."""
    parts = name.split("/")
    return len(parts) >= 3 and parts[-2] == "vars" and (
        (parts[-1] == "1" and "conv" in parts[-3]) or (parts[-1] == "2" and "batch_normalization" in parts[-3]))


#: a resumed run's float variables against the uninterrupted run's: each element to within
#: `CLOSE` (rtol and atol), except one element or up to `STRAYS` of a variable's elements,
#: which may stray as far as `FAR`. A resumed run is not always bit-equal to the uninterrupted
#: one, even with one thread per op and TensorFlow's deterministic kernels: 2 of 16 runs each
#: killed once differed in the last bits, and the same kill repeated did not. Adam turns such
#: rounding noise in a gradient near zero into steps of up to the learning rate (1e-4 for the
#: generator, 1e-3 for the rest): 0.2 % of a generator kernel was seen up to 4.7e-5 apart.
#: A resume that trains anything else (an epoch twice or not at all, other batches, a lost
#: optimizer state) moves a large part of every kernel (11-100 % of it, one epoch of the tiny
#: model) by more than CLOSE.
CLOSE, STRAYS, FAR = 2e-5, 0.01, 1e-3


def _same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: other variables"
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if not np.issubdtype(x.dtype, np.floating):
            np.testing.assert_array_equal(x, y, err_msg=f"{what}: {k}")
            continue
        np.testing.assert_allclose(x, y, rtol=0, atol=FAR, err_msg=f"{what}: {k}")
        if _inert(k):  # rounding noise alone: all of it may stray
            continue
        strays = ~np.isclose(x, y, rtol=CLOSE, atol=CLOSE)
        assert strays.sum() <= max(1, STRAYS * strays.size), (
            f"{what}: {k}: {strays.sum()} of {strays.size} elements differ by more than {CLOSE} "
            f"(up to {np.abs(x - y).max():.3g})")


def _records(path: Path) -> list[bytes]:
    """The records of a TFRecord file (an event file), a last one cut short left out."""
    data, out, i = path.read_bytes(), [], 0
    while i + 12 <= len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        if i + 12 + n + 4 > len(data):
            break
        out.append(data[i + 12:i + 12 + n])
        i += 12 + n + 4
    return out


def summaries(tensorboard: Path) -> dict[tuple[str, str, int], list[np.ndarray]]:
    """(folder, tag, step) -> the decoded values of the summaries with that key in the event
    files under `tensorboard` (scalars as floats, images as pixel arrays)."""
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util

    found: dict[tuple[str, str, int], list[np.ndarray]] = {}
    for path in tensorboard.rglob("*tfevents*"):
        for record in _records(path):
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                array = tensor_util.make_ndarray(value.tensor) if value.HasField("tensor") else np.float32(
                    value.simple_value)
                if array.dtype == object:  # an image summary: width, height, then one PNG per image
                    array = np.stack([_png(blob) for blob in array.ravel()[2:]])
                key = (str(path.parent.relative_to(tensorboard)), value.tag, event.step)
                found.setdefault(key, []).append(np.asarray(array))
    return found


def _png(blob: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)


def _same_values(got: object, want: object, what: str) -> None:
    """Equal, floats up to rounding (reductions may round the last bit differently, so the
    same epochs give values a few ulps apart) and 8-bit pictures up to the pixels such a
    difference moves to another level of the grey scale or colour map."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{what}: other keys"
        for k in want:
            _same_values(got[k], want[k], f"{what}.{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{what}: other length"
        for i, (a, b) in enumerate(zip(got, want)):
            _same_values(a, b, f"{what}[{i}]")
    elif isinstance(want, np.ndarray) and want.dtype == np.uint8:
        assert isinstance(got, np.ndarray) and got.shape == want.shape, f"{what}: other shape"
        off = np.abs(got.astype(int) - want.astype(int)) > 1
        assert off.mean() <= 1e-3, f"{what}: {off.sum()} of {off.size} pixel values differ by more than one level"
    elif isinstance(want, (float, np.ndarray, np.floating)) and not isinstance(want, bool):
        np.testing.assert_allclose(np.asarray(got, float), np.asarray(want, float), rtol=1e-5, atol=1e-7,
                                   err_msg=what)
    else:
        assert got == want, f"{what}: {got!r} != {want!r}"


def _files(root: Path, skip: str = "tensorboard") -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and skip not in p.parts}


def same_run(ref: Path, run: Path) -> None:
    """`run` holds what the uninterrupted `ref` holds: the same files (TensorBoard events
    compared record by record), history, commit, weights, metrics and figures."""
    assert not debris(run), debris(run)
    assert _files(run) == _files(ref), (_files(run) ^ _files(ref))
    got, want = (list(csv.reader((p / "history.csv").open())) for p in (run, ref))
    assert got[0] == want[0] and len(got) == len(want), "history.csv: other columns or epochs"
    np.testing.assert_allclose(np.asarray(got[1:], dtype=float), np.asarray(want[1:], dtype=float), rtol=1e-5,
                               err_msg="history.csv")  # the same epochs' values, up to float rounding
    got, want = summaries(run / "tensorboard"), summaries(ref / "tensorboard")
    assert all(len(v) == 1 for v in got.values()), [k for k, v in got.items() if len(v) > 1]  # no step twice
    assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())  # records in one run only
    _same_values(got, want, "tensorboard")
    _same_values(_stable(_json(run / "metrics.json")), _stable(_json(ref / "metrics.json")), "metrics.json")
    assert _json(run / "config.json") == _json(ref / "config.json")
    _same_values(_json(run / "backup" / "training_metadata.json"), _json(ref / "backup" / "training_metadata.json"),
                 "training_metadata.json")
    for name in _files(ref / "backup"):
        if name.endswith(".h5"):
            _same_arrays(_h5((run / "backup" / name).read_bytes()), _h5((ref / "backup" / name).read_bytes()),
                         name)
    (config_a, weights_a), (config_b, weights_b) = _keras_file(run / "model.keras"), _keras_file(ref / "model.keras")
    assert config_a == config_b
    _same_arrays(weights_a, weights_b, "model.keras")
    _same_values(_png((run / "samples.png").read_bytes()), _png((ref / "samples.png").read_bytes()), "samples.png")


def _history_epochs(path: Path) -> list[int]:
    if not path.exists():
        return []
    with path.open() as f:
        return [int(r["epoch"]) for r in csv.DictReader(f)]


def run_is_consistent(run: Path) -> None:
    """What a kill may leave: history rows of committed epochs only, each once; a commit
    whose weights exist; a model.keras (if any) that is a whole file."""
    state_file = run / "backup" / "training_metadata.json"
    committed = 0
    if state_file.exists():
        state = _json(state_file)
        committed = state["epoch"]
        assert (run / "backup" / state["weights"]).exists()
        assert [r["epoch"] for r in state["history"]] == list(range(committed))
    epochs = _history_epochs(run / "history.csv")
    assert epochs == list(range(len(epochs))) and len(epochs) in (committed, committed - 1), (epochs, committed)
    if (run / "model.keras").exists():
        with zipfile.ZipFile(run / "model.keras") as z:
            assert z.testzip() is None
    for name in ("metrics.json", "config.json"):
        if (run / name).exists():
            _json(run / name)


def points_of(command: str) -> set[str]:
    return {p for p in faults.POINTS if p.startswith(command + ".")}


# === Training ===

EPOCHS = 4


@pytest.fixture(scope="module")
def train_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 training and 2 validation pairs the tiny model learns from: the validation loss
    improves in some epochs and not in others."""
    from cache_factory import learnable_cache as make_cache

    return make_cache(tmp_path_factory.mktemp("crash") / "cache", n=12)


def train_args(cache: Path) -> list[str]:
    # the mean recipe: on 10 pairs some epochs beat its template and some do not, so every write
    # point is reached (the default recipe's kernel ridge template is rarely beaten on so few)
    return ["train", "--preset", "tiny", "--recipe", "mean", "--data", str(cache), "--epochs", str(EPOCHS),
            "--batch-size", "4", "--budget", "0", "--out", "run", "--no-progress"]


@pytest.fixture(scope="module")
def train_reference(train_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return reference(train_args(train_cache), lambda root: None, tmp_path_factory.mktemp("crash") / "work")


@pytest.mark.slow
def test_train_killed_at_every_write_point_ends_as_an_uninterrupted_run(train_cache: Path, train_reference: Reference,
                                                                       tmp_path: Path) -> None:
    ref = train_reference.root / "run"
    trace = train_reference.trace
    val = [float(r["val_loss"]) for r in csv.DictReader((ref / "history.csv").open())]
    improved = sum(v < min(val[:i], default=np.inf) for i, v in enumerate(val))
    assert 1 < improved < EPOCHS, val  # the best model is saved at some epochs, not all
    assert Counter(trace)["train.best.after"] == improved
    # each point in the order a run reaches it; the repairs of a resumed run come after a commit
    order = list(dict.fromkeys(trace))
    recover = sorted(points_of("train.recover"))
    targets = order[:order.index("train.backup.after") + 1] + recover + order[order.index("train.backup.after") + 1:]
    # the prior's points belong to the default recipe: test_default_run_killed_at_its_prior_fit
    expected = points_of("train") - points_of("train.prior") | {"train.step"}
    assert set(targets) == expected, set(targets) ^ expected
    shutil.rmtree(train_reference.root.with_name("work"), ignore_errors=True)  # what a failed test left
    outcome = chain(train_args(train_cache), lambda root: None, targets, train_reference.root.with_name("work"),
                    same=lambda root: same_run(ref, root / "run"), invariant=lambda root: run_is_consistent(root / "run"))
    assert outcome.killed == targets


@pytest.mark.slow
def test_weights_one_epoch_apart_are_not_the_same_run(train_reference: Reference) -> None:
    """The comparison of weights tells a run that trained one epoch (3 steps) more or less,
    even in the generator, whose steps (learning rate 1e-4) stay within `FAR`."""
    from kneetf.training.checkpoint import weights_name

    backup = train_reference.root / "run" / "backup"
    last, before = ({k: v for k, v in _h5((backup / weights_name(e)).read_bytes()).items() if "conv3d_transpose" in k}
                    for e in (EPOCHS, EPOCHS - 1))
    assert last
    _same_arrays(last, last, "the same weights")
    with pytest.raises(AssertionError, match="elements differ by more than"):
        _same_arrays(last, before, "one epoch apart")


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(points_of("train.prior")))
def test_default_run_killed_at_its_prior_fit_resumes_and_fits_it_at_most_again(train_cache: Path, tmp_path: Path,
                                                                              target: str) -> None:
    """Killed before the fitted prior is renamed into place, the next run fits it again;
    killed after, the next run reuses it. Either way the run ends whole."""
    from crash_harness import kneetf

    args = train_args(train_cache)
    args[args.index("--recipe") + 1] = "default"
    args[args.index("--epochs") + 1] = "1"
    work, log, trace = tmp_path / "work", tmp_path / "log", tmp_path / "trace"
    work.mkdir()
    assert kneetf(args, cwd=work, log=log, fault=target) == -9
    assert (work / "run" / "prior_fit.npz").exists() == target.endswith(".after")
    assert kneetf(args, cwd=work, log=log, trace=trace) == 0, log.read_text()[-3000:]
    fits = Counter(read_trace(trace))["train.prior.after"]
    assert fits == (0 if target.endswith(".after") else 1)
    assert _json(work / "run" / "metrics.json")["epochs_done"] == 1
    run_is_consistent(work / "run")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["train.backup.after:2", "train.step:5"])
def test_train_killed_once_redoes_at_most_the_interrupted_epoch(train_cache: Path, train_reference: Reference,
                                                               tmp_path: Path, target: str) -> None:
    """The common cases: killed after an epoch is committed (the next run trains none of it
    again) and mid-epoch (the next run trains that epoch again, once)."""
    from crash_harness import kneetf

    ref = train_reference.root / "run"
    work = train_reference.root.with_name("work")
    shutil.rmtree(work, ignore_errors=True)  # what a failed test left
    work.mkdir()
    log = tmp_path / "log"
    assert kneetf(train_args(train_cache), cwd=work, log=log, fault=target) == -9
    committed = _json(work / "run" / "backup" / "training_metadata.json")["epoch"]
    trace = tmp_path / "trace"
    assert kneetf(train_args(train_cache), cwd=work, log=log, trace=trace) == 0
    trained = Counter(read_trace(trace))["train.backup.after"]
    assert trained == EPOCHS - committed
    assert _json(work / "run" / "metrics.json")["epochs_run"] == trained
    same_run(ref, work / "run")
    shutil.rmtree(work)


# === prepare ===

def _prepare_inputs(root: Path) -> None:
    """Five .npy pairs (one X-ray missing) and their ROI boxes."""
    rng = np.random.default_rng(0)
    rows, boxes = ["id,xray,mri,split"], ["id,x0,y0,x1,y1"]
    for i in range(5):
        np.save(root / f"x{i}.npy", rng.random((60, 60), dtype=np.float32) * 1000)
        np.save(root / f"m{i}.npy", rng.random((40, 32, 32), dtype=np.float32) * 100)
        rows.append(f"k{i},x{i}.npy,m{i}.npy,{'val' if i == 4 else 'train'}")
        boxes.append(f"k{i},5,5,55,55")
    (root / "x2.npy").unlink()
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    (root / "boxes.csv").write_text("\n".join(boxes) + "\n")
    for p in root.iterdir():  # shard fingerprints hold the inputs' size and mtime: alike in every run
        os.utime(p, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))


PREPARE = ["prepare", "manifest.csv", "--out", "cache", "--workers", "0", "--shard-size", "2", "--rois", "boxes.csv",
           "--no-progress"]


def _shard_records(path: Path) -> int:
    return len(_records(path))


def cache_is_consistent(cache: Path) -> None:
    """What a kill may leave: a shard with a sidecar holds the records the sidecar counts; a
    dataset.json counts and lists complete shards only."""
    if not cache.exists():
        return
    for side in (p for p in cache.glob("*.tfrecord.json") if not p.name.startswith(".tmp-")):
        shard = cache / side.name[:-len(".json")]
        assert shard.exists() and _shard_records(shard) == _json(side)["count"], side.name
    if (cache / "dataset.json").exists():
        info = _json(cache / "dataset.json")
        for split, names in info["shards"].items():
            assert sum(_json(cache / f"{n}.json")["count"] for n in names) == info["counts"][split]


def same_cache(ref: Path, cache: Path) -> None:
    assert not debris(cache), debris(cache)
    assert _files(cache) == _files(ref)
    assert _stable(_json(cache / "dataset.json")) == _stable(_json(ref / "dataset.json"))
    for name in _files(ref):
        if name != "dataset.json":
            assert (cache / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.mark.slow
def test_prepare_killed_at_every_write_point_finishes_the_rest_only(tmp_path: Path) -> None:
    from crash_harness import kneetf

    ref = reference(PREPARE, _prepare_inputs, tmp_path / "work", ok=4)  # one pair fails: exit 4
    assert set(ref.trace) == points_of("prepare") | {"write.before", "write.after"}
    root = tmp_path / "work"
    for target in choose(ref.events):
        root.mkdir()
        _prepare_inputs(root)
        log = tmp_path / f"{target}.log"
        assert kneetf(PREPARE, cwd=root, log=log, fault=target) == -9, target
        cache_is_consistent(root / "cache")
        # shards complete before the kill are kept as they are
        done = {p.name: p.stat().st_mtime_ns for p in (root / "cache").glob("[!.]*.tfrecord")
                if (root / "cache" / f"{p.name}.json").exists()}
        trace = tmp_path / f"{target}.trace"
        assert kneetf(PREPARE, cwd=root, log=log, trace=trace) == 4, target
        assert {n: (root / "cache" / n).stat().st_mtime_ns for n in done} == done, target
        assert Counter(read_trace(trace))["prepare.shard.after"] == 3 - len(done), target
        try:
            same_cache(ref.root / "cache", root / "cache")
        except AssertionError as e:
            raise AssertionError(f"after a kill at {target}: {e}") from None
        shutil.rmtree(root)


# === predict ===

@pytest.fixture(scope="module")
def predict_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kneetf.models.kneenet import KneeNet

    run = tmp_path_factory.mktemp("crash") / "model"
    run.mkdir()
    KneeNet.from_preset("tiny").save(run / "model.keras")
    return run


def _predict_inputs(root: Path) -> None:
    """Two X-rays, a broken one, and their ROI boxes (ids a, b, c)."""
    from kneetf.io.writers import write_png

    rng = np.random.default_rng(1)
    (root / "in").mkdir()
    for name in ("a", "b"):
        write_png(root / "in" / f"{name}.png", (rng.random((90, 90)) * 4000).astype("uint16"))
    (root / "in" / "c.png").write_bytes(b"not a png")
    (root / "in" / "boxes.csv").write_text("id,x0,y0,x1,y1\n" + "".join(f"{n},5,5,85,85\n" for n in "abc"))


def predict_args(model: Path) -> list[str]:
    return ["predict", "--model", str(model), "in", "--out", "out", "--format", "nifti,dicom",
            "--rois", "in/boxes.csv", "--names", "id", "--no-progress"]


def _nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj)


def _series(folder: Path) -> list[tuple]:
    import pydicom

    out = []
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        out.append((f.name, tuple(ds.ImagePositionPatient), ds.InstanceNumber, ds.pixel_array.tobytes()))
    return out


def outputs_are_consistent(out: Path) -> None:
    """What a kill may leave: every row of predictions.csv has all its files, whole; no file
    or series is there half-written."""
    if not (out / "predictions.csv").exists():
        return
    listed = [r["id"] for r in csv.DictReader((out / "predictions.csv").open())]
    for i in listed:
        for name in (f"{i}.nii.gz", f"{i}_dicom"):
            assert (out / name).exists(), name
    for path in out.glob("*.nii.gz"):
        assert _nifti(path).shape == (20, 128, 128), path.name
    for folder in out.glob("*_dicom"):
        assert len(_series(folder)) == 20, folder.name


def same_outputs(ref: Path, out: Path) -> None:
    assert not debris(out), debris(out)
    assert _files(out) == _files(ref)
    for name in ("predictions.csv", "errors.csv"):
        assert (out / name).read_text() == (ref / name).read_text(), name
    for name in _files(ref):
        if name.endswith(".nii.gz"):
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    for folder in ref.glob("*_dicom"):
        assert _series(out / folder.name) == _series(folder)  # new UIDs each run; pixels and geometry equal


@pytest.mark.slow
def test_predict_killed_at_every_write_point_lists_only_finished_outputs(predict_model: Path, tmp_path: Path) -> None:
    args = predict_args(predict_model)
    ref = reference(args, _predict_inputs, tmp_path / "work", ok=4)  # c.png fails: exit 4
    assert set(ref.trace) == points_of("predict") | {"write.before", "write.after"}
    rows = [r["id"] for r in csv.DictReader((ref.root / "out" / "predictions.csv").open())]
    assert rows == ["a", "b"]
    # each kind of write once, in the second reconstruction (after the first one's row)
    targets = choose(ref.events, kind=lambda name, path: (name, Path(path).name.lstrip("ab")))
    assert len(targets) == 14, targets  # with the output folder's marker and the table tidied at the end
    outcome = scenarios(args, _predict_inputs, targets, tmp_path / "work", ok=4,
                        same=lambda root: same_outputs(ref.root / "out", root / "out"),
                        invariant=lambda root: outputs_are_consistent(root / "out"))
    assert outcome.killed == targets


# === export ===

def export_args(model: Path, *extra: str) -> list[str]:
    return ["export", str(model / "model.keras"), "--out", "models/kneetf", "--no-progress", *extra]


def version_is_whole_or_absent(base: Path) -> None:
    for version in (p for p in base.iterdir() if p.name.isdigit()) if base.exists() else []:
        assert (version / "saved_model.pb").exists() and (version / "kneetf_export.json").exists(), version
        assert (version / "variables").is_dir() and (version / "assets.extra").is_dir(), version


def same_export(ref: Path, base: Path) -> None:
    assert not debris(base), debris(base)
    assert _files(base) == _files(ref)
    for name in _files(ref):
        if name.endswith("kneetf_export.json"):
            assert _stable(_json(base / name)) == _stable(_json(ref / name))


@pytest.mark.slow
@pytest.mark.parametrize("overwrite", [False, True])
def test_export_version_appears_whole_or_not_at_all(predict_model: Path, tmp_path: Path, overwrite: bool) -> None:
    extra = ("--version", "1", "--overwrite") if overwrite else ()
    args = export_args(predict_model, *extra)

    def setup(root: Path) -> None:
        if overwrite:  # an older version 1 to replace: a model with other weights
            old = root / "models" / "kneetf" / "1"
            old.mkdir(parents=True)
            (old / "saved_model.pb").write_bytes(b"old")
            (old / "kneetf_export.json").write_text("{}")
            (old / "variables").mkdir()
            (old / "assets.extra").mkdir()

    ref = reference(args, setup, tmp_path / "work")
    assert set(ref.trace) == points_of("export")
    targets = choose(ref.events)
    outcome = scenarios(args, setup, targets, tmp_path / "work", same=lambda root: same_export(ref.root / "models", root / "models"),
                        invariant=lambda root: version_is_whole_or_absent(root / "models" / "kneetf"))
    assert outcome.killed == targets
