"""A full, read-only or over-quota file system: a clear error naming the output (exit 1, not a
crash), no temporary debris, earlier outputs kept, and no HDF5 write that runs out of room."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest

from kneetf.cli import exits
from kneetf.cli.main import main
from kneetf.errors import OutputError, storage_reason
from kneetf.io import atomic

from xray_factory import knee_xray


def test_a_write_that_runs_out_of_room_names_the_output_and_leaves_the_old_one(tmp_path: Path) -> None:
    final = tmp_path / "knee-0123456789ab.nii.gz"
    final.write_text("earlier")
    with pytest.raises(OutputError, match=r"cannot write .*knee-0123456789ab.nii.gz: no space left on device$"):
        with atomic.atomic_path(final) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert final.read_text() == "earlier" and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ValueError):  # any other error passes through as it is
        with atomic.atomic_path(final):
            raise ValueError("not a storage error")


def test_storage_reasons_from_errnos_and_other_libraries_words() -> None:
    assert storage_reason(OSError(errno.EROFS, "Read-only file system")) == "read-only file system"
    wrapped = OSError("With tag (7FE0,0010) got exception: [Errno 28] No space left on device\nTraceback ...")
    assert storage_reason(wrapped) == "no space left on device"
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as e:
            raise RuntimeError("while saving") from e
    except RuntimeError as chained:
        assert storage_reason(chained) == "disk quota exceeded"
    assert storage_reason(OSError(errno.ENOENT, "No such file")) is None and storage_reason(ValueError("x")) is None


def test_the_command_line_reports_a_full_disk_as_an_error_naming_the_final_file(monkeypatch, capsys) -> None:
    import kneetf.cli.synth as synth

    def full(args):  # TensorFlow's words, with the temporary name of the shard it was writing
        raise RuntimeError("/data/cache/.tmp-train-00000-of-00002.tfrecord-ab_cd123.tfrecord; No space left on device")

    monkeypatch.setattr(synth, "run", full)
    assert main(["synth", "--n", "2", "--out", "x"]) == exits.EXIT_ERROR
    err = capsys.readouterr().err
    assert "kneetf synth: error: cannot write /data/cache/train-00000-of-00002.tfrecord: no space left on device" in err
    assert "crashed" not in err


def test_predict_stops_at_a_full_disk_and_keeps_what_it_wrote(tmp_path: Path, monkeypatch) -> None:
    from kneetf.config import PreprocessConfig, to_dict
    from kneetf.inference import batch
    from kneetf.io.writers import write_png
    from kneetf.models.kneenet import KneeNet
    from kneetf.preprocess.roi import Box

    run = tmp_path / "run"
    run.mkdir()
    KneeNet.from_preset("tiny").save(run / "model.keras")
    (run / "config.json").write_text(json.dumps({"preprocess": to_dict(PreprocessConfig())}))
    xrays = [write_png(tmp_path / f"k{i}.png", (knee_xray(i) * 60000).astype(np.uint16)) for i in range(3)]
    out = tmp_path / "out"
    box = Box(10, 5, 160, 145)
    batch.predict_files(run, xrays, out, names="id", roi=box, progress=False)
    earlier = {p.name: p.read_bytes() for p in out.glob("*.nii.gz")}
    assert sorted(earlier) == ["k0.nii.gz", "k1.nii.gz", "k2.nii.gz"]
    real = batch.write_prediction

    def full_after_one(out_dir, name, *args, **kwargs):
        if name != "k0":
            raise OutputError(Path(out_dir) / f"{name}.nii.gz", "no space left on device")
        return real(out_dir, name, *args, **kwargs)

    monkeypatch.setattr(batch, "write_prediction", full_after_one)
    with pytest.raises(OutputError, match="k1.nii.gz: no space left on device"):
        batch.predict_files(run, xrays, out, names="id", roi=box, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("*.nii.gz")}.keys() == earlier.keys()
    assert (out / "k1.nii.gz").read_bytes() == earlier["k1.nii.gz"]  # not removed as a failed input's


def test_no_weights_backup_is_started_without_room_for_it(tmp_path: Path, monkeypatch) -> None:
    import shutil

    import keras

    from kneetf.training import checkpoint

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1000)])
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 20, 9 << 20, 1 << 20))
    with pytest.raises(OutputError, match=r"epoch-00001.weights.h5: no space left on device \(about [0-9.]+ MB "
                                          r"needed, 1.0 MB free\)"):
        checkpoint._check_room(tmp_path / "epoch-00001.weights.h5", model)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 1 << 30, 9 << 30))
    checkpoint._check_room(tmp_path / "epoch-00001.weights.h5", model)


def test_a_name_that_fits_the_file_system_fits_its_temporary_name_too(tmp_path: Path) -> None:
    for name in ("k" * 240 + ".nii.gz", "ü" * 120 + ".nii.gz"):  # 247 and 247 bytes: legal names
        with atomic.atomic_path(tmp_path / name) as tmp:
            assert len(tmp.name.encode()) <= 255 and atomic.debris_pattern(name).fullmatch(tmp.name)
            tmp.write_text("x")
        assert (tmp_path / name).read_text() == "x"


def test_one_process_at_a_time_writes_into_an_output_folder(tmp_path: Path) -> None:
    """A second kneetf process is refused an output folder another one holds (two runs would
    each rewrite its list of kneetf's files from their own); the lock goes with its process,
    even killed, and one process may open the folder again."""
    import os
    import subprocess
    import sys

    import kneetf
    from kneetf.errors import ConfigError
    from kneetf.io.outdir import OutputFolder

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kneetf.io.outdir import OutputFolder; "
                               "f = OutputFolder(sys.argv[1]); print(f.locked, flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(kneetf.__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "True"
        with pytest.raises(ConfigError, match="is being written by another kneetf process"):
            OutputFolder(out)
        later = tmp_path / "later"  # a folder that does not exist yet is locked when the first name is claimed
        mine = OutputFolder(later)
        assert not mine.locked
        mine.claim([later / "a.nii.gz"])
        assert mine.locked and OutputFolder(later).locked  # this process again: allowed
        mine.release()
    finally:
        holder.kill()
        holder.wait()
    assert OutputFolder(out).locked  # killed: its lock is gone
