"""Small hostile files: refused from their headers before anything big is decoded or
inflated, with errors that name the file, while the rest of a batch goes on."""
from __future__ import annotations

import csv
import importlib.util
import io
import sys
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from dicom_factory import compress, volume
from roi_factory import standin_knee
from kneetf.cli.main import main
from kneetf.errors import ConfigError, InputError
from kneetf.io.readers import read_mri_window, read_xray

DEFAULT_MAX_PIXELS = 2**25  # kneetf.io.limits.DEFAULT_MAX_PIXELS, as documented
from kneetf.io.writers import write_dicom_series, write_dicom_xray

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kneetf_bench_hostile", ROOT / "tools" / "bench_hostile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _peak_mib(fn, *args, **kwargs) -> tuple[float, BaseException | None]:
    """Peak Python-tracked allocation (MiB) while `fn` runs, and the exception it raised."""
    tracemalloc.start()
    error = None
    try:
        fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - returned to the test
        error = e
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return peak, error


def test_deflate_bomb_is_refused_from_its_header_without_inflating(bench, tmp_path: Path) -> None:
    bomb = bench.write_deflate_bomb(tmp_path / "bomb.dcm", inflated_bytes=96 * 2**20)
    assert bomb.stat().st_size < 200_000
    peak, error = _peak_mib(read_xray, bomb)
    assert isinstance(error, InputError) and error.path == str(bomb)
    assert "declares 65535x65535 pixels x 1 frame(s) x 1 sample(s) = 4294836225 pixel values" in error.reason
    assert "--max-pixels" in error.reason
    assert peak < 40, f"{peak:.0f} MiB allocated"


def test_deflated_data_may_not_inflate_past_its_header(bench, tmp_path: Path) -> None:
    liar = bench.write_deflate_bomb(tmp_path / "liar.dcm", inflated_bytes=96 * 2**20, rows=64, cols=64)
    peak, error = _peak_mib(read_xray, liar)
    assert isinstance(error, InputError)
    assert "pixel data element declares 100663296 bytes but the header declares 8192 (64x64 pixels)" in error.reason
    assert peak < 40
    padded = bench.write_deflate_bomb(tmp_path / "padded.dcm", inflated_bytes=96 * 2**20, rows=64, cols=64,
                                      declared_length=8192)  # right length, then 96 MiB of trailing zeros
    peak, error = _peak_mib(read_xray, padded)
    assert isinstance(error, InputError) and "inflates past" in error.reason and "decompression bomb" in error.reason
    assert peak < 40


def test_genuine_deflated_files_still_read(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 4000, (300, 200)).astype(np.float32)
    path = write_dicom_xray(tmp_path / "x.dcm", image)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(read_xray(path)[0], image)
    vol = volume((24, 16, 20))
    files = write_dicom_series(tmp_path / "s", vol, (0.7, 0.4, 0.5))
    for f in files:
        ds = pydicom.dcmread(f)
        ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
        ds.save_as(f, enforce_file_format=True)
    np.testing.assert_array_equal(read_mri_window(tmp_path / "s", 2, 22)[0], vol[2:22])
    with pytest.raises(InputError, match="limit of 2000"):
        read_xray(path, max_pixels=2000)


def test_codestream_bigger_than_the_dicom_header_is_not_decoded(bench, tmp_path: Path) -> None:
    liar = bench.write_j2k_liar(tmp_path / "j2k.dcm")
    assert liar.stat().st_size < 4000
    with pytest.raises(InputError, match="the JPEG 2000 codestream of frame 0 holds a 6000x6000 image with 1 "
                                         "component\\(s\\) but the DICOM header declares 64x64") as e:
        read_xray(liar)
    assert e.value.path == str(liar)
    # the same lie in a JPEG baseline frame
    ok, jpeg = cv2.imencode(".jpg", np.zeros((100, 120), np.uint8))
    ds = bench.xray_dataset(64, 64, bits=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.tobytes()])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "jpeg.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="JPEG codestream of frame 0 holds a 100x120 image"):
        read_xray(tmp_path / "jpeg.dcm")
    # and in one slice of a compressed MRI series: the series is refused, naming the file
    vol = volume((30, 64, 64))
    files = write_dicom_series(tmp_path / "s", vol, (0.7, 0.4, 0.5))
    compress(files, JPEG2000Lossless)
    np.testing.assert_array_equal(read_mri_window(tmp_path / "s", 5, 25)[0], vol[5:25])
    import openjpeg

    ds = pydicom.dcmread(files[10])
    ds.PixelData = encapsulate([bytes(openjpeg.encode(np.zeros((600, 600), np.uint16)))])
    ds.save_as(files[10], enforce_file_format=True)
    with pytest.raises(InputError, match=f"{files[10].name}: the JPEG 2000 codestream of frame 0 holds a 600x600"):
        read_mri_window(tmp_path / "s", 5, 25)


def test_codestream_headers() -> None:
    from kneetf.io.headers import codestream_size

    jpeg_ls = b"\xff\xd8\xff\xf7\x00\x0b\x10\x01\x2c\x02\x58\x01\x01\x11\x00"  # SOF55: 300 rows, 600 columns
    assert codestream_size("jpeg", jpeg_ls) == (300, 600, 1)
    import openjpeg

    j2k = bytes(openjpeg.encode(np.zeros((64, 80, 3), np.uint8)))
    assert codestream_size("j2k", j2k) == (64, 80, 3)
    jp2 = bytes(openjpeg.encode(np.zeros((64, 80), np.uint16), codec_format=1))
    assert jp2[4:8] == b"jP  " and codestream_size("j2k", jp2) == (64, 80, 1)
    for kind, data in (("j2k", b"\xff\x4f\xff\x51\x00"), ("jpeg", b"\xff\xd8\xff\xd9"), ("j2k", b"nothing")):
        with pytest.raises(ValueError):
            codestream_size(kind, data)


def test_png_bomb_is_refused_from_its_header(bench, tmp_path: Path) -> None:
    bomb = bench.write_png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 300_000
    peak, error = _peak_mib(read_xray, bomb)
    assert isinstance(error, InputError) and error.path == str(bomb)
    assert (f"PNG header declares 16000x16000x1 = 256000000 pixel values, more than the limit of "
            f"{DEFAULT_MAX_PIXELS}") in error.reason
    assert peak < 40


def test_the_limit_passes_real_detectors_and_can_be_changed(tmp_path: Path) -> None:
    from kneetf.io import limits
    from kneetf.io.limits import ReaderConfig, use_reader_config

    assert limits.DEFAULT_MAX_PIXELS == DEFAULT_MAX_PIXELS
    assert DEFAULT_MAX_PIXELS >= 4300 * 3500 * 2  # a flat-panel detector, with room to spare
    cv2.imwrite(str(tmp_path / "x.png"), np.ones((40, 50), np.uint16))
    assert read_xray(tmp_path / "x.png")[0].shape == (40, 50)
    with use_reader_config(ReaderConfig(max_pixels=1999)):
        with pytest.raises(InputError, match="40x50x1 = 2000 pixel values, more than the limit of 1999"):
            read_xray(tmp_path / "x.png")
        assert read_xray(tmp_path / "x.png", max_pixels=2000)[0].shape == (40, 50)  # an explicit value wins
    assert read_xray(tmp_path / "x.png")[0].shape == (40, 50)
    for bad in (0, -5, 1.5, "lots", True):
        with pytest.raises(ConfigError, match="max_pixels must be a positive integer"):
            ReaderConfig(max_pixels=bad)


@pytest.mark.slow
def test_prepare_skips_hostile_files_and_writes_the_rest(bench, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    write_dicom_series(tmp_path / "mri", rng.uniform(0, 500, (40, 32, 32)).astype("float32"), (0.7, 0.4, 0.4))
    good = write_dicom_xray(tmp_path / "good.dcm", standin_knee(rng, (200, 240))[0])
    bench.write_png_bomb(tmp_path / "bomb.png")
    bench.write_deflate_bomb(tmp_path / "deflate.dcm", inflated_bytes=16 * 2**20)
    bench.write_j2k_liar(tmp_path / "j2k.dcm")
    rows = [("good", good.name), ("png", "bomb.png"), ("deflate", "deflate.dcm"), ("j2k", "j2k.dcm")]
    (tmp_path / "m.csv").write_text("id,xray,mri\n" + "".join(f"{i},{x},mri\n" for i, x in rows))
    assert main(["prepare", str(tmp_path / "m.csv"), "--out", str(tmp_path / "c"), "--workers", "0"]) == 4  # partly
    assert "prepared 1 pair(s)" in capsys.readouterr().out
    with (tmp_path / "c" / "errors.csv").open() as f:
        errors = {r["id"]: r for r in csv.DictReader(f)}
    assert sorted(errors) == ["deflate", "j2k", "png"]
    assert "bomb.png" in errors["png"]["file"] and "256000000 pixel values" in errors["png"]["reason"]
    assert "4294836225 pixel values" in errors["deflate"]["reason"]
    assert "6000x6000" in errors["j2k"]["reason"]
    # --max-pixels: the good X-ray (200x240) is over a limit of 40000
    assert main(["prepare", str(tmp_path / "m.csv"), "--out", str(tmp_path / "c2"), "--workers", "0",
                 "--max-pixels", "40000"]) == 1
    assert ("declares 200x240 pixels x 1 frame(s) x 1 sample(s) = 48000 pixel values, more than the limit of "
            "40000") in (tmp_path / "c2" / "errors.csv").read_text()
    capsys.readouterr()
    assert main(["prepare", str(tmp_path / "m.csv"), "--out", str(tmp_path / "c3"), "--max-pixels", "0"]) == 1
    assert "max_pixels must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["prepare", str(tmp_path / "m.csv"), "--out", str(tmp_path / "c3"), "--max-pixels", "many"])
    assert usage.value.code == 2


@pytest.mark.slow
def test_predict_max_pixels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kneetf.models.kneenet import KneeNet

    KneeNet.from_preset("tiny").save(tmp_path / "model.keras")
    cv2.imwrite(str(tmp_path / "knee.png"), standin_knee(np.random.default_rng(1), (200, 240))[0])
    args = ["predict", "--model", str(tmp_path / "model.keras"), str(tmp_path / "knee.png"), "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b"), "--max-pixels", "40000"]) == 1
    assert "200x240x1 = 48000 pixel values, more than the limit of 40000" in capsys.readouterr().err


@pytest.mark.slow
def test_peak_memory_on_hostile_files(bench, tmp_path: Path) -> None:
    """`tools/bench_hostile.py`: every hostile file is refused and a prepare of one stays
    far below what decoding it would take; predict stays at its baseline (TensorFlow)."""
    out = io.StringIO()
    old, sys.stdout = sys.stdout, out
    try:
        bench.main(["--keep", str(tmp_path / "b")])
    finally:
        sys.stdout = old
    rows = {(r["file"], r["command"]): r for r in __import__("json").loads(
        out.getvalue().rsplit("RESULT ", 1)[1])["rows"]}
    for name in ("deflate", "j2k", "png"):
        for command in ("prepare", "predict"):
            assert rows[(name, command)]["exit"] == 1 and rows[(name, command)]["refused"] == 1
            assert rows[(name, command)]["peak_rss_mib"] <= rows[("normal", command)]["peak_rss_mib"] + 50
        for command in ("prepare", "predict"):  # refused before TensorFlow (or the model) is loaded
            assert rows[(name, command)]["peak_rss_mib"] < 500
    for command in ("prepare", "predict"):  # all files in one run: the hostile ones cost nothing
        assert rows[("all", command)]["exit"] == 4 and rows[("all", command)]["refused"] == 3
        assert rows[("all", command)]["peak_rss_mib"] <= rows[("normal", command)]["peak_rss_mib"] + 50


def test_an_rle_x_ray_whose_segments_overrun_its_rows_is_refused_not_a_decoder_panic(tmp_path: Path) -> None:
    """A corrupt RLE frame that decodes to more bytes than the header's rows and columns hold
    makes pylibjpeg-rle (Rust) panic, which Python sees as a BaseException: the reader turns
    it into the file's InputError, so a batch reports it and goes on with the other files."""
    from pydicom.uid import RLELossless

    path = write_dicom_xray(tmp_path / "overrun.dcm", standin_knee(np.random.default_rng(0), (300, 260))[0])
    compress([path], RLELossless)
    ds = pydicom.dcmread(path)
    ds.Columns = 1
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InputError, match="cannot decode pixel data \\(RLE Lossless\\)") as error:
        read_xray(path)
    assert error.value.path == str(path)


def _garble_vr(path: Path, tag: bytes, vr: bytes, garbled: bytes) -> Path:
    """`path` with the explicit VR of the element `tag` (group, element, little endian) replaced."""
    data = path.read_bytes()
    assert data.count(tag + vr) == 1
    path.write_bytes(data.replace(tag + vr, tag + garbled))
    return path


def test_an_element_pydicom_cannot_convert_is_the_files_malformed_header(tmp_path: Path) -> None:
    """pydicom converts an element when it is first read, deep inside the reading; an unknown
    VR (NotImplementedError there) or a number that does not parse (ValueError) is the file's
    InputError: an X-ray, the slice of a series (named, not only its folder), and an X-ray the
    OAI import classifies, which is unreadable."""
    from kneetf.io.oai import xray_header
    from kneetf.io.readers import read_mri

    image = standin_knee(np.random.default_rng(0), (120, 100))[0]
    xray = _garble_vr(write_dicom_xray(tmp_path / "bits.dcm", image), b"\x28\x00\x00\x01", b"US", b"KS")
    with pytest.raises(InputError, match="malformed DICOM header: NotImplementedError") as error:
        read_xray(xray)
    assert error.value.path == str(xray) and "(0028,0100)" in error.value.reason
    assert xray_header(xray)[0] == "knee"  # its classification reads no BitsAllocated
    modality = _garble_vr(write_dicom_xray(tmp_path / "modality.dcm", image), b"\x08\x00\x60\x00", b"CS", b"Cx")
    verdict, why = xray_header(modality)
    assert verdict == "unreadable" and why.startswith("malformed DICOM header") and "(0008,0060)" in why

    files = write_dicom_series(tmp_path / "series", volume((8, 16, 16)), (1.0, 0.5, 0.5))
    _garble_vr(files[3], b"\x20\x00\x32\x00", b"DS", b"Dl")
    with pytest.raises(InputError, match="malformed DICOM header") as error:
        read_mri(tmp_path / "series")
    assert files[3].name in str(error.value)
    files = write_dicom_series(tmp_path / "thick", volume((8, 16, 16)), (1.0, 0.5, 0.5))
    element = pydicom.dcmread(files[5]).get_item("SliceThickness")  # its raw bytes, as stored
    stored = b"\x18\x00\x50\x00DS" + len(element.value).to_bytes(2, "little")
    data = files[5].read_bytes()
    assert data.count(stored + element.value) == 1
    files[5].write_bytes(data.replace(stored + element.value, stored + b"0a0".ljust(len(element.value))))
    with pytest.raises(InputError, match="malformed DICOM header: ValueError") as error:
        read_mri(tmp_path / "thick")
    assert files[5].name in str(error.value)


def test_a_path_the_system_refuses_to_look_up_is_that_inputs_error(tmp_path: Path) -> None:
    """A name longer than the file system takes raises OSError from `Path.exists`: the
    readers refuse it as their input's error, and a batch reports it beside the good files."""
    from kneetf.inference.batch import collect_inputs
    from kneetf.io.lookup import lookup
    from kneetf.io.readers import read_mri

    long = tmp_path / ("k" * 300 + ".png")
    assert lookup(long) == (None, "File name too long")
    assert lookup(tmp_path / "absent.png") == (None, None) and lookup(tmp_path)[1] is None
    for read, what in ((read_xray, "X-ray"), (read_mri, "MRI")):
        with pytest.raises(InputError, match=f"{what} path cannot be looked up: File name too long") as error:
            read(long)
        assert error.value.path == str(long)
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.full((8, 8), 100, np.uint8))
    inputs, errors = collect_inputs([long, good, tmp_path / "absent.png"])
    assert [i.path for i in inputs] == [good]
    assert [e["reason"] for e in errors] == ["cannot be looked up: File name too long", "does not exist"]
