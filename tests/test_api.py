"""kneetf.load_model / kneetf.Reconstructor, including the README example verbatim."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from kneetf.config import PreprocessConfig, to_dict

def readme_example() -> str:
    """The first Python block of README.md's "Python API" section: the test runs exactly it."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Python API"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def _knee_image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:160, 0:140].astype("float32")
    bones = np.where(np.abs(yy - 80) > 6, 1.0, 0.2) * np.exp(-((xx - 70) / 40.0) ** 2)
    return np.round(800 + 3000 * bones + 40 * rng.standard_normal(yy.shape)).astype("float32")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from kneetf.models.kneenet import KneeNet

    run = tmp_path_factory.mktemp("run")
    KneeNet.from_preset("tiny").save(run / "model.keras")
    (run / "config.json").write_text(json.dumps({"preprocess": to_dict(PreprocessConfig(mirror_left=True))}))
    return run


def test_readme_example_runs_verbatim(tmp_path, model_dir):
    import shutil

    import nibabel as nib

    from kneetf.io.writers import write_dicom_xray

    # the test's working folder is tmp_path (conftest): the example's relative paths land there
    shutil.copytree(model_dir, tmp_path / "runs" / "train")
    write_dicom_xray(tmp_path / "knee.dcm", _knee_image(), laterality="R")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(readme_example(), "README.md", "exec"), {})
    lines = buf.getvalue().splitlines()
    assert lines[0] == "(2, 128, 128, 20)"
    assert lines[1] == "knee (20, 128, 128) (0.7, 1.09375, 1.09375)"
    img = nib.load(str(tmp_path / "knee_mri.nii.gz"))
    assert img.shape == (20, 128, 128)  # slices first, as documented


def test_reconstructor_matches_the_model_on_the_same_preprocessed_input(model_dir):
    import kneetf
    from kneetf.preprocess import ops
    from kneetf.preprocess.roi import Box, crop_box

    model = kneetf.load_model(model_dir)
    rec = kneetf.Reconstructor.load(model_dir, roi=Box(20, 30, 120, 130))
    image = _knee_image(1)
    right, left = rec.predict_batch([image, image], ids=["r", "l"], sides=["right", "left"])
    crop = crop_box(image, Box(20, 30, 120, 130))
    for r, flip in ((right, False), (left, True)):
        c = crop[:, ::-1] if flip else crop
        x = ops.preprocess_xray(c[None, :, :, None]).numpy()
        vol = np.transpose(model.predict(x, verbose=0)["mri"][0], (2, 0, 1))
        np.testing.assert_allclose(r.volume, vol[::-1] if flip else vol, atol=1e-5)
        np.testing.assert_allclose(r.xray, x[0], atol=1e-6)
        assert r.mirrored is flip and r.volume.dtype == np.float32
    assert (right.id, left.id) == ("r", "l")
    assert right.box == Box(20, 30, 120, 130)
    # an already cropped X-ray gives the same volume as the full one with the box
    cropped = rec.predict(crop, cropped=True, side="right")
    np.testing.assert_allclose(cropped.volume, right.volume, atol=1e-5)
    # a box as a plain (x0, y0, x1, y1) is a Box; a bad box or side is an InputError (was AttributeError / ignored)
    np.testing.assert_allclose(rec.predict(image, box=(20, 30, 120, 130), side="R").volume, right.volume, atol=1e-5)
    from kneetf.errors import InputError

    for bad in ({"box": (120, 30, 20, 130)}, {"box": (0, 0, float("nan"), 9)}, {"box": (1, 2, 3)}, {"side": "up"}):
        with pytest.raises(InputError, match="box|side"):
            rec.predict(image, **bad)


def test_load_model_and_reconstructor_errors(tmp_path, model_dir):
    import kneetf
    from kneetf.errors import ConfigError, InputError

    with pytest.raises(InputError, match="model not found"):
        kneetf.load_model(tmp_path / "missing")
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="bad.keras"):
        kneetf.load_model(tmp_path / "bad.keras")
    with pytest.raises(ConfigError, match="roi must be"):
        kneetf.Reconstructor.load(model_dir, roi=42)
    rec = kneetf.Reconstructor.load(model_dir)
    with pytest.raises(InputError, match="broken.png"):
        (tmp_path / "broken.png").write_bytes(b"junk")
        rec.predict(tmp_path / "broken.png")
    with pytest.raises(InputError, match="2-D"):
        rec.predict(np.zeros((4, 5, 6, 7)))
    knee = np.random.default_rng(0).random((64, 64)).astype("float32")
    for bad in (0, -2, 2.5):  # 0 and negatives were NumPy's "need at least one array to stack"
        with pytest.raises(ConfigError, match=rf"batch_size must be an integer >= 1. Received: batch_size={bad}"):
            rec.predict_batch([knee, knee], cropped=True, batch_size=bad)
    assert len(rec.predict_batch([knee, knee, knee], cropped=True, batch_size=np.int64(2))) == 3
