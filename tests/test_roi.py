"""Knee-joint ROI: box maths, CSV boxes, cropping, the classical fallback and the detector."""
from __future__ import annotations

import dataclasses
import math
import pickle
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest

from kneetf.errors import InputError, ManifestError
from kneetf.preprocess.roi import (CLASSICAL_BOX_MM, Box, ClassicalRoi, CsvRoi, FixedRoi, RoiFinding, RoiNotFoundError,
                                   RoiSource, classical_roi, crop_box, draw_box_png, find_joint, find_roi, iou, load_boxes,
                                   mean_iou, square_box_around, write_boxes)
from roi_factory import laden_knee, standin_knee, standin_set  # tests/roi_factory.py


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


def test_find_roi_says_which_source_and_how_sure(tmp_path):
    image, true, spacing = laden_knee(1)
    csv_found = find_roi(CsvRoi({"a": true}), "a", image)
    assert csv_found == RoiFinding(true, "csv", csv_found.confidence, False) and math.isnan(csv_found.confidence)
    classical = find_roi(ClassicalRoi(), "a", image, spacing)
    assert classical.source == "classical" and classical.box.width == pytest.approx(CLASSICAL_BOX_MM / spacing)
    assert classical.confidence == pytest.approx(find_joint(image, pixel_spacing=spacing).confidence)
    assert classical.flagged == (classical.confidence < ClassicalRoi().flag_below)
    assert find_roi(ClassicalRoi(flag_below=1.01), "a", image).flagged  # a strict reviewer flags everything

    class Plain:  # any object with box_for
        def box_for(self, case_id, image):
            return true

    assert find_roi(Plain(), "a", image) == RoiFinding(true, "Plain")


def test_csv_roi_source(tmp_path):
    path = write_boxes(tmp_path / "rois.csv", {"a": Box(1, 2, 3, 4)})
    source = CsvRoi(path)
    assert isinstance(source, RoiSource)
    assert source.box_for("a", np.zeros((8, 8))) == Box(1, 2, 3, 4)
    with pytest.raises(InputError, match=r"rois.csv: no ROI box for id 'zz'"):
        source.box_for("zz", np.zeros((8, 8)))


def test_roi_source_is_the_one_choice_of_the_roi(tmp_path):
    from kneetf.errors import ConfigError
    from kneetf.preprocess.xray import roi_source

    csv_path = write_boxes(tmp_path / "rois.csv", {"a": Box(1, 2, 3, 4)})
    image = np.zeros((8, 8))
    assert isinstance(roi_source("classical"), ClassicalRoi)
    assert isinstance(roi_source(detector="classical"), ClassicalRoi)
    for default in (roi_source(), roi_source("builtin"), roi_source(detector="builtin")):
        assert type(default).__name__ == "DetectorRoi" and str(default.path) == "builtin"
    assert roi_source(csv_path).box_for("a", image) == Box(1, 2, 3, 4)
    assert roi_source(boxes=csv_path).box_for("a", image) == Box(1, 2, 3, 4)
    fixed = roi_source(Box(0, 0, 5, 5))
    assert isinstance(fixed, FixedRoi) and fixed.box_for("any", image) == Box(0, 0, 5, 5)
    mine = CsvRoi({"b": Box(1, 1, 2, 2)})
    assert roi_source(mine) is mine
    with pytest.raises(ConfigError, match="not both"):
        roi_source(boxes=csv_path, detector=tmp_path / "d.keras")
    with pytest.raises(ConfigError, match="not both"):
        roi_source("classical", boxes=csv_path)
    for bad in (42, tmp_path / "boxes.txt"):
        with pytest.raises(ConfigError, match="roi must be"):
            roi_source(bad)
    with pytest.raises(InputError, match="not found"):  # a detector loads at once, naming the file
        roi_source(tmp_path / "missing.keras")


def test_a_bad_line_of_a_boxes_csv_fails_only_its_own_id(tmp_path, caplog):
    """One bad line made CsvRoi (and so a whole `kneetf predict` batch) fail at once; `kneetf
    prepare` skipped only that pair. Now its id fails with the line's reason, the others work."""
    path = tmp_path / "b.csv"
    path.write_text("id,x0,y0,x1,y1\na,1,2,30,40\nb,abc,1,2,3\nc,10,10,5,5\n,1,1,9,9\nd,1,1,9,9\nd,2,2,9,9\n")
    image = np.zeros((64, 64))
    with caplog.at_level("WARNING"):
        boxes = CsvRoi(path)
    assert "line 5: empty id" in caplog.text
    assert boxes.box_for("a", image) == Box(1, 2, 30, 40)
    for case_id, reason in [("b", r"line 3: x0 is not a number"), ("c", r"line 4: empty box"),
                            ("d", r"line 7: duplicate id 'd'"), ("e", r"no ROI box for id 'e'")]:
        with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: {reason}"):
            boxes.box_for(case_id, image)


# --- classical fallback -------------------------------------------------------------------
@pytest.mark.parametrize("n", [256, 255, 2])
def test_classical_block_median_equals_numpys_to_the_bit(n):
    # the classical fallback's block noise sorts instead of calling np.median: the same values,
    # ties, signed zeros (equal as numbers; the noise takes absolute values) and clipped blocks
    from kneetf.preprocess.roi import _median_last
    rng = np.random.default_rng(n)
    a = rng.normal(0, 0.01, (9, 7, n)).astype(np.float32)
    a[0] = 0.0
    a[1, :, : n // 2] = -0.0
    a[2] = np.round(a[2], 2)
    a[3, :, ::3] = 1.0
    got, want = _median_last(a), np.median(a, axis=-1)
    assert got.dtype == want.dtype == np.float32
    assert np.array_equal(got, want)
    deviation = np.abs(a - got[..., None])
    assert np.array_equal(_median_last(deviation), np.median(np.abs(a - want[..., None]), axis=-1))
    assert not np.signbit(_median_last(deviation)).any()


@pytest.mark.parametrize("stroke", [5, 11])
def test_classical_hats_on_busy_tiles_equal_the_whole_images(stroke):
    # the thin-stroke mask computes its top-hat and black-hat only on tiles near a large local
    # range: the same mask as both hats over the whole image, strokes at tile edges and at the
    # image's border included, and nothing where no tile is busy
    from kneetf.preprocess.roi import _hats_above
    rng = np.random.default_rng(stroke)
    v = cv2.GaussianBlur(rng.random((150, 205), dtype=np.float32), (0, 0), 3.0) * 0.5 + 0.25
    v[40:43, 10:120] += 0.5  # a bright stroke across several tiles
    v[100:160, 62:65] -= 0.4  # a dark one across a tile edge, into the bottom border
    v[0:2, 180:205] += 0.6  # one along the top border, into the corner
    v = np.clip(v, 0.0, 1.0)
    threshold = np.full(v.shape, 0.15, np.float32)
    threshold[:, 150:] = 0.3  # the threshold varies
    element = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (stroke, stroke))
    want = ((cv2.morphologyEx(v, cv2.MORPH_TOPHAT, element) > threshold)
            | (cv2.morphologyEx(v, cv2.MORPH_BLACKHAT, element) > threshold)).astype(np.uint8)
    got = _hats_above(v, threshold, stroke, np.float32(0.15), tile=32)
    assert want.sum() > 50 and got.dtype == np.uint8
    assert np.array_equal(got, want)
    flat = np.full((70, 90), 0.5, np.float32)
    assert not _hats_above(flat, np.full(flat.shape, 0.1, np.float32), stroke, np.float32(0.1)).any()


def test_classical_roi_on_standin_knees():
    images, boxes = standin_set(20, seed=3)
    pred = [classical_roi(im) for im in images]
    ious = [p.iou(t) for p, t in zip(pred, boxes)]
    # measured 0.85 mean, 0.77 least (the side comes from the joint space's extent, which ends a
    # little inside the blurred bone edge); centres within ~1 px
    assert np.mean(ious) >= 0.8 and min(ious) >= 0.7, ious
    for p, t in zip(pred, boxes):
        assert abs(p.cy - t.cy) < 0.02 * 300 and abs(p.cx - t.cx) < 0.02 * 300


def test_classical_roi_scales_with_the_image_and_is_picklable():
    image, true = standin_knee(np.random.default_rng(7), shape=(240, 260))
    big = cv2.resize(image, (260 * 3, 240 * 3), interpolation=cv2.INTER_LINEAR)  # work_size shrink path
    small_box, big_box = classical_roi(image), classical_roi(big)
    assert big_box.scale(1 / 3).iou(small_box) > 0.9
    source = pickle.loads(pickle.dumps(ClassicalRoi(side_scale=1.5)))
    assert source.box_for("x", image).width == pytest.approx(classical_roi(image, side_scale=1.5).width)


@pytest.mark.parametrize("seed", range(4))
def test_classical_roi_ignores_markers_collimation_and_borders(seed):
    """A synthetic knee off centre in a 600 x 500 field at 0.3 mm, collimated (bright outside),
    a black unexposed band, a lead letter and burned-in text: the earlier fallback put its box
    on the marker (a third of the side) or around most of the image (2.6x the side) on every
    one of these; this one finds the joint, and sizes the box in mm when it knows the spacing."""
    image, true, spacing = laden_knee(seed)
    for kw in ({}, {"pixel_spacing": spacing}, {"pixel_spacing": (spacing, spacing)}):
        found = find_joint(image, **kw)
        box = found.box
        assert math.hypot(box.cx - true.cx, box.cy - true.cy) <= 0.05 * true.width, (kw, box, true)
        assert 0.8 <= box.width / true.width <= 1.3, (kw, box, true)
        assert 0.0 < found.confidence <= 1.0 and found.contrast > 0
    assert find_joint(image, pixel_spacing=spacing).box.width == pytest.approx(CLASSICAL_BOX_MM / spacing)
    # a 96 mm convention instead of the default 100 mm
    assert classical_roi(image, pixel_spacing=spacing, box_mm=96).width == pytest.approx(96 / spacing)


def test_classical_roi_refuses_two_knees_and_a_leg_without_its_knee():
    left, _, spacing = laden_knee(0)
    right, _, _ = laden_knee(10)
    with pytest.raises(RoiNotFoundError, match=r"bilateral.dcm: two candidate knee joints of similar score"):
        classical_roi(np.hstack([left[:, :560], right[:, 40:]]), source="bilateral.dcm")
    shaft = left[:150]  # the femur ends above the joint: no joint space
    with pytest.raises(RoiNotFoundError, match="no knee joint found"):
        classical_roi(shaft, pixel_spacing=spacing)
    with pytest.raises(ValueError, match="pixel_spacing"):
        classical_roi(left, pixel_spacing=-1)


def _classical_on_processed(seed: int, index: int):
    """(the classical box or None when it reports the file, the true box) of one simulated
    radiograph of the "processed" style."""
    from kneetf.data.radiograph import simulate

    r = simulate(seed, index, "processed")
    try:
        return classical_roi(r.presentation(), pixel_spacing=r.pixel_spacing[0]), r.box
    except RoiNotFoundError:
        return None, r.box


@pytest.mark.parametrize("index, found", [(15, True), (25, True), (7, False), (26, False)])
def test_classical_roi_on_processed_radiographs_finds_or_reports(index, found):
    """Strongly sharpened, compressed, noisy radiographs (the "processed" style, seed 5105: not
    a held-out seed). Noise in the bone once masked most of the knee as "text" (15, 25: found
    now); the sharpening's dark halo along a collimation edge passed for a joint space at one
    tilt or width after being refused at others (7, 26: a box far off the knee before; now the
    knee is found or the image is reported, never a wrong box)."""
    from kneetf.preprocess.roi_score import is_found

    box, truth = _classical_on_processed(5105, index)
    if box is None:
        assert not found, f"image {index} should be found"
        return
    assert is_found(box, truth), (index, box, truth)


@pytest.mark.parametrize("index, found", [(22, False), (137, False), (190, True), (30, True), (129, True)])
def test_classical_roi_wants_bone_beside_the_joint_space(index, found):
    """Processed radiographs (seed 1001: not a held-out seed) whose collimation edge, with
    the sharpening's dark halo along it, passed for a joint space: a box up to two sides off
    the knee, unreported, before the joint space needed bone beside it (22, 137: reported
    now, as failed or, by the second search on the equalised copy of version 6, with a box
    flagged for review; 30, 129: the knee is found once the edge is refused; 190: reported by
    version 4 of the fallback, found by version 5). As OpenCV 5.1 renders 129, version 6's
    second search read a line of burned-in text beside the knee as the joint space (a flagged
    box off the knee); version 7 refuses it (as 5.0 renders it too, where version 7's bridged
    edges alone did not): its second search masks the text at the darkest level."""
    from kneetf.data.radiograph import simulate
    from kneetf.preprocess.roi_score import is_found

    r = simulate(1001, index, "processed")
    try:
        finding = ClassicalRoi().finding_for("x", r.presentation(), r.pixel_spacing[0])
    except RoiNotFoundError:
        assert not found, f"image {index} should be found"
        return
    if not found:
        assert finding.flagged, f"image {index} should be reported or flagged"
        return
    assert is_found(finding.box, r.box), (index, finding, r.box)


@pytest.mark.parametrize("index", [164, 189])
def test_classical_roi_flags_a_clipped_box_or_a_knee_too_wide_for_it(index):
    """Processed radiographs (seed 1001: not a held-out seed) where the classical box missed
    the knee unflagged (confidence 0.56 and 1.0): 164 in bone clipped white (the joint space
    read from the noise), 189 on a joint space followed far past the knee, wider than its
    100 mm box. Such a box is flagged for review now."""
    from kneetf.data.radiograph import simulate
    from kneetf.preprocess.roi_score import is_found

    r = simulate(1001, index, "processed")
    try:
        finding = ClassicalRoi().finding_for("x", r.presentation(), r.pixel_spacing[0])
    except RoiNotFoundError:
        return  # reported: as good as flagged
    assert finding.flagged or is_found(finding.box, r.box), (index, finding, r.box)


def test_classical_confidence_drops_on_clipped_bone_and_too_wide_knees():
    from kneetf.preprocess.roi import DEFAULT_CLASSICAL, JointFinding, _plausibility

    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 0.9, (120, 160)).astype(np.float32)
    image[0, 0] = 1.0
    found = JointFinding(Box(40, 20, 100, 80), 0.9, knee_width=40.0, angle=0.0, contrast=50.0)
    assert _plausibility(image, found, 1.45, DEFAULT_CLASSICAL) == 1.0
    clipped = image.copy()
    clipped[20:80, 40:90] = 1.0  # 5/6 of the box at the image's maximum
    assert _plausibility(clipped, found, 1.45, DEFAULT_CLASSICAL) == DEFAULT_CLASSICAL.unsure_factor
    wide = dataclasses.replace(found, knee_width=1.6 * 60 / 1.45)  # a knee 1.6x too wide for its box
    assert _plausibility(image, wide, 1.45, DEFAULT_CLASSICAL) == DEFAULT_CLASSICAL.unsure_factor


@pytest.mark.parametrize("index", [62, 69])
def test_noise_in_processed_bone_is_not_text(index):
    """Processed radiographs (seed 1001: not a held-out seed), bone partly clipped white: its
    blocks look almost noiseless (most pixels equal), so the noise there passed for text
    strokes and masked half the knee around the joint (52 % on 62, 46 % on 69; 9 % now).
    Strokes must now stand out of the image's noise level too."""
    from kneetf.data.radiograph import simulate
    from kneetf.preprocess.roi import DEFAULT_CLASSICAL, _artefact_mask

    r = simulate(1001, index, "processed")
    image = r.presentation()
    f = DEFAULT_CLASSICAL.work_size / max(image.shape)
    shape = (round(image.shape[0] * f), round(image.shape[1] * f))
    mask = _artefact_mask(image, shape, DEFAULT_CLASSICAL).all
    truth = r.box.scale(f)
    half = 0.3 * truth.width
    y0, x0 = max(0, int(truth.cy - half)), max(0, int(truth.cx - half))
    around = mask[y0:int(truth.cy + half), x0:int(truth.cx + half)]
    assert around.mean() < 0.2, around.mean()


def test_the_darkest_small_pieces_are_masked_apart():
    """Burned-in text at the darkest level is the one part of the artefact mask that the second
    search (on the equalised copy) keeps masked: never bone, and a line of it passes for a
    joint space there. A lead marker (brightest level) is in the whole mask only."""
    from kneetf.preprocess.roi import DEFAULT_CLASSICAL, _artefact_mask

    image = np.random.default_rng(0).normal(0.5, 0.01, (384, 384)).astype(np.float32)
    for x in range(40, 200, 16):  # a line of dark letters
        image[300:318, x:x + 9] = 0.0
    image[40:70, 300:330] = 1.0  # a lead marker
    masks = _artefact_mask(image, (192, 192), DEFAULT_CLASSICAL)
    text, marker = np.s_[150:159, 20:104], np.s_[20:35, 150:165]
    assert masks.dark[text].mean() > 0.5 and masks.all[text].mean() > 0.5
    assert masks.all[marker].mean() > 0.5 and not masks.dark[marker].any()
    assert not masks.dark[60:120, 60:120].any()  # the rest of the field


def test_only_an_edge_through_the_knee_refuses_its_joint_space():
    from kneetf.preprocess.roi import _on_long_edge

    knee = dict(x=100.0, y=50.0, along=(1.0, 0.0), knee_width=40.0, reach=6.0)
    collimation = np.array([[40.0, 52.0, 190.0, 53.0]])  # through the knee, far past it
    text = np.array([[20.0, 51.0, 60.0, 51.0]])  # a line of text in line with the joint, beside the knee
    assert _on_long_edge(collimation, **knee)
    assert not _on_long_edge(text, **knee)
    assert not _on_long_edge(collimation + [0.0, 20.0, 0.0, 20.0], **knee)  # off the joint line


def test_a_collimation_edge_the_leg_interrupts_is_one_edge_through_the_knee():
    """Where the leg crosses a collimation edge the edge can fade for a few pixels. Found in
    pieces, the piece beside the knee looked like text in line with the joint space, and a
    joint space read on the edge was kept; bridged, the edge runs through the knee and on."""
    from kneetf.preprocess.roi import DEFAULT_CLASSICAL, _on_long_edge, _straight_edges

    v = np.full((200, 300), 0.3, np.float32)
    v[100:] = 0.7  # the edge, at row 100
    v[:, 60:64] = v[:, 140:145] = 0.7  # two breaks of 4-5 px
    knee = dict(x=100.0, y=99.5, along=(1.0, 0.0), knee_width=60.0, reach=6.0)
    pieces = _straight_edges(v)
    assert len(pieces) > 1 and not _on_long_edge(pieces, **knee)
    whole = _straight_edges(v, DEFAULT_CLASSICAL.edge_gap)
    assert len(whole) == 1 and whole[0, 2] - whole[0, 0] > 0.9 * v.shape[1], whole
    assert _on_long_edge(whole, **knee)


@pytest.mark.parametrize("index", [58, 62, 87])
def test_classical_roi_is_not_refused_by_text_beside_the_knee(index):
    """Collimated radiographs (seed 1001: not a held-out seed) with a line of burned-in text or
    a ruler in line with the joint space, beside the knee: version 5 of the fallback took it
    for a collimation edge running on past the knee and reported the X-ray; the knee is found."""
    from kneetf.data.radiograph import simulate
    from kneetf.preprocess.roi_score import is_found

    r = simulate(1001, index, "collimated")
    box = classical_roi(r.presentation(), pixel_spacing=r.pixel_spacing[0])
    assert is_found(box, r.box), (index, box, r.box)


def test_bone_flanks_tell_a_knee_from_an_edge():
    from kneetf.preprocess.roi import _bone_flanks

    v = np.full((60, 120), 0.4, np.float32)  # soft tissue
    v[:, 40:80] = 1.0  # bone, 40 px wide
    v[28:32, 40:80] = 0.6  # the joint space
    usable = np.ones_like(v)
    knee = _bone_flanks(v, usable, 60.0, 30.0, 40.0, 4, 8)
    np.testing.assert_allclose(knee, 0.6, atol=1e-5)  # both bones, both sides
    v[:28] = 1.0  # above: one bright level across (the outside of a collimated field)
    edge = _bone_flanks(v, usable, 60.0, 30.0, 40.0, 4, 8)
    np.testing.assert_allclose(edge[0], 0.0, atol=1e-5)
    usable[:, :40] = 0.0  # a side that does not show is not judged
    assert np.isnan(_bone_flanks(v, usable, 60.0, 30.0, 40.0, 4, 8)[:, 0]).all()


def test_classical_second_look_at_a_small_knee():
    """Wide fields at 0.6-0.9 mm (seed 1001: not held out): the whole image at 192 px gave a
    box 16-18 % of its side off the joint; the second look, on a crop at about twice the
    resolution, finds it. A place off the joint is not found again there: unsure."""
    from kneetf.data.radiograph import simulate
    from kneetf.preprocess.roi import DEFAULT_CLASSICAL, JointFinding, _second_look
    from kneetf.preprocess.roi_score import is_found

    for index in (48, 114):
        r = simulate(1001, index, "wide")
        image, spacing = r.presentation(), r.pixel_spacing[0]
        found = find_joint(image, pixel_spacing=spacing)
        assert is_found(found.box, r.box), (index, found.box, r.box)
    off = JointFinding(found.box.shift(0.45 * found.box.width, 0.0), found.confidence, found.knee_width,
                       found.angle, found.contrast)
    with pytest.raises(RoiNotFoundError, match="unsure: the joint found at"):
        _second_look(image, off, spacing, CLASSICAL_BOX_MM, 1.45, DEFAULT_CLASSICAL, None)


def test_classical_second_search_on_an_equalised_copy():
    """Processed radiographs (seeds 1001-1002: not held out) whose compressed, sharpened and
    clipped bones leave the joint space too faint a dip for the first search (reported by
    version 5 of the fallback): the second search, on a copy equalised tile by tile (CLAHE),
    finds the knee, and its box is flagged for review. As OpenCV 5.1 renders (1001, 99), the
    first search of version 6 kept, unflagged, a joint space read on a collimation edge that
    the leg interrupts; version 7 finds the edge whole and refuses it. The pixels of simulated
    radiographs differ a little between OpenCV versions, and on some the first search finds
    one of these knees alone: then it must be found, and the others must need the second."""
    from kneetf.data.radiograph import simulate
    from kneetf.preprocess.roi import CLASSICAL_FLAG_BELOW, DEFAULT_CLASSICAL
    from kneetf.preprocess.roi_score import is_found

    first_only = dataclasses.replace(DEFAULT_CLASSICAL, equalise_clip=0.0)
    needed = 0
    for seed, index in [(1001, 35), (1001, 99), (1002, 28)]:
        r = simulate(seed, index, "processed")
        image, spacing = r.presentation(), r.pixel_spacing[0]
        try:
            alone = find_joint(image, pixel_spacing=spacing, config=first_only)
        except RoiNotFoundError:
            alone = None
        found = find_joint(image, pixel_spacing=spacing)
        assert is_found(found.box, r.box), (seed, index, found.box, r.box)
        if alone is None or alone.confidence < DEFAULT_CLASSICAL.equalise_below:
            needed += 1
            assert found.confidence < CLASSICAL_FLAG_BELOW, (seed, index, found)
    assert needed >= 2


def test_equalised_copy_brings_out_a_faint_dip_in_clipped_bone():
    """A joint space 2 % below bone clipped to white, beside soft tissue at half its level:
    the equalised copy makes its dip several times deeper (over 4 x), markers and the
    outside of the field left out of the tiles' histograms."""
    from kneetf.preprocess.roi import DEFAULT_CLASSICAL, _equalise

    v = np.full((96, 96), 0.5, np.float32)
    v[:, 24:72] = 1.0
    v[46:50, 24:72] = 0.98
    valid = np.ones(v.shape, bool)
    valid[:8, :8] = False
    v[:8, :8] = 0.0  # a marker: not counted
    out = _equalise(v, valid, DEFAULT_CLASSICAL)
    dip_before = (v[30:40, 30:66].mean() - v[46:50, 30:66].mean()) / (v.max() - v.min())
    dip_after = (out[30:40, 30:66].mean() - out[46:50, 30:66].mean()) / (out.max() - out.min())
    assert dip_after > 4 * dip_before, (dip_before, dip_after)


def test_classical_roi_refuses_an_image_without_a_knee():
    with pytest.raises(RoiNotFoundError, match=r"knee.dcm: no knee found: the image is constant"):
        classical_roi(np.full((100, 60), 7, np.uint16), source="knee.dcm")
    noise = np.random.default_rng(0).normal(1000, 50, (200, 240))
    with pytest.raises(RoiNotFoundError):
        classical_roi(noise)
    with pytest.raises(InputError, match="8x8"):
        classical_roi(np.zeros((4, 4)))


def test_roi_modules_do_not_import_tensorflow():
    """The cache's worker processes choose and use the classical ROI without TensorFlow."""
    code = ("import sys, numpy, kneetf.preprocess.roi as r, kneetf.preprocess.xray as x\n"
            "try:\n    x.roi_source('classical').box_for('a', numpy.random.default_rng(0).random((64, 64)))\n"
            "except r.RoiNotFoundError:\n    pass\nprint('tensorflow' in sys.modules)")
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
rd = pytest.importorskip("kneetf.preprocess.roi_detector")


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


def test_a_box_from_an_impossible_spacing_is_refused_before_any_search() -> None:
    image = np.random.default_rng(0).random((300, 400)).astype(np.float32)
    with pytest.raises(RoiNotFoundError, match=r"100000 pixels at the pixel spacing 0.001 mm.*the spacing is wrong"):
        find_joint(image, pixel_spacing=0.001)


def test_a_box_far_larger_than_the_image_is_refused() -> None:
    image = np.ones((320, 320), np.float32)
    with pytest.raises(InputError, match=r"does not fit the 320x320 image: its 20000x20000 square crop would be 0.03% image"):
        crop_box(image, Box(0, 0, 20000, 20000))
    assert crop_box(image, Box(-300, -300, 340, 340)).shape == (640, 640)  # a quarter inside: kept


@pytest.mark.parametrize("spacing, kept", [((0.3, 0.3), True), ((0.001, 0.001), False), (0.01, False),
                                           ((20.0, 20.0), False)])
def test_an_impossible_pixel_spacing_is_ignored(caplog, spacing, kept) -> None:
    """A spacing that makes the X-ray a 3 mm or 10 m field is wrong: sizing a 100 mm box with it
    once asked for a 100,000-pixel square (21.9 GB, then a segfault). find_roi ignores it."""
    from kneetf.preprocess.roi import radiograph_spacing

    image, _, _ = laden_knee(0)
    with caplog.at_level("WARNING"):
        assert radiograph_spacing(spacing, image.shape, "x.dcm") == (spacing if kept else None)
    assert ("x.dcm: pixel spacing" in caplog.text) == (not kept)
    if not kept:  # the classical ROI then works as without a spacing
        free = find_roi(ClassicalRoi(), "k", image)
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert find_roi(ClassicalRoi(), "k", image, spacing, where="scans/k.dcm") == free
        assert "scans/k.dcm: pixel spacing" in caplog.text  # the file, not only the id
        caplog.clear()
        with caplog.at_level("WARNING"):  # sources that never use a spacing do not warn of one
            boxes = CsvRoi({"k": free.box})
            assert find_roi(boxes, "k", image, spacing, where="scans/k.dcm").box == free.box
            assert find_roi(FixedRoi(free.box), "k", image, spacing).box == free.box
        assert "pixel spacing" not in caplog.text


def test_the_crop_limit_is_the_one_given(tmp_path) -> None:
    """`kneetf prepare --max-pixels` reaches the crop in its workers (it used to get the default)."""
    from kneetf.config import PreprocessConfig
    from kneetf.data.sources import FilePayload, load_files
    from kneetf.io.writers import write_nifti

    image = np.ones((320, 320), np.float32)
    box = Box(0, 0, 200, 200)
    assert crop_box(image, box).shape == (200, 200)
    with pytest.raises(InputError, match=r"gives a 200x200 crop, more than max_pixels=30000"):
        crop_box(image, box, max_pixels=30_000)
    # an X-ray and an MRI under the limit, a box whose square crop is over it
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((150, 150)).astype(np.float32))
    write_nifti(tmp_path / "m.nii.gz", np.random.default_rng(1).random((40, 16, 16)).astype(np.float32))
    payload = FilePayload("k", str(tmp_path / "x.npy"), str(tmp_path / "m.nii.gz"), "right", box.as_tuple(), None,
                          max_pixels=30_000)
    with pytest.raises(InputError, match=r"more than max_pixels=30000"):
        load_files(payload, PreprocessConfig())
    assert load_files(dataclasses.replace(payload, max_pixels=None), PreprocessConfig()).xray.shape == (200, 200)
