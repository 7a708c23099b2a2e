"""Cache builder and tf.data pipeline: round trip, shards, resume, bad inputs, config hash."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cache_factory import load_or_die
from kneetf.config import PreprocessConfig
from kneetf.data.cache import CacheTask, RawPair, build_cache, read_info
from kneetf.data.pipeline import load_arrays, make_dataset
from kneetf.errors import InputError, KneetfError


def load_pair(payload: dict, config: PreprocessConfig) -> RawPair:
    """A structured pair: a gradient X-ray whose slope sets the MRI's bright band."""
    if payload.get("bad") == "missing":
        raise InputError(payload["file"], "file not found")
    rng = np.random.default_rng(payload["i"])
    h = 96 + payload["i"]
    xray = np.outer(np.linspace(0, 1, h), np.ones(80)) * (100 + payload["i"]) + rng.random((h, 80))
    mri = rng.random((config.num_slices, 150, 140)).astype("float32") * 50
    mri[:, 40 + payload["i"]:60 + payload["i"], :] += 500
    if payload.get("bad") == "nan":
        mri[0, 0, 0] = np.nan
    return RawPair(id="ignored", xray=xray, mri=mri, side="left" if payload["i"] % 2 else "right",
                   box=(1.0, 2.0, 3.0, 4.0))


def _tasks(n: int, bad: dict[int, str] | None = None) -> list[CacheTask]:
    bad = bad or {}
    splits = ["train"] * (n - 2) + ["val", "test"]
    return [CacheTask(id=f"case{i}", split=splits[i], payload={"i": i, "bad": bad.get(i), "file": f"f{i}.dcm"},
                      source=f"f{i}.dcm") for i in range(n)]


def test_round_trip_matches_preprocessing(tmp_path: Path) -> None:
    from kneetf.data.cache import preprocess_pair

    cfg = PreprocessConfig()
    res = build_cache(_tasks(6), load_pair, tmp_path / "c", cfg, shard_size=2, workers=0, progress=False)
    assert res.counts == {"train": 4, "val": 1, "test": 1} and not res.errors
    info = read_info(tmp_path / "c")
    assert info["shapes"]["mri"] == [128, 128, 20] and len(info["shards"]["train"]) == 2
    arrays = load_arrays(tmp_path / "c", "train")
    assert arrays["id"] == ["case0", "case1", "case2", "case3"]
    expected = preprocess_pair(load_pair({"i": 2}, cfg), cfg)
    np.testing.assert_allclose(arrays["mri"][2], expected.mri, atol=1 / 65535)
    np.testing.assert_allclose(arrays["xray"][2], expected.xray, atol=1 / 65535)
    # robust normalisation: 0.5th percentile -> 0, 99.5th -> 1, clipped
    assert arrays["mri"].min() == 0.0 and arrays["mri"].max() == 1.0
    for x, y in make_dataset(tmp_path / "c", "train", batch_size=3):
        assert x.shape[1:] == (128, 128, 1) and y["mri"].shape[1:] == (128, 128, 20)
        np.testing.assert_array_equal(x.numpy(), y["xray_recon"].numpy())
        break


def test_bad_inputs_are_skipped_and_reported(tmp_path: Path) -> None:
    res = build_cache(_tasks(6, {1: "missing", 3: "nan"}), load_pair, tmp_path / "c", shard_size=4, workers=0,
                      progress=False)
    assert res.counts["train"] == 2
    reasons = {e["id"]: e for e in res.errors}
    assert reasons["case1"]["file"] == "f1.dcm" and "not found" in reasons["case1"]["reason"]
    assert "NaN" in reasons["case3"]["reason"] and reasons["case3"]["file"] == "f3.dcm"
    text = (tmp_path / "c" / "errors.csv").read_text()
    assert text.splitlines()[0] == "id,file,reason" and "case1" in text and "case3" in text


def test_resume_skips_finished_shards_and_leaves_no_partial(tmp_path: Path) -> None:
    out = tmp_path / "c"
    build_cache(_tasks(6), load_pair, out, shard_size=2, workers=0, progress=False)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecord")}
    # simulate a run killed while writing: one shard and its sidecar gone, debris left
    victim = sorted(first)[0]
    (out / victim).unlink()
    (out / f".tmp-{victim}-x.tfrecord").write_bytes(b"half")
    res = build_cache(_tasks(6), load_pair, out, shard_size=2, workers=0, progress=False)
    assert res.skipped_shards == len(first) - 1 and res.total == 6
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tfrecord")}
    assert set(again) == set(first)  # the debris is gone too
    assert all(again[k] == first[k] for k in first if k != victim)
    assert load_arrays(out, "train")["id"] == ["case0", "case1", "case2", "case3"]


def test_resume_rebuilds_a_truncated_shard(tmp_path: Path) -> None:
    out = tmp_path / "c"
    build_cache(_tasks(6), load_pair, out, shard_size=2, workers=0, progress=False)
    shards = sorted(out.glob("*.tfrecord"))
    victim = [p for p in shards if p.name.startswith("train-")][0]
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])  # a copy or a disk that stopped half-way
    other = [p for p in shards if p != victim][0]
    other.with_name(other.name + ".json").write_text("null")  # JSON, not a sidecar
    res = build_cache(_tasks(6), load_pair, out, shard_size=2, workers=0, progress=False)
    assert res.skipped_shards == len(shards) - 2 and res.total == 6
    assert victim.read_bytes() == whole
    assert load_arrays(out, "train")["id"] == ["case0", "case1", "case2", "case3"]


def _deadly_tasks(n: int, extra: dict[int, dict]) -> list[CacheTask]:
    return [CacheTask(id=f"k{i:02d}", split="train", payload={"i": i, **extra.get(i, {})}, source=f"f{i}.dcm")
            for i in range(n)]


@pytest.mark.slow
def test_a_file_that_kills_its_worker_is_named_and_the_rest_is_written(tmp_path: Path) -> None:
    out = tmp_path / "c"
    tasks = _deadly_tasks(12, {5: {"die": True}})
    res = build_cache(tasks, load_or_die, out, shard_size=4, workers=2, progress=False)
    assert res.total == 11 and [e["id"] for e in res.errors] == ["k05"]
    error = res.errors[0]
    assert error["file"] == "f5.dcm"
    assert "worker process died" in error["reason"] and "SIGKILL" in error["reason"]
    assert load_arrays(out, "train")["id"] == [t.id for t in tasks if t.id != "k05"]
    assert "k05,f5.dcm," in (out / "errors.csv").read_text()
    # a rerun finds every shard complete (the culprit is not loaded again)
    again = build_cache(tasks, load_or_die, out, shard_size=4, workers=2, progress=False)
    assert again.skipped_shards == 3 and again.total == 11 and [e["id"] for e in again.errors] == ["k05"]


@pytest.mark.slow
def test_pairs_in_flight_when_a_worker_dies_are_loaded_again(tmp_path: Path) -> None:
    died = tmp_path / "died"  # the worker dies once, while loading k03 (e.g. killed for another reason)
    res = build_cache(_deadly_tasks(10, {3: {"die_once": str(died)}}), load_or_die, tmp_path / "c",
                      shard_size=4, workers=2, progress=False)
    assert died.exists() and res.total == 10 and not res.errors
    assert load_arrays(tmp_path / "c", "train")["id"] == [f"k{i:02d}" for i in range(10)]


def test_cache_refuses_another_preprocessing_config(tmp_path: Path) -> None:
    build_cache(_tasks(4), load_pair, tmp_path / "c", workers=0, progress=False)
    with pytest.raises(KneetfError, match="another preprocessing config"):
        build_cache(_tasks(4), load_pair, tmp_path / "c", PreprocessConfig(high_percentile=99.0), workers=0,
                    progress=False)


def test_process_pool_gives_the_same_cache(tmp_path: Path) -> None:
    build_cache(_tasks(5), load_pair, tmp_path / "a", workers=0, progress=False)
    build_cache(_tasks(5), load_pair, tmp_path / "b", workers=2, progress=False)
    a, b = load_arrays(tmp_path / "a", "train"), load_arrays(tmp_path / "b", "train")
    assert a["id"] == b["id"]
    np.testing.assert_array_equal(a["mri"], b["mri"])


def test_mirror_left_flips_both_modalities(tmp_path: Path) -> None:
    from kneetf.data.cache import preprocess_pair

    cfg = PreprocessConfig(mirror_left=True)
    raw = load_pair({"i": 1}, cfg)  # i odd -> left
    plain = preprocess_pair(raw, PreprocessConfig())
    flipped = preprocess_pair(raw, cfg)
    assert flipped.mirrored and not plain.mirrored
    np.testing.assert_allclose(flipped.xray, plain.xray[:, ::-1], atol=1e-6)
    np.testing.assert_allclose(flipped.mri, plain.mri[:, :, ::-1], atol=1e-6)


def test_not_a_cache_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a kneetf cache"):
        make_dataset(tmp_path, "train")
    build_cache(_tasks(4), load_pair, tmp_path / "c", workers=0, progress=False)
    with pytest.raises(InputError, match="unknown split"):
        make_dataset(tmp_path / "c", "dev")
    json.loads((tmp_path / "c" / "dataset.json").read_text())


def test_atomic_writes_have_ordinary_permissions(tmp_path: Path) -> None:
    import os
    import stat

    from kneetf.io.atomic import atomic_path, write_text_atomic

    umask = os.umask(0o022)
    try:
        f = write_text_atomic(tmp_path / "a.txt", "x")
        with atomic_path(tmp_path / "d", directory=True) as d:
            (d / "inner").write_text("y")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_shift_augment_moves_input_and_target_together_and_keeps_the_mri(tmp_path: Path) -> None:
    import tensorflow as tf

    from kneetf.data.pipeline import shift_xray

    build_cache(_tasks(6), load_pair, tmp_path / "c", PreprocessConfig(), shard_size=8, workers=0, progress=False)
    clean = load_arrays(tmp_path / "c", "train")
    tf.random.set_seed(0)
    seen_shift = False
    for x, y in make_dataset(tmp_path / "c", "train", batch_size=4, shift=3):
        np.testing.assert_array_equal(x.numpy(), y["xray_recon"].numpy())  # no intensity augmentation
        np.testing.assert_array_equal(y["mri"].numpy(), clean["mri"])
        for got, ref in zip(x.numpy(), clean["xray"]):
            # the shifted image is the clean one moved by whole pixels: its interior matches a window
            offsets = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                       if np.array_equal(got[3:-3, 3:-3], ref[3 + dy:125 + dy, 3 + dx:125 + dx])]
            assert offsets, "not a whole-pixel shift of the clean X-ray"
            seen_shift |= offsets != [(0, 0)]
    assert seen_shift
    img = tf.reshape(tf.range(16.0), (4, 4, 1))
    assert shift_xray(img, 0) is img



def test_a_corrupt_description_or_shard_is_named(tmp_path: Path) -> None:
    """A truncated dataset.json was a JSONDecodeError crash, a truncated shard a DataLossError
    naming no file; both now name the file and how to rebuild it."""
    from kneetf.data.pipeline import corrupt_shards, corrupt_shards_named

    cache = tmp_path / "c"
    build_cache(_tasks(6), load_pair, cache, workers=0, progress=False, shard_size=2)
    assert corrupt_shards([tmp_path]) == []
    shard = cache / read_info(cache)["shards"]["train"][1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert corrupt_shards([tmp_path]) == [shard]
    stale = cache / "train-99999.tfrecord"  # left by an earlier build, listed nowhere: never read, never named
    stale.write_bytes(shard.read_bytes())
    assert corrupt_shards([tmp_path]) == [shard]
    with pytest.raises(InputError, match=rf"{shard.name}: corrupt TFRecord shard: truncated record at \d+\. Delete "
                                         r"it and its .json") as raised:
        with corrupt_shards_named(tmp_path / "elsewhere", cache):
            list(make_dataset(cache, "train", 2))
    assert "more" not in str(raised.value) and "function_node" not in str(raised.value)
    description = cache / "dataset.json"
    description.write_text(description.read_text()[:100])
    with pytest.raises(InputError, match=r"dataset.json: unreadable .*kneetf prepare"):
        read_info(cache)
    description.write_text(json.dumps({"counts": {"train": 4}}))  # JSON, but not what prepare writes
    with pytest.raises(InputError, match=r"dataset.json: is not a kneetf cache description \(no shards, shapes, "
                                         r"preprocess\)"):
        read_info(cache)


def test_an_unchanged_cache_keeps_its_creation_stamp(tmp_path: Path) -> None:
    """kneetf-train rebuilds its synthetic cache at every start: a new stamp there made every
    resume fit its kernel ridge prior again (the fit's key holds the stamp)."""
    cache = tmp_path / "c"
    build_cache(_tasks(6), load_pair, cache, workers=0, progress=False, shard_size=2)
    info = json.loads((cache / "dataset.json").read_text())
    info["created"] = "2000-01-01T00:00:00+00:00"
    (cache / "dataset.json").write_text(json.dumps(info))
    build_cache(_tasks(6), load_pair, cache, workers=0, progress=False, shard_size=2)
    assert read_info(cache)["created"] == "2000-01-01T00:00:00+00:00"
    build_cache(_tasks(8), load_pair, cache, workers=0, progress=False, shard_size=2)  # new shards: a new stamp
    assert read_info(cache)["created"] != "2000-01-01T00:00:00+00:00"
