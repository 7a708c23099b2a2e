"""Simulated hospital radiographs: geometry of the truth box, storage, determinism, styles."""
from __future__ import annotations

import dataclasses
import math
import pickle
import subprocess
import sys

import cv2
import numpy as np
import pytest

from kneetf.data import radiograph as rg
from kneetf.data.synthetic import SynthConfig, sample_params, xray_line_integral
from kneetf.errors import ConfigError

#: geometry only: no markers, collimation, borders, text, other knee, noise or processing
CLEAN = dataclasses.replace(
    rg.TRAIN, name="clean", p_other_knee=0.0, marker_count=(0, 0), p_ruler=0.0, p_collimation=0.0, p_border=0.0,
    label_count=(0, 0), photons=(1e9, 1e9), heel=(0.0, 0.0), blur_px=(0.0, 0.0), drc=(0.0, 0.0),
    edge_gain=(0.0, 0.0), luts=("gamma",), gamma=(1.0, 1.0), window_low_pct=(0.0, 0.0),
    window_high_pct=(100.0, 100.0), bits=(16,), p_monochrome1=0.0, field_mm=(160.0, 300.0),
    rotation_deg=(15.0, 25.0), pixel_mm=(0.25, 0.6))


def _canonical_crop(image: np.ndarray, cx: float, cy: float, side: float, angle: float,
                    k: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The `side` square centred on (cx, cy), turned by -`angle` (undoing a rotation of the
    anatomy by `angle`), sampled on a k x k grid (continuous pixel coordinates), and where
    that grid lies inside the image."""
    a = math.radians(angle)
    rot = (side / k) * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    # dst continuous d -> src continuous  c + rot (d - k/2); in pixel indices (centres at +0.5)
    t = np.array([cx, cy]) - rot @ np.array([k / 2.0, k / 2.0]) + rot @ np.array([0.5, 0.5]) - 0.5
    m = np.hstack([rot, t[:, None]])
    smooth = cv2.GaussianBlur(image.astype(np.float32), (0, 0), max(0.5, side / k / 2))
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    crop = cv2.warpAffine(smooth, m, (k, k), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    inside = cv2.warpAffine(np.ones(image.shape, np.float32), m, (k, k), flags=flags, borderValue=0.0) > 0.999
    return crop, inside


def _corr(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """Correlation of two crops over the pixels both hold."""
    both = a[1] & b[1]
    assert both.mean() > 0.4
    return float(np.corrcoef(a[0][both], b[0][both])[0, 1])


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_truth_box_stays_on_the_rendered_joint_after_rotation_scale_and_placement(index):
    """The box of a rotated, rescaled, off-centre radiograph holds the same anatomy as the
    joint box of the knee rendered upright at a reference spacing; a box moved by 15 % of
    its side, or the wrong turn, does not."""
    synth = SynthConfig(placement_mm=(0.0, 0.0))
    r = rg.simulate(11, index, CLEAN, synth)
    acq = r.acquisition
    assert 15.0 <= abs(acq.angle) <= 25.0 and r.box.width == pytest.approx(100.0 / acq.pixel_mm)
    # reference: the same knee upright, 0.5 mm pixels, joint where `joint_box` puts it
    knee = dataclasses.replace(rg.knee_params(11, index, synth), detector_x=0.0, detector_y=0.0)
    ref_cfg = dataclasses.replace(synth, xray_size=480, xray_pixel_mm=0.5, xray_compute_mm=1.0, detector_shift_mm=0)
    ref = xray_line_integral(knee, ref_cfg)
    jx, jy = rg._joint_offset_mm(knee)
    ref_crop = _canonical_crop(ref, 240 + jx / 0.5, 240 + jy / 0.5, 200.0, 0.0)
    image = r.presentation()
    side = r.box.width
    good = _corr(_canonical_crop(image, r.box.cx, r.box.cy, side, acq.angle), ref_crop)
    assert good > 0.98
    for dx, dy in ((0.15, 0), (-0.15, 0), (0, 0.15), (0, -0.15)):
        moved = _canonical_crop(image, r.box.cx + dx * side, r.box.cy + dy * side, side, acq.angle)
        assert _corr(moved, ref_crop) < good - 0.03
    assert _corr(_canonical_crop(image, r.box.cx, r.box.cy, side, -acq.angle), ref_crop) < good - 0.03


def test_deterministic_per_seed_and_index():
    a, b = rg.simulate(3, 5, "clinic"), rg.simulate(3, 5, "clinic")
    np.testing.assert_array_equal(a.image, b.image)
    assert a.box == b.box and a.acquisition == b.acquisition
    c = rg.simulate(3, 6, "clinic")
    assert c.box != a.box
    # the acquisition alone gives the box (no rendering) and pickles (worker processes)
    knee = rg.knee_params(3, 5, SynthConfig(placement_mm=(0.0, 0.0)))
    acq = rg.sample_acquisition(rg.acquisition_rng(3, 5), "clinic", knee, SynthConfig(placement_mm=(0.0, 0.0)))
    assert acq == a.acquisition and pickle.loads(pickle.dumps(acq)) == acq
    assert pickle.loads(pickle.dumps(rg.STYLES["oai"])) == rg.STYLES["oai"]


def test_clinic_style_matches_its_specification():
    for i in range(3):
        r = rg.simulate(0, i, "clinic")
        assert r.image.shape == (500, 600) and r.pixel_spacing == (0.3, 0.3)
        assert r.box.width == pytest.approx(320.0) and r.box.height == pytest.approx(320.0)
        assert 0 <= r.box.cx <= 600 and 0 <= r.box.cy <= 500
        assert len(r.acquisition.markers) == 1 and r.bits in (12, 16)


@pytest.mark.parametrize("photometric, bits", [("MONOCHROME1", 8), ("MONOCHROME1", 12), ("MONOCHROME2", 16),
                                               ("MONOCHROME1", 16)])
def test_storage_round_trips_through_the_reader(tmp_path, photometric, bits):
    import pydicom

    from kneetf.io.readers import read_xray
    from kneetf.io.writers import write_dicom_xray

    style = dataclasses.replace(rg.STYLES["clinic"], bits=(bits,),
                                p_monochrome1=1.0 if photometric == "MONOCHROME1" else 0.0)
    r = rg.simulate(1, 2, style)
    assert r.photometric == photometric and r.image.dtype == (np.uint8 if bits == 8 else np.uint16)
    assert int(r.image.max()) <= 2 ** bits - 1
    path = write_dicom_xray(tmp_path / "x.dcm", r.presentation().astype(np.uint16), pixel_spacing=r.pixel_spacing,
                            photometric=r.photometric, bits_stored=r.bits)
    ds = pydicom.dcmread(path)
    assert (ds.PhotometricInterpretation, ds.BitsStored) == (photometric, bits)
    np.testing.assert_array_equal(ds.pixel_array, r.image)  # stored as the hospital stores it
    image, meta = read_xray(path)
    np.testing.assert_array_equal(image, r.presentation())
    assert meta.pixel_spacing == (0.3, 0.3) and meta.inverted == (photometric == "MONOCHROME1")
    # bone is bright once read: the joint box is brighter than the image's darkest decile
    crop = image[int(max(r.box.y0, 0)):int(r.box.y1), int(max(r.box.x0, 0)):int(r.box.x1)]
    assert np.median(crop) > np.percentile(image, 10)


def test_max_side_simulates_the_field_at_a_coarser_spacing():
    big = dataclasses.replace(rg.TRAIN, pixel_mm=(0.1, 0.1), field_mm=(400.0, 400.0), aspect=(1.0, 1.0))
    knee = sample_params(np.random.default_rng(0))
    full = rg.sample_acquisition(np.random.default_rng(1), big, knee)
    small = rg.sample_acquisition(np.random.default_rng(1), dataclasses.replace(big, max_side=256), knee)
    assert full.shape == (4000, 4000) and small.shape == (256, 256)
    assert small.pixel_mm * 256 == pytest.approx(400.0) and small.box.width * small.pixel_mm == pytest.approx(100.0)


def test_every_named_style_renders_with_its_settings():
    for name, style in rg.STYLES.items():
        synth = SynthConfig(placement_mm=(0.0, 0.0))
        knee = rg.knee_params(0, 0, synth)
        acq = rg.sample_acquisition(rg.acquisition_rng(0, 0), style, knee, synth)
        assert acq.style == name and acq.bits in style.bits
        assert style.pixel_mm[0] - 1e-9 <= acq.pixel_mm or style.max_side is not None
    r = rg.simulate(2, 0, dataclasses.replace(rg.STYLES["collimated"], field_mm=(150.0, 150.0), pixel_mm=(0.6, 0.6)))
    assert r.acquisition.collimation is not None and r.acquisition.markers
    names = [s.name for s in rg.HELDOUT_SETS]
    assert "train" not in names and set(names) <= set(rg.STYLES) and len(set(s.seed for s in rg.HELDOUT_SETS)) == 6


def test_held_out_styles_use_settings_training_does_not():
    train = rg.TRAIN
    for spec in rg.HELDOUT_SETS:
        style = rg.STYLES[spec.name]
        assert set(style.marker_fonts).isdisjoint(train.marker_fonts)
        assert set(style.label_words).isdisjoint(train.label_words)
    assert rg.STYLES["oai"].pixel_mm[1] <= train.pixel_mm[0]
    assert rg.STYLES["wide"].pixel_mm[0] >= train.pixel_mm[1]
    assert rg.STYLES["rotated"].rotation_deg[0] >= train.rotation_deg[1]
    assert rg.STYLES["processed"].edge_gain[0] >= train.edge_gain[1] and train.p_clahe == 0
    assert rg.STYLES["collimated"].collimation_tilt_deg > train.collimation_tilt_deg


def test_style_validation_and_lookup():
    with pytest.raises(ConfigError, match="marker_fonts"):
        rg.RadiographStyle(marker_fonts=("comic",))
    with pytest.raises(ConfigError, match="pixel_mm"):
        rg.RadiographStyle(pixel_mm=(0.5, 0.1))
    with pytest.raises(ConfigError, match="Did you mean 'clinic'"):
        rg.get_style("clinc")
    assert rg.RadiographStyle.from_dict(rg.STYLES["wide"].to_dict()) == rg.STYLES["wide"]


def test_module_does_not_import_tensorflow():
    code = "import sys, kneetf.data.radiograph; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_synth_writes_radiographs_with_their_boxes(tmp_path):
    import pydicom

    from kneetf.cli.main import main
    from kneetf.io.readers import read_xray
    from kneetf.preprocess.roi import load_boxes

    out = tmp_path / "radiographs"
    assert main(["synth", "--out", str(out), "--n", "3", "--seed", "4", "--formats", "dicom", "--workers", "1",
                 "--radiograph", "clinic", "--no-progress"]) == 0
    boxes = load_boxes(out / "rois.csv")
    synth = SynthConfig()
    for i in range(3):
        knee_id = f"knee{i:05d}"
        image, meta = read_xray(out / "xray" / f"{knee_id}.dcm")
        knee = rg.knee_params(4, i, synth)
        acq = rg.sample_acquisition(rg.acquisition_rng(4, i), "clinic", knee, synth)
        rad = rg.render_radiograph(knee, acq, synth)
        np.testing.assert_array_equal(image, rad.presentation())
        assert boxes[knee_id].as_tuple() == pytest.approx(rad.box.as_tuple())
        assert meta.pixel_spacing == (0.3, 0.3) and meta.photometric == rad.photometric
        assert pydicom.dcmread(out / "xray" / f"{knee_id}.dcm").BitsStored == rad.bits
    # the MRI is the plain dataset's; running again reuses every file
    assert main(["synth", "--out", str(out), "--n", "3", "--seed", "4", "--formats", "dicom", "--workers", "1",
                 "--radiograph", "clinic", "--no-progress"]) == 0
    assert load_boxes(out / "rois.csv") == boxes
    assert main(["synth", "--out", str(out), "--n", "3", "--seed", "4", "--formats", "dicom", "--workers", "1",
                 "--radiograph", "oai", "--no-progress"]) == 1
