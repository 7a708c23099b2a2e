"""Peak memory of `kneetf predict` and `kneetf prepare` on small hostile files.

Three files, each a few hundred kilobytes at most, that claim or hide a huge image:

* `deflate.dcm`: a Deflated Explicit VR Little Endian DICOM declaring 65535x65535 pixels whose
  deflated stream inflates to 512 MiB of zeros (about 520 KB on disk);
* `j2k.dcm`: a JPEG 2000 DICOM whose header declares 64x64 pixels but whose codestream (SIZ
  marker) holds a 6000x6000 image (a few hundred bytes);
* `bomb.png`: a 16000x16000 8-bit PNG of zeros (about 250 KB).

Each command runs in a fresh `python -m kneetf.cli.main` process started by a small wrapper
process, whose `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` is the peak RSS of the
command and of every worker it started. `prepare` pairs each hostile X-ray with a small valid
MRI series; `predict` runs a freshly built `tiny` model. A normal OAI-sized DICOM X-ray is
measured too, as the reference, and "all" runs every file in one manifest / one predict.
Both commands load TensorFlow (about 590 MiB of RSS on its own) only once an X-ray is
decoded (the default ROI source, the built-in detector, runs on it): a run of nothing but
refused files never loads it.

    python tools/bench_hostile.py                      # all files, predict and prepare
    python tools/bench_hostile.py --commands prepare --files png

Prints a table and one final line `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

DEFLATE_UID = "1.2.840.10008.1.2.1.99"
_PIXEL_TAG_OW = b"\xe0\x7f\x10\x00OW\x00\x00"


# === Hostile files ===
def xray_dataset(rows: int, cols: int, bits: int = 16):
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX For Presentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    return ds


def write_deflate_bomb(path: str | Path, *, inflated_bytes: int = 512 * 2**20, rows: int = 65535,
                       cols: int = 65535, declared_length: int | None = None) -> Path:
    """A deflated DICOM declaring rows x cols whose pixel data inflates to `inflated_bytes` zeros
    (its pixel data element declares `declared_length` bytes, default all of them)."""
    import io

    path = Path(path)
    ds = xray_dataset(rows, cols)
    ds.file_meta.TransferSyntaxUID = DEFLATE_UID
    ds.PixelData = b"\0\0"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    raw = buf.getvalue()
    meta_end = 144 + struct.unpack("<I", raw[140:144])[0]  # preamble, DICM, group length element
    body = zlib.decompress(raw[meta_end:], -zlib.MAX_WBITS)
    if body[-14:-6] != _PIXEL_TAG_OW:
        raise RuntimeError("unexpected layout of the deflated dataset")
    co = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(2**22)
    with open(path, "wb") as f:
        f.write(raw[:meta_end])
        length = inflated_bytes if declared_length is None else declared_length
        f.write(co.compress(body[:-14] + _PIXEL_TAG_OW + struct.pack("<I", length)))
        left = inflated_bytes
        while left:
            n = min(left, len(chunk))
            f.write(co.compress(chunk[:n]))
            left -= n
        f.write(co.flush())
    return path


def write_j2k_liar(path: str | Path, *, declared: tuple[int, int] = (64, 64),
                   actual: tuple[int, int] = (6000, 6000)) -> Path:
    """A JPEG 2000 Lossless DICOM whose header says `declared` but whose codestream holds `actual`."""
    import openjpeg
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    path = Path(path)
    codestream = openjpeg.encode(np.zeros(actual, np.uint8))
    ds = xray_dataset(*declared, bits=8)
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([bytes(codestream)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_png_bomb(path: str | Path, *, width: int = 16000, height: int = 16000) -> Path:
    """An 8-bit grey PNG of zeros, compressed row by row (little memory to write it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = Path(path)
    co = zlib.compressobj(9)
    row = bytes(width + 1)  # filter byte 0 + the row
    parts = []
    rows_per_call = max(1, 2**22 // len(row))
    for start in range(0, height, rows_per_call):
        parts.append(co.compress(row * min(rows_per_call, height - start)))
    parts.append(co.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
    return path


def write_normal_xray(path: str | Path) -> Path:
    """A plausible OAI-sized 16-bit DICOM knee X-ray (the reference): a simulated radiograph
    of the `oai` style (`kneetf.data.radiograph`; 2680x1327 pixels of 0.12 mm)."""
    from kneetf.data.radiograph import simulate
    from kneetf.io.writers import write_dicom_xray

    r = simulate(0, 0, "oai")
    return write_dicom_xray(path, np.clip(r.presentation(), 0, 65535).astype("uint16"),
                            pixel_spacing=tuple(float(v) for v in r.pixel_spacing))


HOSTILE = {"deflate": ("deflate.dcm", write_deflate_bomb), "j2k": ("j2k.dcm", write_j2k_liar),
           "png": ("bomb.png", write_png_bomb), "normal": ("normal.dcm", write_normal_xray)}


# === Measuring ===
_WRAPPER = ("import resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)\n"
            "sys.stdout.write(p.stdout[-4000:])\n"
            "print('\\nPEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode)\n")


def peak_rss(args: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None) -> tuple[float, int, str]:
    """Run `python -m kneetf.cli.main *args` under a fresh wrapper -> (peak RSS MiB over the
    command and its workers, exit code, output tail)."""
    cmd = [sys.executable, "-c", _WRAPPER, sys.executable, "-m", "kneetf.cli.main", *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                         check=True).stdout
    head, _, tail = out.rpartition("PEAK_RSS_KIB")
    kib, code = tail.split()
    return int(kib) / 1024, int(code), head


def make_inputs(root: Path, files: list[str]) -> dict[str, list[Path]]:
    """Hostile files, a small valid MRI series, one manifest per file (and "all": every file
    in one manifest) and a tiny model."""
    from kneetf.io.writers import write_dicom_series

    root.mkdir(parents=True, exist_ok=True)
    paths: dict[str, list[Path]] = {}
    for key in files:
        if key == "all":
            continue
        name, writer = HOSTILE[key]
        paths[key] = [writer(root / name)]
        (root / f"{key}.csv").write_text(f"id,xray,mri,side,split\n{key},{name},mri,right,train\n")
    if "all" in files:
        paths["all"] = [p for k in HOSTILE if k in paths for p in paths[k]]
        (root / "all.csv").write_text("id,xray,mri,side,split\n" + "".join(
            f"{p.stem},{p.name},mri,right,train\n" for p in paths["all"]))
    rng = np.random.default_rng(0)
    write_dicom_series(root / "mri", rng.uniform(0, 500, (40, 32, 32)).astype("float32"), (0.7, 0.4, 0.4))
    from kneetf.models.kneenet import KneeNet

    KneeNet.from_preset("tiny").save(root / "model.keras")
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", default="normal,deflate,j2k,png,all",
                    help="comma-separated: " + ", ".join(HOSTILE) + ", all (every file in one run)")
    ap.add_argument("--commands", default="prepare,predict", help="comma-separated: prepare, predict")
    ap.add_argument("--workers", type=int, default=1, help="prepare's --workers (default 1)")
    ap.add_argument("--extra", default="", help="extra options for both commands, e.g. '--max-pixels 1e8'")
    ap.add_argument("--keep", help="write the inputs into this folder and keep them")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    files = [f for f in args.files.split(",") if f]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kneetf-bench-hostile-"))
    paths = make_inputs(root, files)
    extra = args.extra.split()
    rows = []
    for key in files:
        for command in args.commands.split(","):
            out = root / f"{command}-{key}"
            if command == "prepare":
                cli = ["prepare", str(root / f"{key}.csv"), "--out", str(out), "--workers", str(args.workers),
                       *extra]
            else:
                cli = ["predict", "--model", str(root / "model.keras"), *map(str, paths[key]), "--out", str(out),
                       "--no-progress", *extra]
            mib, code, _output = peak_rss(cli)
            reasons = []
            if (out / "errors.csv").exists():
                with open(out / "errors.csv", newline="") as f:
                    reasons = [r["reason"] for r in csv.DictReader(f)]
            rows.append({"file": key, "bytes": sum(p.stat().st_size for p in paths[key]), "command": command,
                         "peak_rss_mib": round(mib, 1), "exit": code, "refused": len(reasons),
                         "message": reasons[0][:150] if len(reasons) == 1 else ""})
    print(f"{'file':8} {'bytes':>10} {'command':8} {'peak RSS':>11} {'exit':>4} {'refused':>7}  first error")
    for r in rows:
        print(f"{r['file']:8} {r['bytes']:>10} {r['command']:8} {r['peak_rss_mib']:>7.1f} MiB {r['exit']:>4} "
              f"{r['refused']:>7}  {r['message']}")
    print("RESULT " + json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
