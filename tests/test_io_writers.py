"""kneetf.io.writers: DICOM series / X-ray, NIfTI and PNG files checked with pydicom, nibabel, cv2."""
from __future__ import annotations

from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest

from dicom_factory import volume
from kneetf.errors import InputError
from kneetf.io.dicom import DEFAULT_ORIENTATION, slice_normal
from kneetf.io.readers import read_mri, read_xray
from kneetf.io.writers import (DERIVED_COMMENT, DX_IMAGE_STORAGE, MR_IMAGE_STORAGE, quantize_uint16,
                               write_dicom_series, write_dicom_xray, write_nifti, write_png)


def test_dicom_series_geometry_and_modules(tmp_path: Path) -> None:
    vol = volume((6, 8, 10), integer=False)
    origin = (5.0, -12.5, 40.0)
    files = write_dicom_series(tmp_path / "s", vol, (0.7, 0.3, 0.4), origin=origin, series_description="SAG test")
    assert [f.name for f in files] == [f"IM{k:05d}.dcm" for k in range(1, 7)]
    normal = slice_normal(DEFAULT_ORIENTATION)
    np.testing.assert_allclose(normal, [-1, 0, 0])
    dss = [pydicom.dcmread(f) for f in files]
    for k, (f, ds) in enumerate(zip(files, dss)):
        assert f.read_bytes()[128:132] == b"DICM"  # preamble + file meta
        assert ds.file_meta.MediaStorageSOPClassUID == MR_IMAGE_STORAGE == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "MR" and ds.InstanceNumber == k + 1
        np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient],
                                   np.asarray(origin) + k * 0.7 * normal, atol=1e-6)
        assert [float(v) for v in ds.ImageOrientationPatient] == list(DEFAULT_ORIENTATION)
        assert [float(v) for v in ds.PixelSpacing] == [0.3, 0.4]
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 0.7
        assert (ds.Rows, ds.Columns, ds.BitsAllocated, ds.PixelRepresentation) == (8, 10, 16, 0)
        assert ds.PatientName == "Anonymous" and ds.PatientID == "ANON"
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY"]
        # stored * slope + intercept reproduces the floats to within half a quantum
        value = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.abs(value - vol[k]).max() <= float(ds.RescaleSlope) * 0.5 + 1e-6
    assert len({ds.SOPInstanceUID for ds in dss}) == 6
    assert len({(ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID) for ds in dss}) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_dicom_series_integer_volume_is_exact(tmp_path: Path) -> None:
    vol = volume((3, 5, 4), integer=True)
    files = write_dicom_series(tmp_path / "s", vol)
    ds = pydicom.dcmread(files[2])
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, 0.0)
    np.testing.assert_array_equal(ds.pixel_array, vol[2])


def test_dicom_series_patient_derived_and_shuffle(tmp_path: Path) -> None:
    vol = volume((8, 4, 4))
    files = write_dicom_series(tmp_path / "s", vol, patient={"PatientName": "Doe^Jane", "PatientID": "P1"},
                               derived=True, shuffle_names=True, seed=3)
    again = write_dicom_series(tmp_path / "t", vol, shuffle_names=True, seed=3)
    assert [f.name for f in files] == [f.name for f in again]  # seeded
    assert sorted(f.name for f in files) != [f.name for f in files]  # name order is not slice order
    ds = pydicom.dcmread(files[0])
    assert ds.PatientName == "Doe^Jane" and ds.PatientID == "P1"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert ds.ImageComments == DERIVED_COMMENT
    with pytest.raises(ValueError, match="DICOM keywords"):
        write_dicom_series(tmp_path / "u", vol, patient={"name": "x"})


def test_dicom_series_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    good = write_dicom_series(out / "s", volume((3, 4, 4)))
    bad = volume((3, 4, 4), integer=False)
    bad[1, 2, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        write_dicom_series(out / "s", bad)
    import kneetf.io.writers as writers

    calls = []
    real_save = writers._save

    def failing_save(ds, path):  # the disk fills up on the second slice
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real_save(ds, path)

    monkeypatch.setattr(writers, "_save", failing_save)
    with pytest.raises(OSError, match=r"cannot write .*/s: no space left on device$"):  # the series, not its temporary
        write_dicom_series(out / "s", volume((3, 4, 4), seed=1))
    assert len(calls) == 2
    # the old series is untouched and no temporary folder is left behind
    assert sorted(p.name for p in (out / "s").iterdir()) == [f.name for f in good]
    np.testing.assert_array_equal(pydicom.dcmread(good[0]).pixel_array, volume((3, 4, 4))[0])
    assert [p.name for p in out.iterdir()] == ["s"]
    with pytest.raises(InputError, match="3-D"):
        write_dicom_series(out / "x", np.zeros((4, 4)))
    with pytest.raises(InputError, match="spacing"):
        write_dicom_series(out / "x", np.zeros((2, 4, 4)), spacing=(1, 0, 1))


def test_a_dicom_series_replaces_only_an_earlier_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`Reconstruction.save_dicom(folder)` deleted whatever the folder held (the user's notes,
    the input X-ray), and '.' or an existing file failed with an OSError that left debris."""
    series = tmp_path / "s"
    first = write_dicom_series(series, volume((3, 4, 4)))
    second = write_dicom_series(series, volume((2, 4, 4), seed=1))  # an earlier series: replaced
    assert sorted(p.name for p in series.iterdir()) == [f.name for f in second] != [f.name for f in first]
    (series / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"s: exists and holds files that are not a DICOM series kneetf wrote "
                                         r"\(notes.txt\); it is left as it is"):
        write_dicom_series(series, volume((3, 4, 4)))
    assert (series / "notes.txt").read_text() == "mine" and len(list(series.iterdir())) == 3
    (tmp_path / "file.nii.gz").write_bytes(b"mine")
    with pytest.raises(InputError, match="exists and is not a folder"):
        write_dicom_series(tmp_path / "file.nii.gz", volume((3, 4, 4)))
    work = tmp_path / "work"
    write_dicom_series(work, volume((2, 4, 4)))
    monkeypatch.chdir(work)
    with pytest.raises(InputError, match="is the current folder"):
        write_dicom_series(".", volume((3, 4, 4)))
    assert not [p for p in tmp_path.rglob(".tmp-*")]
    assert (tmp_path / "file.nii.gz").read_bytes() == b"mine"


def test_a_folder_whose_replacement_fails_is_put_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the new folder could not be renamed into place the old one stayed in a .tmp-old-*
    folder, and the next run's clean-up deleted it: a failed write had replaced the folder."""
    import kneetf.io.atomic as atomic

    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    real_replace = atomic.os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".tmp-out-"):
            raise OSError("Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="Input/output"):
        with atomic.atomic_path(out, directory=True) as tmp:
            (tmp / "b.txt").write_text("new")
    assert not list(tmp_path.glob(".tmp-*")) and sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert (out / "a.txt").read_text() == "old"


def test_quantize_uint16_covers_range() -> None:
    values = np.linspace(-1234.5, 9876.25, 1001)
    stored, slope, intercept = quantize_uint16(values)
    assert stored.dtype == np.uint16 and stored.min() == 0 and stored.max() >= 65534
    assert np.abs(stored * slope + intercept - values).max() <= slope * 0.51
    assert len(str(slope)) <= 16 and len(str(intercept)) <= 16
    stored, slope, intercept = quantize_uint16(np.array([7.0, 7.0]))
    assert stored.tolist() == [7, 7] and slope == 1.0
    with pytest.raises(ValueError, match="do not fit"):
        quantize_uint16(np.array([0.0, 1e6]), slope=1.0, intercept=0.0)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_xray(tmp_path: Path, photometric: str) -> None:
    image = np.random.default_rng(0).integers(0, 4000, size=(12, 20)).astype(np.float32)
    path = write_dicom_xray(tmp_path / "x.dcm", image, pixel_spacing=(0.15, 0.2), photometric=photometric,
                            laterality="B", view_position="PA")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == DX_IMAGE_STORAGE and ds.Modality == "DX"
    assert ds.PhotometricInterpretation == photometric and ds.ImageLaterality == "B"
    assert [float(v) for v in ds.PixelSpacing] == [0.15, 0.2]
    raw = ds.pixel_array.astype(np.float64)
    expected_raw = image if photometric == "MONOCHROME2" else 65535 - image
    np.testing.assert_array_equal(raw, expected_raw)  # integer image: slope 1, exact
    back, meta = read_xray(path)
    np.testing.assert_array_equal(back, image)
    assert meta.inverted == (photometric == "MONOCHROME1") and meta.pixel_spacing == (0.15, 0.2)
    assert meta.laterality == "B" and meta.view_position == "PA"


def test_dicom_xray_explicit_rescale_and_cr(tmp_path: Path) -> None:
    image = np.array([[-100.0, 0.0], [50.0, 100.0]])
    path = write_dicom_xray(tmp_path / "x.dcm", image, rescale_slope=0.5, rescale_intercept=-100, modality="CR")
    ds = pydicom.dcmread(path)
    assert ds.Modality == "CR" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1"
    np.testing.assert_array_equal(ds.pixel_array, [[0, 200], [300, 400]])
    np.testing.assert_array_equal(read_xray(path)[0], image)
    with pytest.raises(InputError, match="laterality"):
        write_dicom_xray(tmp_path / "y.dcm", image, laterality="left")


@pytest.mark.parametrize("name", ["v.nii.gz", "v.nii"])
def test_nifti_affine_places_voxels_like_dicom(tmp_path: Path, name: str) -> None:
    vol = volume((5, 6, 7), integer=False)
    origin = np.array([3.0, -4.0, 10.0])
    path = write_nifti(tmp_path / name, vol, (0.7, 0.3, 0.4), origin=origin)
    img = nib.load(path)
    assert img.shape == (7, 6, 5)  # (column, row, slice)
    np.testing.assert_allclose(img.get_fdata(), vol.transpose(2, 1, 0), rtol=1e-6)
    assert nib.aff2axcodes(img.affine) == ("P", "I", "R")
    # voxel (c, r, s) sits at origin + c*col*rowdir + r*row*coldir + s*slice*normal (LPS) -> RAS
    c, r, s = 2, 3, 4
    lps = origin + c * 0.4 * np.array([0, 1, 0]) + r * 0.3 * np.array([0, 0, -1]) + s * 0.7 * np.array([-1, 0, 0])
    np.testing.assert_allclose((img.affine @ [c, r, s, 1])[:3], lps * [-1, -1, 1], atol=1e-5)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    with pytest.raises(InputError, match=".nii"):
        write_nifti(tmp_path / "v.img", vol)


def test_slices_first_nifti_keeps_the_array_and_places_voxels_the_same(tmp_path: Path) -> None:
    vol = volume((5, 6, 7), integer=False)
    a = write_nifti(tmp_path / "a.nii.gz", vol, (0.7, 0.3, 0.4), origin=(3.0, -4.0, 10.0))
    b = write_nifti(tmp_path / "b.nii.gz", vol, (0.7, 0.3, 0.4), origin=(3.0, -4.0, 10.0), slices_first=True)
    ia, ib = nib.load(a), nib.load(b)
    assert ib.shape == (5, 6, 7)
    np.testing.assert_allclose(ib.get_fdata(), vol, rtol=1e-6)
    s, r, c = 4, 3, 2  # the same voxel sits at the same place in both files
    np.testing.assert_allclose(ib.affine @ [s, r, c, 1], ia.affine @ [c, r, s, 1], atol=1e-6)
    np.testing.assert_allclose(read_mri(b)[0], read_mri(a)[0])


def test_png_bits(tmp_path: Path) -> None:
    u16 = np.arange(0, 60000, 1000, dtype=np.uint16).reshape(6, 10)
    read = cv2.imread(str(write_png(tmp_path / "a.png", u16, bits=16)), cv2.IMREAD_UNCHANGED)
    assert read.dtype == np.uint16
    np.testing.assert_array_equal(read, u16)
    f = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    read8 = cv2.imread(str(write_png(tmp_path / "b.png", f, bits=8)), cv2.IMREAD_UNCHANGED)
    assert read8.dtype == np.uint8 and read8.min() == 0 and read8.max() == 255
    np.testing.assert_array_equal(read8, np.round((f + 1) / 2 * 255).astype(np.uint8))
    with pytest.raises(InputError, match="bits"):
        write_png(tmp_path / "c.png", f, bits=12)
