"""Training the knee-joint ROI detector (`kneetf.training.roi`) and `kneetf train-roi`."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from kneetf.errors import InputError
from kneetf.preprocess.roi import RoiSource, classical_roi, load_boxes, mean_iou, square_box_around, write_boxes
from roi_factory import standin_set  # tests/roi_factory.py

keras = pytest.importorskip("keras")
rd = pytest.importorskip("kneetf.preprocess.roi_detector")
tr = pytest.importorskip("kneetf.training.roi")


def test_augmentation_moves_the_box_with_the_image():
    """A bright square exactly under the box must stay exactly under the transformed box."""
    train = tr.RoiTrainConfig(crop_scale=(0.4, 1.3), p_full=0.2)
    rng = np.random.default_rng(0)
    for _ in range(40):
        image = np.zeros((200, 200), np.float32)
        box = square_box_around(*rng.uniform(40, 160, 2).round(), float(rng.integers(10, 40) * 2))
        x0, y0, x1, y1 = (int(v) for v in box.as_tuple())
        image[y0:y1, x0:x1] = 1.0
        crop, target = tr.augment_example(image, box, rng, train)
        assert crop.shape[0] == crop.shape[1]
        cbox = rd.decode_box(target, crop.shape[0])
        cx0, cy0, cx1, cy1 = (int(round(v)) for v in cbox.as_tuple())
        assert crop[max(cy0, 0):cy1, max(cx0, 0):cx1].mean() == pytest.approx(1.0)
        assert crop.sum() == pytest.approx((x1 - x0) * (y1 - y0))  # nothing bright outside it


def test_tiny_detector_trains_saves_and_loads_identically(tmp_path):
    images, boxes = standin_set(12, seed=0)
    model, history = tr.train_detector(images, boxes, config=rd.TINY_DETECTOR,
                                       train=tr.RoiTrainConfig(epochs=2, batch_size=4), steps_per_epoch=2,
                                       val_images=images[:3], val_boxes=boxes[:3])
    assert len(history["loss"]) == 2 and len(history["val_mean_iou"]) == 2
    assert all(np.isfinite(history["loss"]))
    path = rd.save_detector(model, tmp_path / "roi.keras")
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, rd.RoiDetector) and loaded.detector_config == rd.TINY_DETECTOR
    x = np.stack([rd.detector_input(im, 32) for im in images[:4]])
    np.testing.assert_array_equal(model.predict(x, verbose=0), loaded.predict(x, verbose=0))
    # the RoiSource path: load by file, pickle as the path, boxes in pixels of the full image
    source = rd.DetectorRoi.load(path)
    assert isinstance(source, RoiSource)
    box = source.box_for("k0", images[0])
    assert box.as_tuple() == pytest.approx(model.predict_boxes(images[:1])[0].as_tuple())
    again = pickle.loads(pickle.dumps(source))
    assert again.box_for("k0", images[0]).as_tuple() == pytest.approx(box.as_tuple())
    with pytest.raises(InputError, match="not found"):
        rd.DetectorRoi.load(tmp_path / "missing.keras")


@pytest.mark.slow
def test_detector_iou_on_synthetic_held_out():
    """The default detector and training (400 synthetic X-rays, seed 0) on 100 held-out ones
    (seed 1), as `kneetf train-roi` runs them. Measured: mean IoU 0.878 (seed 2 -> 3: 0.879),
    classical fallback 0.852 (0.839), ~2 min on 2 shared cores. The ceiling is 0.898: the
    synthetic boxes carry a random placement offset (sd 3 x 4 mm = 4.3 x 5.7 px on a 143 px
    box) that the X-ray cannot reveal; an oracle centred on the true joint scores 0.898.
    0.85 is the project's target and leaves ~0.03 for run-to-run variation."""
    from kneetf.training.roi import synthetic_examples

    _, images, boxes = synthetic_examples(400, 0, fast=True)
    _, val_x, val_b = synthetic_examples(100, 1)
    model, history = tr.train_detector(images, boxes)
    assert mean_iou(model.predict_boxes(val_x), val_b) >= 0.85
    assert mean_iou([classical_roi(x) for x in val_x], val_b) >= 0.8  # measured 0.852


# --- kneetf train-roi ---------------------------------------------------------------------
def test_train_roi_cli_on_synthetic(tmp_path):
    import json

    from kneetf.cli.main import main
    from kneetf.training.roi import synthetic_examples
    from kneetf.data.synthetic import generate_knee

    out = tmp_path / "roi.keras"
    rc = main(["train-roi", "--n", "4", "--n-val", "2", "--epochs", "1", "--batch-size", "2", "--arch", "tiny",
               "--out", str(out), "--roi-preview", str(tmp_path / "preview")])
    assert rc == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert (report["n_train"], report["n_val"], report["source"]["val_seed"]) == (4, 2, 1)
    # the held-out X-rays are the dataset's subjects 0, 1 of seed 1, with generate_knee's boxes
    ids, images, boxes = synthetic_examples(2, 1)
    assert [b.as_tuple() for b in boxes] == [tuple(map(float, generate_knee(1, i).box)) for i in range(2)]
    assert report["classical"]["mean_iou"] == pytest.approx(mean_iou([classical_roi(x) for x in images], boxes))
    model = keras.saving.load_model(out, safe_mode=True)
    assert report["detector"]["mean_iou"] == pytest.approx(mean_iou(model.predict_boxes(images), boxes), abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "preview").iterdir()) == [f"{i}.png" for i in ids]


def test_train_roi_cli_on_a_manifest_with_boxes(tmp_path):
    pytest.importorskip("kneetf.io.manifest")
    import json

    from kneetf.cli.main import main

    images, boxes = standin_set(10, seed=5)
    lines, rois = ["id,xray,split"], {}
    for i, (im, box) in enumerate(zip(images, boxes)):
        np.save(tmp_path / f"k{i}.npy", im)
        lines.append(f"k{i},k{i}.npy,{'test' if i >= 7 else 'train'}")
        rois[f"k{i}"] = box
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    write_boxes(tmp_path / "rois.csv", rois)
    out = tmp_path / "det.keras"
    assert main(["train-roi", "--data", str(tmp_path), "--epochs", "1", "--batch-size", "4", "--arch", "tiny",
                 "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert (report["n_train"], report["n_val"]) == (7, 3)  # the manifest's test rows are held out
    assert report["classical"]["mean_iou"] == pytest.approx(
        mean_iou([classical_roi(im) for im in images[7:]], boxes[7:]))


def test_train_roi_cli_errors(tmp_path, capsys):
    from kneetf.cli.main import main

    assert main(["train-roi", "--out", "model.h5"]) == 1
    assert "--out must end in .keras" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train-roi", "--data", str(tmp_path / "empty"), "--out", "m.keras"]) == 1
    assert "folder has no manifest.csv" in capsys.readouterr().err


@pytest.mark.slow
def test_train_roi_cli_on_a_synth_folder(tmp_path):
    """`kneetf synth` output (DICOM X-rays, manifest.csv, rois.csv) trains as it is."""
    import json

    from kneetf.cli.main import main
    from kneetf.data.synthetic import write_synthetic_dataset
    from kneetf.io.readers import read_xray

    write_synthetic_dataset(tmp_path / "synth", n=5, seed=0, formats=("dicom",), workers=1, progress=False)
    out = tmp_path / "det.keras"
    assert main(["train-roi", "--data", str(tmp_path / "synth"), "--val-fraction", "0.4", "--epochs", "1",
                 "--batch-size", "2", "--arch", "tiny", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert (report["n_train"], report["n_val"]) == (3, 2)
    boxes = load_boxes(tmp_path / "synth" / "rois.csv")
    # the fallback on the DICOM files scores as on the in-memory X-rays (same boxes, pixels)
    ious = [classical_roi(read_xray(tmp_path / "synth" / "xray" / f"{i}.dcm")[0]).iou(b) for i, b in boxes.items()]
    assert 0.6 < report["classical"]["mean_iou"] and min(ious) > 0.6
