"""Knee-joint ROI: box maths, CSV boxes, cropping, the classical fallback and the detector."""
from __future__ import annotations

import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest

from kneetf.errors import InputError, ManifestError
from kneetf.preprocess.roi import (Box, ClassicalRoi, CsvRoi, RoiNotFoundError, RoiSource, classical_roi, crop_box,
                                   draw_box_png, iou, load_boxes, mean_iou, square_box_around, write_boxes)


# --- a stand-in X-ray: two bright bones with a dark joint gap -------------------------------
def standin_knee(rng: np.random.Generator, shape: tuple[int, int] | None = None) -> tuple[np.ndarray, Box]:
    """A (H, W) uint16 knee-like image and its true box: a soft-tissue band, a femur that
    widens into condyles, a dark joint gap, a tibia narrowing downwards. The box is the
    square of side 1.45 x condyle width centred on the gap (the fallback's default ratio)."""
    h, w = shape if shape else (int(rng.integers(180, 300)), int(rng.integers(180, 300)))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cx, jy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.4, 0.6) * h
    cw = rng.uniform(0.3, 0.45) * min(h, w)
    gap = rng.uniform(0.015, 0.03) * h
    img = np.full((h, w), 300.0, np.float32)
    img[np.abs(xx - cx) < cw * rng.uniform(0.65, 0.8)] = 900.0
    femur_w = cw * (1.0 - 0.55 * np.clip((jy - gap / 2 - yy) / (0.25 * h), 0, 1))
    tibia_w = 0.95 * cw * (1.0 - 0.5 * np.clip((yy - jy - gap / 2) / (0.25 * h), 0, 1))
    img[(yy < jy - gap / 2) & (np.abs(xx - cx) < femur_w / 2)] = 2200.0
    img[(yy > jy + gap / 2) & (np.abs(xx - cx) < tibia_w / 2)] = 2200.0
    img = cv2.GaussianBlur(img, (0, 0), 1.5) + rng.normal(0, 40, (h, w))
    return np.clip(img, 0, 65535).astype(np.uint16), square_box_around(cx, jy, 1.45 * cw)


def standin_set(n: int, seed: int) -> tuple[list[np.ndarray], list[Box]]:
    rng = np.random.default_rng(seed)
    pairs = [standin_knee(rng) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


# --- box maths ----------------------------------------------------------------------------
@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 2, 2), (1, 1, 3, 3), 1 / 7),          # overlap 1, union 4 + 4 - 1
    ((0, 0, 4, 4), (1, 1, 3, 3), 4 / 16),         # contained
    ((0, 0, 2, 2), (0, 0, 2, 2), 1.0),
    ((0, 0, 2, 2), (2, 0, 4, 2), 0.0),            # touching edges
    ((0, 0, 2, 2), (5, 5, 6, 6), 0.0),
    ((0, 0, 4, 2), (2, 0, 6, 2), 4 / 12),         # half-shifted rectangles
    ((-1, -1, 1, 1), (0, 0, 2, 2), 1 / 7),        # negative coordinates
    ((1, 1, 1, 1), (1, 1, 1, 1), 0.0),            # empty boxes: no NaN
])
def test_iou_hand_computed(a, b, expected):
    assert iou(Box(*a), Box(*b)) == pytest.approx(expected)
    assert Box(*b).iou(Box(*a)) == pytest.approx(expected)


def test_mean_iou_and_its_errors():
    pred = [Box(0, 0, 2, 2), Box(0, 0, 4, 4)]
    true = [Box(1, 1, 3, 3), Box(1, 1, 3, 3)]
    assert mean_iou(pred, true) == pytest.approx((1 / 7 + 1 / 4) / 2)
    with pytest.raises(ValueError, match="as many"):
        mean_iou(pred, true[:1])


def test_square_clip_and_helpers():
    assert Box(0, 0, 4, 2).square() == Box(0, -1, 4, 3)
    assert Box(2, 0, 4, 8).square() == Box(-1, 0, 7, 8)
    assert Box(-2, -1, 5, 3).clip(4, 4) == Box(0, 0, 4, 3)
    assert Box(5, 5, 9, 9).clip(4, 4).area == 0.0
    assert square_box_around(10, 20, 6) == Box(7, 17, 13, 23)
    b = Box(1, 2, 5, 10)
    assert (b.cx, b.cy, b.width, b.height, b.area) == (3, 6, 4, 8, 32)
    assert b.as_tuple() == (1, 2, 5, 10)
    assert b.scale(0.5) == Box(0.5, 1, 2.5, 5) and b.shift(1, -2) == Box(2, 0, 6, 8)


# --- cropping -----------------------------------------------------------------------------
def test_crop_inside_is_a_plain_slice():
    img = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30)
    crop = crop_box(img, Box(5, 4, 15, 14))
    np.testing.assert_array_equal(crop, img[4:14, 5:15])
    assert crop.dtype == img.dtype


def test_crop_non_square_box_gives_the_square_around_it():
    img = np.arange(40 * 40, dtype=np.float32).reshape(40, 40)
    crop = crop_box(img, Box(10, 15, 20, 19))  # 10 x 4 -> 10 x 10 centred on (15, 17)
    np.testing.assert_array_equal(crop, img[12:22, 10:20])


def test_crop_partly_outside_pads_with_the_minimum():
    img = np.arange(1, 10 * 12 + 1, dtype=np.float32).reshape(10, 12) + 100.0
    crop = crop_box(img, Box(-3, -2, 5, 6))  # 8 x 8 starting at (-3, -2)
    assert crop.shape == (8, 8)
    np.testing.assert_array_equal(crop[2:, 3:], img[0:6, 0:5])
    assert np.all(crop[:2, :] == img.min()) and np.all(crop[:, :3] == img.min())
    # the far corner, beyond the right and bottom edges
    crop = crop_box(img, Box(8, 6, 16, 14))
    np.testing.assert_array_equal(crop[:4, :4], img[6:10, 8:12])
    assert np.all(crop[4:, :] == img.min()) and np.all(crop[:, 4:] == img.min())


def test_crop_edge_mode_and_channels():
    img = np.arange(6 * 6 * 2, dtype=np.float32).reshape(6, 6, 2)
    crop = crop_box(img, Box(-2, 0, 2, 4), pad_mode="edge")
    assert crop.shape == (4, 4, 2)
    np.testing.assert_array_equal(crop[:, 2:], img[0:4, 0:2])
    np.testing.assert_array_equal(crop[:, 0], img[0:4, 0])  # replicated left column
    with pytest.raises(ValueError, match="pad_mode"):
        crop_box(img, Box(0, 0, 2, 2), pad_mode="reflect")


def test_crop_entirely_outside_is_refused():
    with pytest.raises(InputError, match="outside"):
        crop_box(np.zeros((10, 10)), Box(20, 20, 30, 30))


# --- boxes CSV ----------------------------------------------------------------------------
def test_boxes_csv_round_trip(tmp_path):
    boxes = {"a": Box(1, 2, 30, 40.5), "knee-2": Box(-5, 0, 10, 12), "x,y": Box(0.1, 1 / 3, 2.0000001, 1e6)}
    path = write_boxes(tmp_path / "rois.csv", boxes)
    assert load_boxes(path) == boxes
    # extra columns and column order do not matter, blank lines are skipped
    (tmp_path / "b.csv").write_text("y1,x1,note,id,y0,x0\n40,30,hi,a,2,1\n\n")
    assert load_boxes(tmp_path / "b.csv") == {"a": Box(1, 2, 30, 40)}


@pytest.mark.parametrize("text, match", [
    ("id,x0,y0,x1\na,1,2,3\n", r"line 1: missing column\(s\) y1"),
    ("id,x0,y0,x1,y1\na,1,2,3,4\nb,1,two,3,4\n", r"line 3: y0 is not a number.*'two'"),
    ("id,x0,y0,x1,y1\na,5,2,3,4\n", r"line 2: empty box"),
    ("id,x0,y0,x1,y1\na,1,2,3,4\nb,1,2,3,4\na,1,2,3,5\n", r"line 4: duplicate id 'a' \(first on line 2\)"),
    ("id,x0,y0,x1,y1\na,1,2,nan,4\n", r"line 2: x1 is not finite"),
    ("id,x0,y0,x1,y1\na,1,2\n", r"line 2: expected 5 fields, got 3"),
    ("id,x0,y0,x1,y1\n,1,2,3,4\n", r"line 2: empty id"),
    ("id,x0,y0,x1,y1\n", r"no boxes"),
    ("", r"line 1: empty file"),
])
def test_boxes_csv_errors_name_file_and_line(tmp_path, text, match):
    path = tmp_path / "rois.csv"
    path.write_text(text)
    with pytest.raises(ManifestError, match=match) as info:
        load_boxes(path)
    assert str(path) in str(info.value)


def test_csv_roi_source(tmp_path):
    path = write_boxes(tmp_path / "rois.csv", {"a": Box(1, 2, 3, 4)})
    source = CsvRoi(path)
    assert isinstance(source, RoiSource)
    assert source.box_for("a", np.zeros((8, 8))) == Box(1, 2, 3, 4)
    with pytest.raises(InputError, match=r"rois.csv: no ROI box for id 'zz'"):
        source.box_for("zz", np.zeros((8, 8)))


# --- classical fallback -------------------------------------------------------------------
def test_classical_roi_on_standin_knees():
    images, boxes = standin_set(20, seed=3)
    pred = [classical_roi(im) for im in images]
    ious = [p.iou(t) for p, t in zip(pred, boxes)]
    # measured ~0.9 mean (sides a few % small: the blurred bone edge); centres within ~1 px
    assert np.mean(ious) >= 0.85 and min(ious) >= 0.75, ious
    for p, t in zip(pred, boxes):
        assert abs(p.cy - t.cy) < 0.02 * 300 and abs(p.cx - t.cx) < 0.02 * 300


def test_classical_roi_scales_with_the_image_and_is_picklable():
    image, true = standin_knee(np.random.default_rng(7), shape=(240, 260))
    big = cv2.resize(image, (260 * 3, 240 * 3), interpolation=cv2.INTER_LINEAR)  # work_size shrink path
    small_box, big_box = classical_roi(image), classical_roi(big)
    assert big_box.scale(1 / 3).iou(small_box) > 0.9
    source = pickle.loads(pickle.dumps(ClassicalRoi(side_scale=1.5)))
    assert source.box_for("x", image).width == pytest.approx(classical_roi(image, side_scale=1.5).width)


def test_classical_roi_refuses_an_image_without_a_knee():
    with pytest.raises(RoiNotFoundError, match=r"knee.dcm: no knee found: the image is constant"):
        classical_roi(np.full((100, 60), 7, np.uint16), source="knee.dcm")
    noise = np.random.default_rng(0).normal(1000, 50, (200, 240))
    with pytest.raises(RoiNotFoundError):
        classical_roi(noise)
    with pytest.raises(InputError, match="8x8"):
        classical_roi(np.zeros((4, 4)))


def test_roi_module_does_not_import_tensorflow():
    code = "import sys, kneetf.preprocess.roi; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_draw_box_png(tmp_path):
    image = np.linspace(0, 4000, 64 * 80, dtype=np.float32).reshape(64, 80)
    path = draw_box_png(tmp_path / "p" / "a.png", image, Box(10, 20, 40, 50), label="a")
    png = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert png.shape == (64, 80, 3) and png.dtype == np.uint8
    assert tuple(png[35, 10]) == (0, 0, 255)            # left edge of the box, red (BGR)
    assert tuple(png[49, 25]) == (0, 0, 255)            # bottom edge (y1 exclusive)
    inner = png[35, 25]
    assert inner[0] == inner[1] == inner[2]             # gray inside
    two = draw_box_png(tmp_path / "b.png", image, [Box(10, 20, 40, 50), Box(5, 5, 15, 15)])
    assert tuple(cv2.imread(str(two))[10, 5]) == (0, 255, 0)  # the second box in green


# --- detector -----------------------------------------------------------------------------
keras = pytest.importorskip("keras")
rd = pytest.importorskip("kneetf.models.roi_detector")


def test_box_encoding_and_letterbox():
    image = np.arange(6 * 10, dtype=np.float32).reshape(6, 10) + 5
    sq = rd.letterbox(image)
    assert sq.shape == (10, 10)
    np.testing.assert_array_equal(sq[:6], image)
    assert np.all(sq[6:] == 5)
    box = Box(2, 1, 6, 4)
    target = rd.encode_box(box, 10)
    np.testing.assert_allclose(target, [0.4, 0.25, 0.4])
    assert rd.decode_box(target, 10).as_tuple() == pytest.approx(box.square().as_tuple())


def test_detector_input_uses_the_shared_preprocessing():
    from kneetf.preprocess.ops import preprocess_xray

    image = np.random.default_rng(0).uniform(0, 1000, (40, 64)).astype(np.float32)
    x = rd.detector_input(image, 32)
    padded = np.full((64, 64), image.min(), np.float32)
    padded[:40] = image
    expected = preprocess_xray(padded[None, :, :, None], 32).numpy()[0]
    np.testing.assert_allclose(x, expected, atol=1e-6)
    assert x.shape == (32, 32, 1) and 0 <= x.min() and x.max() <= 1


def test_augmentation_moves_the_box_with_the_image():
    """A bright square exactly under the box must stay exactly under the transformed box."""
    train = rd.RoiTrainConfig(crop_scale=(0.4, 1.3), p_full=0.2)
    rng = np.random.default_rng(0)
    for _ in range(40):
        image = np.zeros((200, 200), np.float32)
        box = square_box_around(*rng.uniform(40, 160, 2).round(), float(rng.integers(10, 40) * 2))
        x0, y0, x1, y1 = (int(v) for v in box.as_tuple())
        image[y0:y1, x0:x1] = 1.0
        crop, target = rd.augment_example(image, box, rng, train)
        assert crop.shape[0] == crop.shape[1]
        cbox = rd.decode_box(target, crop.shape[0])
        cx0, cy0, cx1, cy1 = (int(round(v)) for v in cbox.as_tuple())
        assert crop[max(cy0, 0):cy1, max(cx0, 0):cx1].mean() == pytest.approx(1.0)
        assert crop.sum() == pytest.approx((x1 - x0) * (y1 - y0))  # nothing bright outside it


def test_box_loss_and_metric_match_numpy_iou():
    rng = np.random.default_rng(1)
    t = rng.uniform(0.2, 0.8, (16, 3)).astype("float32")
    p = np.clip(t + rng.normal(0, 0.08, t.shape), 0.05, 0.95).astype("float32")
    expected = [rd.decode_box(a, 1).iou(rd.decode_box(b, 1)) for a, b in zip(t, p)]
    metric = rd.BoxIoU()
    metric.update_state(t, p)
    assert float(metric.result()) == pytest.approx(np.mean(expected), rel=1e-5)
    loss = float(rd.BoxLoss(coord_weight=0.0)(t, p))
    assert loss == pytest.approx(1 - np.mean(expected), rel=1e-5)


def test_tiny_detector_trains_saves_and_loads_identically(tmp_path):
    images, boxes = standin_set(12, seed=0)
    model, history = rd.train_detector(images, boxes, config=rd.TINY_DETECTOR,
                                       train=rd.RoiTrainConfig(epochs=2, batch_size=4), steps_per_epoch=2,
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
    from kneetf.cli.train_roi import synthetic_examples

    _, images, boxes = synthetic_examples(400, 0, fast=True)
    _, val_x, val_b = synthetic_examples(100, 1)
    model, history = rd.train_detector(images, boxes)
    assert mean_iou(model.predict_boxes(val_x), val_b) >= 0.85
    assert mean_iou([classical_roi(x) for x in val_x], val_b) >= 0.8  # measured 0.852


# --- kneetf train-roi ---------------------------------------------------------------------
def test_train_roi_cli_on_synthetic(tmp_path):
    import json

    from kneetf.cli.main import main
    from kneetf.cli.train_roi import synthetic_examples
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
