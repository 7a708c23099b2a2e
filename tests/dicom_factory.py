"""Helpers that write small DICOM/PNG/OAI test fixtures (real files, built with pydicom/kneetf writers)."""
from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from kneetf.io.dicom import DEFAULT_ORIENTATION, slice_normal
from kneetf.io.writers import write_dicom_series, write_dicom_xray

ENHANCED_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def volume(shape: Sequence[int] = (12, 16, 20), seed: int = 0, integer: bool = True) -> np.ndarray:
    """A volume whose every slice differs (slice index encoded in the values) plus noise."""
    rng = np.random.default_rng(seed)
    s, h, w = shape
    base = np.arange(s, dtype=np.float32)[:, None, None] * 100.0
    vol = base + rng.uniform(0, 90, size=(s, h, w)).astype(np.float32)
    return np.round(vol) if integer else vol


def rewrite(files: Sequence[Path], edit: Callable[[pydicom.Dataset, int], None]) -> None:
    """Apply `edit(ds, index)` to each file in place (index = position in `files`)."""
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        edit(ds, i)
        ds.save_as(f, enforce_file_format=True)


def compress(files: Sequence[Path], transfer_syntax: str) -> None:
    """Re-encode each file with a compressed transfer syntax (e.g. RLE Lossless)."""
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(transfer_syntax, generate_instance_uid=False)
        ds.save_as(f, enforce_file_format=True)


def write_enhanced_mr(path: Path, vol: np.ndarray, spacing=(1.0, 0.5, 0.5), *, orientation=DEFAULT_ORIENTATION,
                      origin=(0.0, 0.0, 0.0), frame_order: Sequence[int] | None = None,
                      slopes: Sequence[float] | None = None, intercepts: Sequence[float] | None = None,
                      shared_orientation: bool = True) -> Path:
    """One multi-frame Enhanced MR file holding `vol`; frames stored in `frame_order` (slice
    index of each stored frame), each with its own position and rescale in per-frame groups."""
    n, rows, cols = vol.shape
    frame_order = list(range(n)) if frame_order is None else list(frame_order)
    slopes = [1.0] * n if slopes is None else list(slopes)
    intercepts = [0.0] * n if intercepts is None else list(intercepts)
    normal = slice_normal(orientation)
    stored = np.empty((n, rows, cols), dtype=np.uint16)
    per_frame = []
    for f, k in enumerate(frame_order):
        stored[f] = np.round((vol[k] - intercepts[k]) / slopes[k]).astype(np.uint16)
        item = pydicom.Dataset()
        pos = pydicom.Dataset()
        pos.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[0] * normal]
        item.PlanePositionSequence = DicomSequence([pos])
        val = pydicom.Dataset()
        val.RescaleSlope, val.RescaleIntercept, val.RescaleType = slopes[k], intercepts[k], "US"
        item.PixelValueTransformationSequence = DicomSequence([val])
        if not shared_orientation:
            ori = pydicom.Dataset()
            ori.ImageOrientationPatient = list(orientation)
            item.PlaneOrientationSequence = DicomSequence([ori])
        per_frame.append(item)
    shared = pydicom.Dataset()
    meas = pydicom.Dataset()
    meas.PixelSpacing = [spacing[1], spacing[2]]
    meas.SliceThickness = spacing[0]
    shared.PixelMeasuresSequence = DicomSequence([meas])
    if shared_orientation:
        ori = pydicom.Dataset()
        ori.ImageOrientationPatient = list(orientation)
        shared.PlaneOrientationSequence = DicomSequence([ori])

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_MR_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ENHANCED_MR_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientName, ds.PatientID = "Anonymous", "ANON"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SeriesDescription = "SAG_3D_DESS_RIGHT"
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_declared_huge_dicom(path: Path, rows: int = 65535, cols: int = 65535) -> Path:
    """A valid-looking DICOM whose header claims rows x cols pixels but holds 4 bytes of data."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], list(DEFAULT_ORIENTATION)
    ds.PixelData = b"\0\0\0\0"
    ds.save_as(path, enforce_file_format=True)
    return path


BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
GRAYSCALE_PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"


MR_SPECTROSCOPY = "1.2.840.10008.5.1.4.1.1.4.2"


def write_non_image(path: Path, sop_class: str = BASIC_TEXT_SR, modality: str = "SR", *,
                    transfer_syntax: str = ExplicitVRLittleEndian, rows: int | None = None) -> Path:
    """A DICOM object that is no image (no pixel data): a report or presentation state as PACS
    exports put next to the images, with the same patient and study tags (`rows`: with Rows
    and Columns, as spectroscopy has)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    if rows:
        ds.Rows = ds.Columns = rows
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.SeriesDescription = modality, "9000001", "Bilateral PA Fixed Flexion Knee"
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return path


def cut_compressed_xray(path: Path, image: np.ndarray) -> Path:
    """An RLE-compressed X-ray whose file ends halfway through its pixel data."""
    write_dicom_xray(path, image)
    compress([path], pydicom.uid.RLELossless)
    data = path.read_bytes()
    start = data.index(b"\xe0\x7f\x10\x00OB")
    path.write_bytes(data[: (start + len(data)) // 2])
    return path


def write_png_header_only(path: Path, width: int, height: int, bit_depth: int = 16) -> Path:
    """A PNG whose IHDR claims width x height, followed by a tiny (wrong) IDAT and IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8))
                     + chunk(b"IEND", b""))
    return path


# === A small fake OAI tree ===
OAI_MRI_SHAPE = (40, 32, 32)
OAI_XRAY_SHAPE = (64, 96)


def make_oai_tree(root: Path, participants: Sequence[str], *, visit: str = "00m", release: str = "1.C.2",
                  sides: dict[str, Sequence[str]] | None = None, xray_missing: Sequence[str] = (),
                  extra_rows: Sequence[list[str]] = (), csv_in_visit: bool = False,
                  seed: int = 0) -> dict[str, dict]:
    """Write ROOT/<visit>/<release>/<pid>/<date>/<barcode>/001... and a contents.csv.

    Each participant gets SAG_3D_DESS_<SIDE> series for `sides[pid]` (default both), a
    COR_IW_TSE_RIGHT series (irrelevant, listed only) and a bilateral PA fixed flexion X-ray
    whose left image half is bright (value 3000) and right half dark (1000), unless the
    participant is in `xray_missing`. Returns per participant the written folders.
    """
    rng = np.random.default_rng(seed)
    visit_dir = root / visit
    rel_dir = visit_dir / release
    rows = []
    info: dict[str, dict] = {}
    barcode = 10000000
    for pid in participants:
        info[pid] = {}
        date = "20050101"
        for side in (sides or {}).get(pid, ("LEFT", "RIGHT")):
            barcode += 1
            folder = rel_dir / pid / date / str(barcode)
            vol = rng.integers(0, 500, size=OAI_MRI_SHAPE).astype(np.float32)
            files = write_dicom_series(folder, vol, (0.7, 0.4, 0.4), series_description=f"SAG_3D_DESS_{side}")
            for i, f in enumerate(files):  # OAI names: 001, 002, ... without suffix
                f.rename(folder / f"{i + 1:03d}")
            info[pid][side] = (folder, vol)
            rows.append([f"{release}/{pid}/{date}/{barcode}", pid, date, str(barcode),
                         f"OAI^MR^ENROLLMENT^{side}", f"SAG_3D_DESS_{side}"])
        barcode += 1
        rows.append([f"{release}/{pid}/{date}/{barcode}", pid, date, str(barcode), "OAI^MR^ENROLLMENT^RIGHT",
                     "COR_IW_TSE_RIGHT"])
        if pid not in xray_missing:
            barcode += 1
            folder = rel_dir / pid / "20050102" / str(barcode)
            image = np.full(OAI_XRAY_SHAPE, 1000.0)
            image[:, : OAI_XRAY_SHAPE[1] // 2] = 3000.0
            folder.mkdir(parents=True)
            write_dicom_xray(folder / "001", image, pixel_spacing=0.14, laterality="B", photometric="MONOCHROME1")
            info[pid]["XRAY"] = (folder / "001", image)
            rows.append([f"{release}/{pid}/20050102/{barcode}", pid, "20050102", str(barcode),
                         "Bilateral PA Fixed Flexion Knee", "Bilateral PA Fixed Flexion Knee"])
    rows += [list(r) for r in extra_rows]
    csv_path = (visit_dir if csv_in_visit else rel_dir) / "contents.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Folder", "ParticipantID", "StudyDate", "Barcode", "StudyDescription", "SeriesDescription"])
        writer.writerows(rows)
    return info


# === A fake OAI release with distractor series ===
XRAY_STUDY = "Bilateral PA Fixed Flexion Knee"
#: header tags an X-ray image can carry; None deletes the tag
_UNINFORMATIVE = {"SeriesDescription": None, "BodyPartExamined": None, "ImageLaterality": None, "ViewPosition": None}
KNEE_HEADER = {"SeriesDescription": XRAY_STUDY, "BodyPartExamined": "KNEE", "ImageLaterality": "B",
               "ViewPosition": "PA"}
DISTRACTOR_HEADERS = {
    "hand": {"SeriesDescription": "PA Hand", "BodyPartExamined": "HAND", "ImageLaterality": "R", "ViewPosition": "PA"},
    "hip": {"SeriesDescription": "AP Pelvis", "BodyPartExamined": "PELVIS", "ViewPosition": "AP"},
    "lateral": {"SeriesDescription": "Lateral Left Knee", "BodyPartExamined": "KNEE", "ImageLaterality": "L",
                "ViewPosition": "LL"},
    "localizer": {"SeriesDescription": "Localizer", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
    "mislabelled": {"SeriesDescription": None, "BodyPartExamined": "HAND"},
    "silent": _UNINFORMATIVE,
}
DISTRACTOR_VALUE = 555.0
OTHER_MRI_SEQUENCES = ("COR_IW_TSE_{side}", "SAG_IW_TSE_FS_{side}", "SAG_T2_MAP_{side}", "AX_LOCALIZER_{side}",
                       "COR_MPR_{side}")


def _oai_xray(path: Path, header: dict, value: float | None) -> Path:
    """A bilateral X-ray (left half value + 2000, right half value) or, with value None, a
    flat distractor image; its header tags set (or deleted) as `header` says."""
    image = np.full(OAI_XRAY_SHAPE, DISTRACTOR_VALUE if value is None else value)
    if value is not None:
        image[:, : OAI_XRAY_SHAPE[1] // 2] = value + 2000.0
    path.parent.mkdir(parents=True, exist_ok=True)
    write_dicom_xray(path, image, pixel_spacing=0.14, laterality="B", photometric="MONOCHROME1")

    def edit(ds, _):
        for keyword, tag_value in header.items():
            if tag_value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, tag_value)

    rewrite([path], edit)
    return path


def make_oai_release(root: Path, seed: int = 0) -> tuple[dict[str, tuple[Path, Path, float]], dict[str, list[str]]]:
    """An OAI visit 00m with an MRI release (1.C.2) and an X-ray release (1.E.1), each with its
    own contents.csv (MRI series of 3 slices: enough to pair, not to prepare), where X-ray studies "Bilateral PA Fixed Flexion Knee" also hold hand,
    pelvis, lateral-knee and localizer series, listed and unlisted, labelled and not.

    Returns (expected case id -> (X-ray file, MRI folder, value of the knee's own half),
    participant -> reasons its knees or images must be skipped for).
    """
    rng = np.random.default_rng(seed)
    mri_rows, xray_rows = [], []
    expected: dict[str, tuple[Path, Path, float]] = {}
    unpaired: dict[str, list[str]] = {}
    mri_rel, xray_rel = root / "00m" / "1.C.2", root / "00m" / "1.E.1"
    barcode = 30000000

    def mri(pid: str, sides: Sequence[str]) -> dict[str, Path]:
        nonlocal barcode
        folders = {}
        for side in sides:
            for desc in [f"SAG_3D_DESS_{side}"] + [d.format(side=side) for d in OTHER_MRI_SEQUENCES]:
                barcode += 1
                folder = mri_rel / pid / "20050101" / str(barcode)
                files = write_dicom_series(folder, rng.integers(0, 500, size=(3, 8, 8)).astype(np.float32),
                                           (0.7, 0.4, 0.4), series_description=desc)
                for i, f in enumerate(files):
                    f.rename(folder / f"{i + 1:03d}")
                mri_rows.append([f"{pid}/20050101/{barcode}", pid, "20050101", str(barcode),
                                 f"OAI^MR^ENROLLMENT^{side}", desc])
                if desc.startswith("SAG_3D_DESS"):
                    folders[side] = folder
        return folders

    def study(pid: str, date: str, series: Sequence[tuple[str, dict, float | None]], *,
              listing: str = "subfolders") -> list[Path]:
        """An X-ray study (one barcode) of `series` (listed description, header, value).
        listing "subfolders": each series in <barcode>/00k/001, one row each; "files": all
        images as <barcode>/00k in one folder listed once with the first description."""
        nonlocal barcode
        barcode += 1
        base = xray_rel / pid / date / str(barcode)
        paths = []
        for k, (desc, header, value) in enumerate(series, start=1):
            if listing == "subfolders":
                path = _oai_xray(base / f"{k:03d}" / "001", header, value)
                xray_rows.append([f"{pid}/{date}/{barcode}/{k:03d}", pid, date, str(barcode), XRAY_STUDY, desc])
            else:
                path = _oai_xray(base / f"{k:03d}", header, value)
            paths.append(path)
        if listing == "files":
            xray_rows.append([f"{pid}/{date}/{barcode}", pid, date, str(barcode), XRAY_STUDY, series[0][0]])
        return paths

    def expect(pid: str, folders: dict[str, Path], xray: Path, value: float) -> None:
        for side, folder in folders.items():
            # the patient's right knee is on the image's left half (value + 2000)
            expected[f"{pid}_00m_{side[0]}"] = (xray, folder, value + 2000.0 if side == "RIGHT" else value)

    both = ("LEFT", "RIGHT")
    # one study: a hand as series 001, the knee as 002
    hand, knee = study("9200001", "20050105", [("PA Hand", DISTRACTOR_HEADERS["hand"], None),
                                               (XRAY_STUDY, KNEE_HEADER, 100.0)])
    expect("9200001", mri("9200001", both), knee, 100.0)
    # nothing listed per series: the DICOM headers tell the lateral knee from the bilateral PA
    _, knee = study("9200002", "20050105", [("", DISTRACTOR_HEADERS["lateral"], None), ("", KNEE_HEADER, 200.0)])
    expect("9200002", mri("9200002", both), knee, 200.0)
    # one folder listed once, holding a pelvis and the knee
    _, knee = study("9200003", "20050105", [(XRAY_STUDY, DISTRACTOR_HEADERS["hip"], None),
                                            (XRAY_STUDY, KNEE_HEADER, 300.0)], listing="files")
    expect("9200003", mri("9200003", both), knee, 300.0)
    # a localizer first, and a repeat knee study later on: the first knee is used
    _, knee = study("9200004", "20050105", [("Localizer", DISTRACTOR_HEADERS["localizer"], None),
                                            (XRAY_STUDY, KNEE_HEADER, 400.0)])
    study("9200004", "20050302", [(XRAY_STUDY, KNEE_HEADER, 450.0)])
    expect("9200004", mri("9200004", both), knee, 400.0)
    # only distractors in the knee study
    mri("9200005", both)
    study("9200005", "20050105", [("PA Hand", DISTRACTOR_HEADERS["hand"], None),
                                  ("Lateral Right Knee", DISTRACTOR_HEADERS["lateral"], None)])
    unpaired["9200005"] = ["unpaired MRI", "not a bilateral PA knee X-ray"]
    # listed as the knee, but the header says hand
    mri("9200006", both)
    study("9200006", "20050105", [(XRAY_STUDY, DISTRACTOR_HEADERS["mislabelled"], None)])
    unpaired["9200006"] = ["unpaired MRI", "DICOM header contradicts the listing"]
    # one knee scanned; the knee X-ray in an old-style one-series barcode folder
    _, = study("9200007", "20050105", [(XRAY_STUDY, KNEE_HEADER, 700.0)], listing="files")
    expect("9200007", mri("9200007", ("RIGHT",)), _, 700.0)
    # two silent images in one unnamed series: no way to tell them apart
    mri("9200008", both)
    study("9200008", "20050105", [("", _UNINFORMATIVE, 800.0), ("", _UNINFORMATIVE, None)], listing="files")
    unpaired["9200008"] = ["unpaired MRI", "ambiguous"]

    header = list(("Folder", "ParticipantID", "StudyDate", "Barcode", "StudyDescription", "SeriesDescription"))
    for rel, rows in ((mri_rel, mri_rows), (xray_rel, xray_rows)):
        with open(rel / "contents.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
    return expected, unpaired


__all__ = ["volume", "rewrite", "compress", "write_enhanced_mr", "write_declared_huge_dicom",
           "write_png_header_only", "make_oai_tree", "make_oai_release"]
