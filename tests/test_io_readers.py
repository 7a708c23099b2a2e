"""kneetf.io.readers / kneetf.io.dicom: files written by the writers (and pydicom's own test
files) read back, sorted by position, rescaled and refused with clear errors."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import cv2
import nibabel as nib

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

import kneetf.io.dicom as kdicom
from dicom_factory import (compress, rewrite, volume, write_declared_huge_dicom, write_enhanced_mr,
                           write_png_header_only)
from kneetf.errors import InputError
from kneetf.io.dicom import read_dicom_image
from kneetf.io.readers import read_mri, read_mri_window, read_xray
from kneetf.io.writers import write_dicom_series, write_dicom_xray, write_nifti, write_png

SPACING = (0.7, 0.4, 0.5)


@pytest.fixture
def series(tmp_path: Path) -> tuple[Path, list[Path], np.ndarray]:
    vol = volume((12, 16, 20))
    files = write_dicom_series(tmp_path / "series", vol, SPACING, shuffle_names=True, seed=0)
    return tmp_path / "series", files, vol


# === DICOM series ===
def test_series_sorted_by_position_not_name_or_instance_number(series) -> None:
    folder, files, vol = series
    rewrite(files, lambda ds, k: setattr(ds, "InstanceNumber", 100 - 7 * k))  # misleading numbers
    assert sorted(f.name for f in files) != [f.name for f in files]
    got, meta = read_mri(folder)
    np.testing.assert_array_equal(got, vol)
    assert meta.reader == "dicom-series" and meta.shape == (12, 16, 20) and meta.total_slices == 12
    assert meta.spacing == SPACING and meta.orientation == (0, 1, 0, 0, 0, -1) and meta.position == (0, 0, 0)


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 1, 0), (0, -1, 0, 0, 0, -1), (1, 0, 0, 0, 0, -1),
                                         (0, 0, -1, 0, 1, 0), (0, -0.9848078, -0.1736482, 0, 0.1736482, -0.9848078)],
                         ids=["axial", "sagittal-reversed", "coronal", "sagittal-transposed", "sagittal-oblique-reversed"])
def test_every_series_orientation_reads_as_the_same_nifti(tmp_path: Path, orientation) -> None:
    """A series stored in any orientation comes back in the sagittal layout a NIfTI file of
    the same volume and geometry is read in: the same voxels, window and geometry."""
    vol = volume((18, 12, 16), integer=False)
    spacing = (0.7, 0.5, 0.4)
    write_dicom_series(tmp_path / "s", vol, spacing, orientation=orientation, origin=(3, 2, 1),
                       shuffle_names=True, seed=4)
    write_nifti(tmp_path / "v.nii.gz", vol, spacing, orientation=orientation, origin=(3, 2, 1))
    tol = np.ptp(vol) / 65535  # DICOM quantised to 16 bits
    a, ma = read_mri(tmp_path / "s")
    b, mb = read_mri(tmp_path / "v.nii.gz")
    assert ma.total_slices == mb.total_slices and a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=tol)
    assert ma.spacing == mb.spacing and ma.position == mb.position
    np.testing.assert_allclose(ma.orientation, mb.orientation, atol=1e-7)
    assert a.shape != vol.shape or not np.allclose(a, vol, atol=tol)  # none is stored in that layout
    start, stop = 3, min(9, mb.total_slices)
    wa, wma = read_mri_window(tmp_path / "s", start, stop)
    wb, wmb = read_mri_window(tmp_path / "v.nii.gz", start, stop)
    np.testing.assert_allclose(wa, b[start:stop], atol=tol)
    assert wma.position == wmb.position and wma.window == (start, stop)


def test_series_with_one_pixel_spacing_value(series) -> None:
    """A PixelSpacing with one value (VM 1, written by some tools) means the same spacing both
    ways; a negative one counts as missing; neither crashes."""
    folder, files, vol = series
    rewrite(files, lambda ds, k: setattr(ds, "PixelSpacing", "0.4"))
    got, meta = read_mri(folder)
    np.testing.assert_array_equal(got, vol)
    assert meta.spacing == (0.7, 0.4, 0.4)
    rewrite(files, lambda ds, k: setattr(ds, "PixelSpacing", ["-0.4", "0.5"]))
    assert read_mri(folder)[1].spacing is None  # as when PixelSpacing is absent


def test_series_per_slice_rescale(series) -> None:
    folder, files, vol = series
    slopes = [1.0 + 0.25 * k for k in range(12)]
    intercepts = [-50.0 * k for k in range(12)]

    def edit(ds, k):
        ds.RescaleSlope, ds.RescaleIntercept = slopes[k], intercepts[k]

    rewrite(files, edit)
    expected = vol * np.asarray(slopes)[:, None, None] + np.asarray(intercepts)[:, None, None]
    np.testing.assert_allclose(read_mri(folder)[0], expected, rtol=1e-6)


def test_series_window_decodes_only_its_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = volume((44, 8, 8))
    write_dicom_series(tmp_path / "s", vol, SPACING, shuffle_names=True, seed=1, origin=(0, 0, 0))
    decoded = []
    real = kdicom._decode
    monkeypatch.setattr(kdicom, "_decode", lambda ds, path, index=None: decoded.append(path) or real(ds, path, index))
    plain = kdicom._plain_pixels  # plain slices are read from their bytes
    monkeypatch.setattr(kdicom, "_plain_pixels", lambda ref: decoded.append(ref.path) or plain(ref))
    got, meta = read_mri_window(tmp_path / "s")  # default [20, 40)
    np.testing.assert_array_equal(got, vol[20:40])
    assert len(decoded) == 20 and len(set(decoded)) == 20
    assert meta.window == (20, 40) and meta.total_slices == 44
    np.testing.assert_allclose(meta.position, (-20 * 0.7, 0, 0))  # slice 20 along the normal (-1, 0, 0)
    with pytest.raises(InputError, match="at least 45"):
        read_mri(tmp_path / "s", window=(0, 40), min_slices=45)
    with pytest.raises(InputError, match="has 44 slice"):
        read_mri_window(tmp_path / "s", 30, 50)


def test_series_errors_name_the_problem_and_files(series) -> None:
    folder, files, vol = series
    order = sorted(range(12), key=lambda k: files[k].name)
    # gap: remove slice 5
    gone = files[5]
    data = gone.read_bytes()
    gone.unlink()
    with pytest.raises(InputError) as err:
        read_mri(folder)
    msg = str(err.value)
    assert "gap of 1.400 mm" in msg and files[4].name in msg and files[6].name in msg and "1 slice(s) missing" in msg
    assert "readers tried: dicom-series" in msg and str(folder) in msg
    gone.write_bytes(data)
    # duplicate: a copy of slice 3 with its own SOP instance
    dup = folder / "copy.dcm"
    shutil.copy(files[3], dup)
    rewrite([dup], lambda ds, k: setattr(ds, "SOPInstanceUID", generate_uid()))
    with pytest.raises(InputError, match=rf"duplicate slice positions: {files[3].name} and copy\.dcm at 2\.100 mm"):
        read_mri(folder)
    dup.unlink()
    # mixed orientation
    rewrite([files[7]], lambda ds, k: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))
    with pytest.raises(InputError, match=f"mixed orientations.*{files[7].name}"):
        read_mri(folder)
    rewrite([files[7]], lambda ds, k: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]))
    # mixed series
    rewrite([files[2]], lambda ds, k: setattr(ds, "SeriesInstanceUID", "1.2.3.4"))
    with pytest.raises(InputError, match=f"mixes 2 series.*1.2.3.4 \\(1 slice\\(s\\), e.g. {files[2].name}"):
        read_mri(folder)
    np.testing.assert_array_equal(read_mri(folder, series_uid="1.2.3.4", min_slices=1)[0], vol[2:3])
    rewrite([files[2]], lambda ds, k: setattr(ds, "SeriesInstanceUID", pydicom.dcmread(files[0]).SeriesInstanceUID))
    # too few
    with pytest.raises(InputError, match="has 12 slice\\(s\\); at least 40 are needed"):
        read_mri(folder, min_slices=40)
    assert order  # the files were never read in name order by the checks above
    np.testing.assert_array_equal(read_mri(folder)[0], vol)


def test_series_ignores_non_dicom_files(series) -> None:
    folder, _, vol = series
    (folder / "notes.txt").write_text("scanner notes")
    (folder / "junk").write_bytes(b"\x00" * 300)  # no suffix, no DICOM preamble
    (folder / ".DS_Store").write_bytes(b"xx")
    (folder / "sub").mkdir()
    shutil.copy(Path(get_testdata_file("MR_small.dcm")).parent / "dicomdirtests" / "DICOMDIR", folder / "DICOMDIR")
    np.testing.assert_array_equal(read_mri(folder)[0], vol)
    empty = folder.parent / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="no DICOM image found.*readme.txt"):
        read_mri(empty)


def test_series_skips_a_report_but_refuses_a_compressed_slice_cut_short(series) -> None:
    """A structured report beside the slices is no slice; a compressed slice whose file ends
    inside its pixel data (pydicom drops that element silently) fails the series, naming it."""
    from pydicom.uid import JPEGLSLossless

    from dicom_factory import MR_SPECTROSCOPY, write_non_image

    folder, files, vol = series
    write_non_image(folder / "1.2.840.113619.2.55.3.9")
    write_non_image(folder / "1.2.840.113619.2.55.3.10", transfer_syntax=JPEGLSLossless)
    write_non_image(folder / "1.2.840.113619.2.55.3.11", transfer_syntax="1.2.840.113619.5.2")
    write_non_image(folder / "1.2.840.113619.2.55.3.12", MR_SPECTROSCOPY, "MR", rows=1)  # Rows, no pixel data
    (folder / "empty.dcm").write_bytes(b"")
    np.testing.assert_array_equal(read_mri(folder)[0], vol)
    compress(files[:1], RLELossless)
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) - 40])
    with pytest.raises(InputError, match="truncated") as err:
        read_mri(folder)
    assert files[0].name in str(err.value)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_series(tmp_path: Path, syntax) -> None:
    vol = volume((6, 64, 48))  # OpenJPEG needs tiles of at least 2**5 px for its default 6 resolutions
    folder = tmp_path / "series"
    files = write_dicom_series(folder, vol, SPACING, shuffle_names=True, seed=5)
    compress(files, syntax)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_mri(folder)[0], vol)
    np.testing.assert_array_equal(read_mri_window(folder, 3, 6)[0], vol[3:6])


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm", "MR_small_bigendian.dcm"])
def test_pydicom_compressed_test_files(name: str) -> None:
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)
    image, meta = read_dicom_image(get_testdata_file(name), any_modality=True)  # MR slices decode as X-rays do
    np.testing.assert_array_equal(image, reference)
    assert meta["photometric"] == "MONOCHROME2" and image.shape == (64, 64)
    with pytest.raises(InputError, match=r"is an MR image \(Modality MR\), not a radiograph"):
        read_xray(get_testdata_file(name))


def test_pydicom_lossy_and_colour_test_files() -> None:
    ds = pydicom.dcmread(get_testdata_file("JPGExtended.dcm"))
    image, _ = read_dicom_image(get_testdata_file("JPGExtended.dcm"), any_modality=True)  # 12-bit JPEG Extended
    assert image.shape == (ds.Rows, ds.Columns)
    rgb = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_gdcm.dcm")).pixel_array.astype(np.float32)
    grey, meta = read_xray(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))
    np.testing.assert_allclose(grey, rgb @ np.array([0.299, 0.587, 0.114], np.float32), rtol=1e-5)
    with pytest.raises(InputError, match="(?s)cannot decode pixel data \\(JPEG Extended"):
        read_dicom_image(get_testdata_file("JPEG-lossy.dcm"), any_modality=True)  # a known-broken file
    with pytest.raises(InputError, match="is a nuclear medicine image"):
        read_xray(get_testdata_file("JPEG-lossy.dcm"))
    # PALETTE COLOR: the stored values are indices into the colour table, which gives the grey
    palette = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    from pydicom.pixels import apply_color_lut

    expected = apply_color_lut(palette.pixel_array, palette).astype(np.float32) @ np.array([0.299, 0.587, 0.114],
                                                                                           np.float32)
    image, meta = read_dicom_image(get_testdata_file("examples_palette.dcm"), any_modality=True)
    assert meta["photometric"] == "PALETTE COLOR"
    np.testing.assert_allclose(image, expected, rtol=1e-5)
    assert not np.allclose(image, palette.pixel_array)


def test_enhanced_multiframe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = volume((10, 6, 8))
    order = [3, 9, 0, 5, 1, 8, 2, 7, 4, 6]
    slopes = [1.0 + k for k in range(10)]
    intercepts = [float(10 * k) for k in range(10)]
    stored = [np.round(vol[k]) for k in range(10)]
    expected = np.stack([stored[k] * slopes[k] + intercepts[k] for k in range(10)])
    path = write_enhanced_mr(tmp_path / "enh.dcm", expected, (0.7, 0.4, 0.5), frame_order=order, slopes=slopes,
                             intercepts=intercepts, shared_orientation=False)
    got, meta = read_mri(path)
    np.testing.assert_allclose(got, expected)
    assert meta.spacing == (0.7, 0.4, 0.5) and meta.total_slices == 10
    folder = tmp_path / "enh"
    folder.mkdir()
    shutil.copy(path, folder / "IM1")
    decoded = []
    real = kdicom._decode
    monkeypatch.setattr(kdicom, "_decode", lambda ds, p, index=None: decoded.append(index) or real(ds, p, index))
    np.testing.assert_allclose(read_mri_window(folder, 2, 5)[0], expected[2:5])
    assert sorted(decoded) == sorted(order.index(k) for k in (2, 3, 4))  # only those frames


# === NIfTI and .npy MRI ===
def test_nifti_matches_dicom(tmp_path: Path) -> None:
    vol = volume((24, 16, 12), integer=False)
    write_dicom_series(tmp_path / "s", vol, SPACING, origin=(10, -20, 30), shuffle_names=True, seed=2)
    write_nifti(tmp_path / "v.nii.gz", vol, SPACING, origin=(10, -20, 30))
    a, ma = read_mri(tmp_path / "s")
    b, mb = read_mri(tmp_path / "v.nii.gz")
    np.testing.assert_allclose(a, b, atol=np.ptp(vol) / 65535)  # DICOM quantised to 16 bits
    np.testing.assert_allclose(b, vol, rtol=1e-6)
    assert mb.reader == "nifti" and ma.spacing == mb.spacing and ma.position == mb.position
    np.testing.assert_allclose(ma.orientation, mb.orientation, atol=1e-7)
    # a differently stored NIfTI of the same volume (RAS canonical order) reads the same
    canonical = nib.as_closest_canonical(nib.load(tmp_path / "v.nii.gz"))
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    nib.save(canonical, tmp_path / "ras.nii")
    c, mc = read_mri(tmp_path / "ras.nii")
    np.testing.assert_array_equal(c, b)
    assert mc.position == mb.position
    wa, wma = read_mri_window(tmp_path / "s", 5, 9)
    wc, wmc = read_mri_window(tmp_path / "ras.nii", 5, 9)
    np.testing.assert_allclose(wa, wc, atol=np.ptp(vol) / 65535)
    assert wma.position == wmc.position
    flat = nib.Nifti1Image(vol, None)
    flat.set_sform(np.diag([0.7, 0.0, 0.5, 1.0]), code=1)  # no direction for the rows
    flat.set_qform(None, code=0)
    nib.save(flat, tmp_path / "flat.nii.gz")
    with pytest.raises(InputError, match=r"flat.nii.gz.*affine \(sform/qform\) gives no orientation \(a voxel axis"):
        read_mri(tmp_path / "flat.nii.gz")
    with pytest.raises(InputError, match="4-D|3-D"):
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), tmp_path / "t.nii")
        read_mri(tmp_path / "t.nii")


def test_npy_volume_and_image(tmp_path: Path) -> None:
    vol = volume((6, 5, 4), integer=False)
    np.save(tmp_path / "v.npy", vol)
    got, meta = read_mri(tmp_path / "v.npy")
    np.testing.assert_array_equal(got, vol)
    np.testing.assert_array_equal(read_mri_window(tmp_path / "v.npy", 1, 3)[0], vol[1:3])
    assert meta.spacing is None and meta.reader == "npy"
    np.save(tmp_path / "x.npy", vol[0].astype(np.uint16))
    np.testing.assert_array_equal(read_xray(tmp_path / "x.npy")[0], vol[0].astype(np.uint16))
    with pytest.raises(InputError, match="3-D array .*X-ray must be 2-D"):
        read_xray(tmp_path / "v.npy")
    with pytest.raises(InputError, match="1-D array .*must be 3-D"):
        np.save(tmp_path / "w.npy", np.zeros(5))
        read_mri(tmp_path / "w.npy")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="not a plain numeric"):
        read_xray(tmp_path / "o.npy")
    (tmp_path / "junk.npy").write_bytes(b"not an array")  # numpy's own error advised loading it unsafely
    (tmp_path / "dumped.npy").write_bytes(pickle.dumps([1, 2]))
    for name in ("junk.npy", "dumped.npy"):
        with pytest.raises(InputError, match=r"not a \.npy file \(it does not start with NumPy's header\)") as e:
            read_mri(tmp_path / name)
        assert "pickle" not in str(e.value)
    bad = vol.copy()
    bad[2, 1, 1] = np.inf
    np.save(tmp_path / "inf.npy", bad)
    with pytest.raises(InputError, match="1 NaN/Inf value"):
        read_mri(tmp_path / "inf.npy")
    np.save(tmp_path / "empty.npy", np.zeros((0, 4)))
    with pytest.raises(InputError, match="empty"):
        read_xray(tmp_path / "empty.npy")
    np.save(tmp_path / "garbled.npy", np.zeros((4, 4), np.float32))
    data = bytearray((tmp_path / "garbled.npy").read_bytes())
    data[data.index(b"}")] = ord("{")  # the header's dict, which numpy tokenizes, never closed
    (tmp_path / "garbled.npy").write_bytes(bytes(data))
    with pytest.raises(InputError, match="not a plain numeric .npy array \\(TokenError") as e:
        read_xray(tmp_path / "garbled.npy")
    assert e.value.path == str(tmp_path / "garbled.npy")


# === X-ray images ===
def test_png_tiff_jpeg(tmp_path: Path) -> None:
    img16 = (np.arange(30 * 40).reshape(30, 40) * 50).astype(np.uint16)
    got, meta = read_xray(write_png(tmp_path / "a.png", img16, bits=16))
    np.testing.assert_array_equal(got, img16)
    assert meta.reader == "image" and got.dtype == np.float32
    cv2.imwrite(str(tmp_path / "b.tif"), img16)
    np.testing.assert_array_equal(read_xray(tmp_path / "b.tif")[0], img16)
    bgr = np.random.default_rng(0).integers(0, 256, size=(20, 24, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    expected = bgr[..., ::-1].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(read_xray(tmp_path / "c.png")[0], expected, rtol=1e-5)
    grey8 = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))
    cv2.imwrite(str(tmp_path / "d.jpg"), grey8, [cv2.IMWRITE_JPEG_QUALITY, 100])
    jpeg, _ = read_xray(tmp_path / "d.jpg")
    assert jpeg.shape == grey8.shape and np.abs(jpeg - grey8).max() <= 4
    (tmp_path / "e.png").write_bytes(b"not a png at all")
    with pytest.raises(InputError, match="not a valid PNG.*readers tried: image"):
        read_xray(tmp_path / "e.png")


def test_half(tmp_path: Path) -> None:
    img = np.arange(4 * 7, dtype=np.float32).reshape(4, 7)
    np.save(tmp_path / "x.npy", img)
    left, meta = read_xray(tmp_path / "x.npy", half="left")
    right, _ = read_xray(tmp_path / "x.npy", half="right")
    np.testing.assert_array_equal(left, img[:, :3])
    np.testing.assert_array_equal(right, img[:, 4:])
    assert meta.half == "left" and meta.shape == (4, 3)
    with pytest.raises(InputError, match="half must be"):
        read_xray(tmp_path / "x.npy", half="middle")


def test_declared_size_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kdicom, "_decode", lambda *a, **k: pytest.fail("pixels decoded"))
    huge = write_declared_huge_dicom(tmp_path / "huge.dcm")
    with pytest.raises(InputError, match="65535x65535 pixels .*max_pixels"):
        read_xray(huge)
    folder = tmp_path / "series"
    folder.mkdir()
    shutil.copy(huge, folder / "a.dcm")
    with pytest.raises(InputError, match="65535x65535"):
        read_mri(folder)
    png = write_png_header_only(tmp_path / "huge.png", 65535, 65535)
    with pytest.raises(InputError, match="PNG header declares 65535x65535x1 = 4294836225 pixel values"):
        read_xray(png)
    monkeypatch.undo()
    small = write_dicom_xray(tmp_path / "small.dcm", np.ones((8, 8)))
    with pytest.raises(InputError, match="limit of 50"):
        read_xray(small, max_pixels=50)
    cv2.imwrite(str(tmp_path / "t.tiff"), np.ones((8, 9), np.uint16))
    with pytest.raises(InputError, match="8x9x1 = 72 pixel values, more than the limit of 71"):
        read_xray(tmp_path / "t.tiff", max_pixels=71)
    cv2.imwrite(str(tmp_path / "t.jpg"), np.ones((8, 9), np.uint8))
    with pytest.raises(InputError, match="72 pixel values"):
        read_xray(tmp_path / "t.jpg", max_pixels=71)
    vol = volume((3, 4, 4))
    write_dicom_series(tmp_path / "s", vol)
    with pytest.raises(InputError, match="series declares 3 decoded slice\\(s\\) of 4x4 = 48 pixel values, more "
                                         "than the limit of 40"):
        read_mri(tmp_path / "s", max_pixels=40)
    got, _ = read_mri(tmp_path / "s", window=(0, 2), max_pixels=40)  # only the decoded window counts
    np.testing.assert_array_equal(got, vol[:2])


def test_unknown_and_missing(tmp_path: Path) -> None:
    (tmp_path / "a.bmp").write_bytes(b"BM")
    with pytest.raises(InputError, match="no X-ray reader for this suffix '.bmp'; readers tried: dicom .*image .*npy"):
        read_xray(tmp_path / "a.bmp")
    with pytest.raises(InputError, match="MRI not found"):
        read_mri(tmp_path / "nothing")
    with pytest.raises(InputError, match="no X-ray reader for this folder"):
        read_xray(tmp_path)


def test_meta_holds_no_patient_identifiers(tmp_path: Path) -> None:
    patient = {"PatientName": "Doe^Johnathan", "PatientID": "ID-98765", "PatientBirthDate": "19500101"}
    write_dicom_series(tmp_path / "s", volume((3, 4, 4)), patient=patient, series_description="SAG_3D_DESS_LEFT")
    write_dicom_xray(tmp_path / "x.dcm", np.ones((4, 4)), patient=patient, laterality="R")
    _, vmeta = read_mri(tmp_path / "s")
    _, xmeta = read_xray(tmp_path / "x.dcm")
    text = repr(vmeta.to_dict()) + repr(xmeta.to_dict())
    for value in ("Doe", "98765", "19500101"):
        assert value not in text
    assert vmeta.laterality == "L" and xmeta.laterality == "R"  # laterality from the description / tag


@pytest.mark.slow
def test_oai_sized_series_window_decodes_only_its_slices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """160 slices of 384x384: the window read decodes exactly the 20 files of [20, 40).

    Counts decodes instead of timing them (timings belong in tools/bench_*.py)."""
    vol = np.random.default_rng(0).integers(0, 4000, size=(160, 384, 384)).astype(np.float32)
    write_dicom_series(tmp_path / "s", vol, (0.7, 0.365, 0.365), shuffle_names=True, seed=0)
    decoded: list[str] = []
    real_decode = kdicom._decode

    def counting_decode(ds, path, index=None):
        decoded.append(str(path))
        return real_decode(ds, path, index)

    monkeypatch.setattr(kdicom, "_decode", counting_decode)
    plain = kdicom._plain_pixels  # plain slices are read from their bytes
    monkeypatch.setattr(kdicom, "_plain_pixels", lambda ref: decoded.append(str(ref.path)) or plain(ref))
    full, _ = read_mri(tmp_path / "s")
    assert len(decoded) == 160 and len(set(decoded)) == 160
    decoded.clear()
    win, meta = read_mri_window(tmp_path / "s")
    np.testing.assert_array_equal(full, vol)
    np.testing.assert_array_equal(win, vol[20:40])
    assert len(decoded) == 20 and meta.total_slices == 160


def test_series_without_preamble_or_suffix(tmp_path: Path) -> None:
    """Old files: no 128-byte preamble, no file meta, no suffix (names 000, 001, ...)."""
    vol = volume((5, 4, 4))
    files = write_dicom_series(tmp_path / "s", vol, shuffle_names=True, seed=0)
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(tmp_path / "s" / f"{(3 * i) % 5:03d}", implicit_vr=True, little_endian=True,
                   enforce_file_format=False)
        f.unlink()
    assert (tmp_path / "s" / "000").read_bytes()[128:132] != b"DICM"
    (tmp_path / "s" / "junk").write_bytes(np.random.default_rng(0).bytes(5000))
    np.testing.assert_array_equal(read_mri(tmp_path / "s")[0], vol)


@pytest.mark.parametrize("rescale", [None, (1.0, 0.0), (2.0, -100.0), (1.0, 0.5)])
def test_xray_rescale_as_pydicom_applies_it(tmp_path: Path, rescale: tuple[float, float] | None) -> None:
    """An identity rescale (or none) skips pydicom's float64 round trip: the same values to the
    bit as `apply_modality_lut`, which a real rescale still goes through."""
    from pydicom.pixels import apply_modality_lut

    stored = np.random.default_rng(3).integers(0, 4096, (40, 50)).astype(np.uint16)
    path = write_dicom_xray(tmp_path / "x.dcm", stored)

    def edit(ds: pydicom.Dataset, _: int) -> None:
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            if keyword in ds:
                delattr(ds, keyword)
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescale

    rewrite([path], edit)
    ds = pydicom.dcmread(path)
    expected = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    image, _ = read_xray(path)
    assert image.dtype == np.float32
    np.testing.assert_array_equal(image, expected)
    if rescale == (2.0, -100.0):
        np.testing.assert_array_equal(image, stored.astype(np.float32) * 2 - 100)


def _pydicom_refs(monkeypatch: pytest.MonkeyPatch, path: Path) -> list:
    """`scan_dicom` with every header value converted by pydicom (no raw reading)."""
    with monkeypatch.context() as m:
        m.setattr(kdicom, "_raw_numbers", lambda ds, keyword: None)
        m.setattr(kdicom, "_quick_ref", lambda path, max_pixels: None)
        return kdicom.scan_dicom(path)[0]


@pytest.mark.parametrize("name", ["MR_small.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "CT_small.dcm",
                                  "MR_small_RLE.dcm"])
def test_header_values_read_raw_as_pydicom_converts_them(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DS and US values read from their bytes are pydicom's own, on files of every
    encoding (explicit and implicit VR, big endian, multi-frame)."""
    path = Path(get_testdata_file(name))
    ds = pydicom.dcmread(path)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "RescaleSlope", "RescaleIntercept", "Rows", "Columns", "BitsAllocated", "SamplesPerPixel"):
        raw = kdicom._raw_numbers(pydicom.dcmread(path), keyword)
        if raw is None:
            continue
        value = ds.get(keyword)
        expected = [value] if not isinstance(value, pydicom.multival.MultiValue) else list(value)
        assert list(raw) == expected
        assert [type(v) for v in raw] == [float if isinstance(e, float) else int for e in expected]
    fast, slow = kdicom.scan_dicom(path)[0], _pydicom_refs(monkeypatch, path)
    for a, b in zip(fast, slow):
        assert (a.rows, a.cols, a.slope, a.intercept, a.pixel_spacing, a.thickness) == \
               (b.rows, b.cols, b.slope, b.intercept, b.pixel_spacing, b.thickness)
        np.testing.assert_array_equal(a.position, b.position)
        np.testing.assert_array_equal(a.orientation, b.orientation)


def test_header_values_read_raw_on_odd_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Padding, empty and wrongly numbered values fall back to pydicom: the same slices."""
    write_dicom_series(tmp_path / "s", volume((4, 16, 20)), (2.0, 0.5, 0.5))
    files = sorted((tmp_path / "s").glob("*.dcm"))

    def edit(ds: pydicom.Dataset, i: int) -> None:
        if i == 0:
            ds.RescaleSlope, ds.RescaleIntercept = "2.5", " -10 "
        if i == 1:
            ds.SliceThickness = ""
        if i == 2:
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0]  # five values where six belong: refused

    rewrite(files, edit)
    with pytest.raises(InputError, match="no valid ImagePositionPatient/ImageOrientationPatient"):
        kdicom.scan_dicom(tmp_path / "s")
    rewrite(files[2:3], lambda ds, _: setattr(ds, "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]))
    fast, slow = kdicom.scan_dicom(tmp_path / "s")[0], _pydicom_refs(monkeypatch, tmp_path / "s")
    assert [(r.slope, r.intercept, r.thickness, r.pixel_spacing) for r in fast] == \
           [(r.slope, r.intercept, r.thickness, r.pixel_spacing) for r in slow]
    assert fast[0].slope == 2.5 and fast[0].intercept == -10.0


def _with_sequences(ds: pydicom.Dataset, i: int) -> None:
    """A nested sequence of undefined length and a private element before the geometry."""
    item = pydicom.Dataset()
    item.ReferencedSOPInstanceUID = generate_uid()
    inner = pydicom.Dataset()
    inner.CodeValue = "T1"
    item.PurposeOfReferenceCodeSequence = pydicom.Sequence([inner])
    item.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = pydicom.Sequence([item, pydicom.Dataset()])
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds["ReferencedImageSequence"].value[0]["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    ds.add_new(0x00291010, "OB", b"\x01\x02" * 40)
    ds.RescaleSlope, ds.RescaleIntercept = f"{1 + i / 4:g} ", "-3.5"


@pytest.mark.parametrize("syntax", [pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian])
def test_slice_headers_read_from_bytes_as_pydicom_reads_them(series, syntax: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain slice file's values read from its bytes (`kneetf.io.slice_header`) are those of
    pydicom's path, in both little-endian encodings and past sequences of undefined length;
    only the decoded slices' files are then parsed by pydicom."""
    from kneetf.io.slice_header import read_slice_header

    folder, files, _ = series

    def edit(ds: pydicom.Dataset, i: int) -> None:
        _with_sequences(ds, i)
        ds.file_meta.TransferSyntaxUID = syntax

    rewrite(files, edit)
    assert all(read_slice_header(f, 10**9) is not None for f in files)
    quick, slow = kdicom.scan_dicom(folder)[0], _pydicom_refs(monkeypatch, folder)
    assert all(r.ds is None for r in quick) and all(r.ds is not None for r in slow)
    for a, b in zip(quick, slow):
        assert (a.path, a.rows, a.cols, a.slope, a.intercept, a.pixel_spacing, a.thickness, a.series_uid) == \
               (b.path, b.rows, b.cols, b.slope, b.intercept, b.pixel_spacing, b.thickness, b.series_uid)
        np.testing.assert_array_equal(a.position, b.position)
        np.testing.assert_array_equal(a.orientation, b.orientation)
    got, meta = read_mri_window(folder, 3, 7)
    with monkeypatch.context() as m:
        m.setattr(kdicom, "_quick_ref", lambda path, max_pixels: None)
        want, want_meta = read_mri_window(folder, 3, 7)
    np.testing.assert_array_equal(got, want)
    assert meta == want_meta


def test_slice_headers_left_to_pydicom_when_unusual(series) -> None:
    """Files that are not plain slices go to pydicom's path, which reads or refuses them."""
    from kneetf.io.slice_header import read_slice_header

    folder, files, vol = series
    compress(files[:1], RLELossless)  # encapsulated pixel data
    with open(files[1], "ab") as f:  # bytes after the pixel data
        f.write(b"\0" * 8)
    rewrite(files[2:3], lambda ds, _: setattr(ds, "NumberOfFrames", 1))
    rewrite(files[3:4], lambda ds, _: setattr(ds, "SliceThickness", ""))
    rewrite(files[4:5], lambda ds, _: setattr(ds, "ImagePositionPatient", [0, 0]))
    big = Path(get_testdata_file("MR_small_bigendian.dcm"))
    assert [read_slice_header(f, 10**9) is None for f in files[:6]] == [True, True, False, True, True, False]
    assert read_slice_header(big, 10**9) is None
    assert read_slice_header(files[5], 16 * 20 - 1) is None  # over max_pixels: pydicom's path refuses it
    with pytest.raises(InputError, match="no valid ImagePositionPatient"):
        read_mri(folder)
    rewrite(files[4:5], lambda ds, k: setattr(ds, "ImagePositionPatient", [0, 0, 0]))
    with pytest.raises(InputError) as e:
        read_mri(folder, max_pixels=16 * 20 - 1)
    assert "max_pixels" in str(e.value)


def test_plain_slices_decoded_from_their_bytes_as_pydicom_decodes_them(series,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Unsigned 16-bit MONOCHROME2 slices are read straight from the pixel data's offset,
    with the values pydicom's `pixel_array` gives (the bits above BitsStored cleared); signed
    or MONOCHROME1 slices are decoded by pydicom."""
    from kneetf.io.slice_header import read_slice_header

    folder, files, _ = series
    rng = np.random.default_rng(3)

    def edit(ds: pydicom.Dataset, i: int) -> None:
        ds.BitsStored, ds.HighBit = 12, 11
        ds.PixelData = rng.integers(0, 2**16, (ds.Rows, ds.Columns), dtype=np.uint16).tobytes()
        if i == 1:
            ds.PixelRepresentation = 1
        if i == 2:
            ds.PhotometricInterpretation = "MONOCHROME1"

    rewrite(files, edit)
    plain = [read_slice_header(f, 10**9).plain_pixels is not None for f in files]
    assert plain == [i not in (1, 2) for i in range(len(files))]
    got, meta = read_mri(folder)
    with monkeypatch.context() as m:
        m.setattr(kdicom, "_quick_ref", lambda path, max_pixels: None)
        want, want_meta = read_mri(folder)
    np.testing.assert_array_equal(got, want)
    assert meta == want_meta
    ref = next(r for r in kdicom.scan_dicom(folder)[0] if r.plain_pixels)
    values = kdicom._plain_pixels(ref)
    np.testing.assert_array_equal(values, pydicom.dcmread(ref.path).pixel_array)
    assert values.max() < 2**12 < np.frombuffer(pydicom.dcmread(ref.path).PixelData, "<u2").max()


def test_a_rescale_that_is_not_a_number_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    write_dicom_xray(path, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    ds = pydicom.dcmread(path)
    ds.RescaleSlope, ds.RescaleIntercept = "2", "0"
    ds["RescaleSlope"]._value = "abc"
    ds.save_as(path)
    with pytest.raises(InputError, match=r"RescaleSlope is not a number. Received: RescaleSlope='abc'"):
        read_xray(path)


def test_a_file_that_is_not_dicom_gets_no_pydicom_api_advice(tmp_path: Path) -> None:
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(InputError, match="empty.dcm.*not a DICOM file") as info:
        read_xray(tmp_path / "empty.dcm")
    assert "force" not in str(info.value)


def test_too_few_slices_and_study_folders_say_what_to_change(tmp_path: Path) -> None:
    vol = volume((6, 8, 8))
    files = write_dicom_series(tmp_path / "study" / "series", vol)
    write_nifti(tmp_path / "v.nii.gz", vol)
    for path in (tmp_path / "study" / "series", tmp_path / "v.nii.gz"):
        with pytest.raises(InputError, match=r"has 6 slice\(s\); the kept slices \[2, 9\) are outside them "
                                             r"\(slice_start 2, num_slices 7: `--slice-start` / `--num-slices`\)"):
            read_mri_window(path, 2, 9)
    with pytest.raises(InputError, match=r"IM00001.dcm: .*has 1 slice\(s\) \(one file of a series\? give the series "
                                         r"folder\)"):
        read_mri_window(files[0], 0, 2)
    with pytest.raises(InputError, match=r"no DICOM image found; sub-folders are not searched: give the series "
                                         r"folder itself, e.g. .*series"):
        read_mri(tmp_path / "study")


def test_series_uid_orientation_and_thin_axial_stacks(tmp_path: Path) -> None:
    """The chosen series' own orientation turns it (not that of a file of another series that
    sorts first); a few axial images are refused, not resliced into slices a few pixels tall;
    a turned series without PixelSpacing has no position (its first voxel's place is unknown)."""
    sag, ax = volume((8, 10, 12)), volume((3, 16, 16))
    sag_files = write_dicom_series(tmp_path / "sag", sag)
    ax_files = write_dicom_series(tmp_path / "ax", ax, orientation=(1, 0, 0, 0, 1, 0))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in ax_files:
        shutil.copy(f, mixed / f"a_{f.name}")
    for f in sag_files:
        shutil.copy(f, mixed / f"b_{f.name}")
    uid = pydicom.dcmread(sag_files[0]).SeriesInstanceUID
    np.testing.assert_array_equal(read_mri(mixed, series_uid=uid)[0], sag)
    with pytest.raises(InputError, match=r"is 3 axial or coronal image\(s\) \(ImageOrientationPatient 1\\0\\0\\0\\1\\0\)"):
        read_mri(tmp_path / "ax")
    with pytest.raises(InputError, match=r"is one axial or coronal image"):
        read_mri(ax_files[0])
    files = write_dicom_series(tmp_path / "rev", volume((4, 6, 8)), (0.7, 0.5, 0.4), orientation=(0, -1, 0, 0, 0, -1))
    rewrite(files, lambda ds, k: delattr(ds, "PixelSpacing"))
    _, meta = read_mri(tmp_path / "rev")
    assert meta.spacing is None and meta.position is None and meta.orientation == (0, 1, 0, 0, 0, -1)


def test_a_ct_scout_is_a_radiograph_and_a_ct_slice_is_not(tmp_path: Path) -> None:
    image = (volume((1, 32, 40))[0]).astype(np.uint16)
    path = write_dicom_xray(tmp_path / "scout.dcm", image)
    ds = pydicom.dcmread(path)
    ds.Modality = "CT"
    ds.save_as(path)
    with pytest.raises(InputError, match=r"scout.dcm: .*is a CT image \(Modality CT\), not a radiograph"):
        read_xray(path)
    ds = pydicom.dcmread(path)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(path)
    np.testing.assert_array_equal(read_xray(path)[0], image)


def test_a_report_is_no_image_however_its_header_declares_its_class(tmp_path: Path) -> None:
    """A report declares its SOP class in the dataset, in the file meta or in both, at times
    with a value repeated (VM 2): each way it is no image, and named by its class. A class that
    disagrees with an image storage class, or an image class without pixel data, stays an image
    whose pixels are missing."""
    from dicom_factory import BASIC_TEXT_SR, GRAYSCALE_PRESENTATION_STATE, write_non_image
    from kneetf.io.dicom import missing_image, not_an_image, sop_class_name
    from kneetf.io.oai import xray_header

    def report(name: str, **change: object) -> Path:
        path = write_non_image(tmp_path / name)
        ds = pydicom.dcmread(path)
        for keyword, value in change.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
        return path

    reports = {"repeated": report("repeated", SOPClassUID=[BASIC_TEXT_SR, BASIC_TEXT_SR]),
               "two reports": report("two", SOPClassUID=[BASIC_TEXT_SR, GRAYSCALE_PRESENTATION_STATE]),
               "meta only": report("meta", SOPClassUID=None)}
    for what, path in reports.items():
        ds = kdicom.read_header(path)
        assert not_an_image(ds), what
        assert sop_class_name(ds) == "Basic Text SR Storage", what
        assert missing_image(ds) == "DICOM file holds no image (no PixelData)", what
        assert xray_header(path) == ("no image", "not an image: Basic Text SR Storage, without pixel data"), what
    ct = "1.2.840.10008.5.1.4.1.1.2"
    for what, path in {"report and image": report("mixed", SOPClassUID=[BASIC_TEXT_SR, ct]),
                       "image": report("image", SOPClassUID=ct, Rows=8, Columns=8)}.items():
        ds = kdicom.read_header(path)
        assert not not_an_image(ds), what
        assert "without its pixel data" in str(missing_image(ds)), what
    private = kdicom.read_header(write_non_image(tmp_path / "private", "1.2.3.4"))
    assert not_an_image(private) and sop_class_name(private) == "a DICOM object"
