"""Mutation fuzzing of the X-ray and MRI readers: every mutated file must give a finite image
or the file's own InputError.

Seed files are written fresh, the same bytes in every run: DICOM X-rays (plain, MONOCHROME1,
rescaled, RLE, JPEG 2000, JPEG-LS, deflated), PNG (8 and 16 bits), JPEG, TIFF and .npy
X-rays, pydicom's own test files (those its package holds), and MRIs (DICOM series plain, RLE
and JPEG 2000, NIfTI, .nii.gz, .npy). Each case mutates one seed, one of:

* a DICOM element set to a hostile value (Rows 0, BitsAllocated 12, NumberOfFrames 10^6, a
  NaN rescale, a PALETTE COLOR interpretation...) or removed, once or twice;
* the file cut at a random byte; random bytes in its first 2 KiB or anywhere; a run of zeros;
* for a series, one or two of its slice files mutated that way.

and reads it in a worker process (`spawn`, one case at a time, 60 s and 6 GiB of address
space each): `read_xray` and `crop_xray` with the classical ROI for an X-ray, `read_mri` or
`read_mri_window` for an MRI. Outcomes: `ok` (a finite image), `refused` (an InputError that
names the input or a file in it) and the failures `unnamed` (an InputError naming neither),
`bad output`, `crash` (any other exception, BaseException included), `timeout` and `died` (the
worker was killed: a segfault, out of memory).

    python tools/fuzz_readers.py --kind xray --cases 1500 --seed 4
    python tools/fuzz_readers.py --kind mri --cases 700 --seed 3 --keep fuzz_out

Prints the outcomes per seed file, each failure with its mutation (the failing files stay in
`--keep`), and one final line `RESULT {json}`; exits 1 when a case failed.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import traceback
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, TimeoutError
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import numpy as np

FAILURES = ("unnamed", "bad output", "crash", "timeout", "died")

#: Hostile values of the elements a decoder reads.
HOSTILE_VALUES: dict[str, list[Any]] = {
    "Rows": [0, 1, 2, 65535, 299],
    "Columns": [0, 1, 65535, 259],
    "BitsAllocated": [0, 1, 8, 12, 24, 32, 64],
    "BitsStored": [0, 1, 7, 17, 32, 40],
    "HighBit": [0, 31, 99],
    "SamplesPerPixel": [0, 2, 3, 4],
    "PixelRepresentation": [1, 2],
    "PhotometricInterpretation": ["PALETTE COLOR", "RGB", "YBR_FULL", "", "MONOCHROME3", "monochrome2"],
    "NumberOfFrames": [0, 2, 1000000, -1],
    "PlanarConfiguration": [1, 5],
    "RescaleSlope": [0, -1, "NaN", "inf", 1e308, "1e-300"],
    "RescaleIntercept": ["nan", "-inf", 1e308],
    "WindowCenter": ["nan", 0, -1e9],
    "WindowWidth": [0, -5, "nan"],
    "PixelSpacing": [[0, 0], [-1, -1], ["nan", "nan"], [1e9, 1e9], [0.1], [0.1, 0.1, 0.1]],
    "ImagerPixelSpacing": [[0, 0], ["inf", 1]],
    "ImagePositionPatient": [[0, 0], ["nan", 0, 0], [1e308, 0, 0]],
    "ImageOrientationPatient": [[0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], [1, 0, 0]],
    "SliceThickness": [0, -1, "nan"],
    "ImageLaterality": ["X", "LR", ""],
    "PixelPaddingValue": [0, 65535, -1],
    "VOILUTFunction": ["SIGMOID", "BOGUS"],
}
#: pydicom's own test files that its package holds (none is downloaded)
PYDICOM_TEST_FILES = ("CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
                      "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "693_J2KI.dcm",
                      "GDCMJ2K_TextGBR.dcm", "JPEG-lossy.dcm", "JPGExtended.dcm", "SC_rgb_rle.dcm",
                      "SC_rgb_small_odd.dcm", "SC_rgb_jpeg_gdcm.dcm", "SC_jpeg_no_color_transform.dcm", "image_dfl.dcm",
                      "rtdose.dcm", "ExplVR_BigEndNoMeta.dcm", "no_meta.dcm")


# === Seeds ===
def _knee(rows: int = 300, cols: int = 260) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:rows, :cols]
    image = 800 + 600 * np.exp(-(((x - cols / 2) / (cols / 6)) ** 2)) - 400 * (np.abs(y - rows / 2) < 4)
    return np.clip(image + rng.normal(0, 20, image.shape), 0, 4000).astype(np.uint16)


def _recode(files: list[Path], syntax: str | None = None) -> None:
    """Give each DICOM file UIDs made from its name (the writers draw random ones, and a seed
    must be the same bytes in every run) and, with `syntax`, that transfer syntax."""
    import pydicom
    from pydicom.uid import generate_uid

    for f in files:
        ds = pydicom.dcmread(f)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if keyword in ds:
                setattr(ds, keyword, generate_uid(entropy_srcs=[keyword, f.parent.name, f.name]))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = syntax
        elif syntax:
            ds.compress(syntax, generate_instance_uid=False)
        ds.save_as(f, enforce_file_format=True)


def xray_seeds(folder: Path) -> list[Path]:
    """Write the X-ray seed files into `folder`."""
    import cv2
    from pydicom.data import get_testdata_file
    from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless

    from kneetf.io.writers import write_dicom_xray, write_png

    folder.mkdir(parents=True, exist_ok=True)
    image = _knee()
    seeds = [write_dicom_xray(folder / "plain.dcm", image, pixel_spacing=0.15),
             write_dicom_xray(folder / "mono1.dcm", image, photometric="MONOCHROME1"),
             write_dicom_xray(folder / "rescaled.dcm", image, rescale_slope=0.5, rescale_intercept=-10)]
    _recode(seeds)
    for name, syntax in (("rle", RLELossless), ("j2k", JPEG2000Lossless), ("jpegls", JPEGLSLossless),
                         ("deflated", DeflatedExplicitVRLittleEndian)):
        path = write_dicom_xray(folder / f"{name}.dcm", image)
        _recode([path], syntax)
        seeds.append(path)
    for name in PYDICOM_TEST_FILES:
        source = get_testdata_file(name, download=False)
        if source:
            seeds.append(folder / name)
            seeds[-1].write_bytes(Path(source).read_bytes())
    seeds.append(write_png(folder / "16bit.png", image))
    for name in ("8bit.png", "8bit.jpg"):
        cv2.imwrite(str(folder / name), (image // 16).astype(np.uint8))
        seeds.append(folder / name)
    cv2.imwrite(str(folder / "16bit.tif"), image)
    np.save(folder / "float.npy", image.astype(np.float32))
    return seeds + [folder / "16bit.tif", folder / "float.npy"]


def mri_seeds(folder: Path) -> list[Path]:
    """Write the MRI seed files and folders into `folder`."""
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from kneetf.io.writers import write_dicom_series, write_nifti

    folder.mkdir(parents=True, exist_ok=True)
    volume = np.random.default_rng(0).integers(0, 1000, (24, 40, 36)).astype(np.float32)
    spacing = (0.7, 0.36, 0.36)
    seeds = []
    for name, syntax in (("series", None), ("series_rle", RLELossless), ("series_j2k", JPEG2000Lossless)):
        _recode(write_dicom_series(folder / name, volume, spacing, shuffle_names=True, seed=1), syntax)
        seeds.append(folder / name)
    seeds += [write_nifti(folder / "volume.nii.gz", volume, spacing=spacing),
              write_nifti(folder / "volume.nii", volume, spacing=spacing)]
    np.save(folder / "volume.npy", volume)
    return seeds + [folder / "volume.npy"]


# === Mutations ===
def mutate_file(source: Path, target: Path, rng: random.Random) -> str:
    """Write a mutated copy of the file `source` to `target` -> what was done."""
    import pydicom

    kind = rng.choice(["cut", "bytes in the header", "bytes anywhere", "element", "element", "two elements",
                       "zeros"])
    if kind.endswith(("element", "elements")) and source.suffix == ".dcm":
        try:
            ds = pydicom.dcmread(source, force=True)
            done = []
            for _ in range(2 if kind == "two elements" else 1):
                keyword = rng.choice(sorted(HOSTILE_VALUES))
                if rng.random() < 0.1:
                    if keyword in ds:
                        del ds[keyword]
                    done.append(f"no {keyword}")
                else:
                    value = rng.choice(HOSTILE_VALUES[keyword])
                    setattr(ds, keyword, value)
                    done.append(f"{keyword}={value!r}")
            ds.save_as(target, enforce_file_format=False)
            return "; ".join(done)
        except Exception:  # noqa: BLE001 - a value pydicom will not write: cut the file instead
            kind = "cut"
    data = bytearray(source.read_bytes())
    if kind != "zeros" and not kind.startswith("bytes"):
        cut = rng.randrange(0, len(data))
        target.write_bytes(bytes(data[:cut]))
        return f"cut at byte {cut} of {len(data)}"
    if kind == "zeros":
        start, n = rng.randrange(0, len(data)), rng.randrange(1, 400)
        data[start:start + n] = bytes(len(data[start:start + n]))
        target.write_bytes(bytes(data))
        return f"{n} zeros at byte {start}"
    end = min(len(data), 2048) if kind == "bytes in the header" else len(data)
    where = sorted(rng.randrange(0, end) for _ in range(rng.randrange(1, 8)))
    for i in where:
        data[i] = rng.randrange(256)
    target.write_bytes(bytes(data))
    return f"random bytes at {where}"


def mutate(source: Path, target: Path, rng: random.Random) -> str:
    """A mutated copy of a seed file, or of a series folder with one or two slices mutated."""
    if not source.is_dir():
        return mutate_file(source, target, rng)
    shutil.copytree(source, target)
    files = sorted(target.iterdir())
    done = []
    for _ in range(rng.choice([1, 1, 2])):
        f = rng.choice(files)
        original = f.with_name(f"original_{f.name}")
        f.rename(original)
        done.append(f"{f.name}: {mutate_file(original, f, rng)}")
        original.unlink()
    return "; ".join(done)


# === Reading, in a worker ===
def _limit_memory(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def read_case(kind: str, path: str, window: bool) -> dict[str, Any]:
    """Read one mutated input as kneetf does -> its outcome (run in a worker process)."""
    try:
        from kneetf.errors import InputError

        try:
            if kind == "xray":
                from kneetf.config import PreprocessConfig
                from kneetf.io.readers import read_xray
                from kneetf.preprocess.xray import crop_xray

                image, meta = read_xray(path)
                out = crop_xray(image, PreprocessConfig(), "classical", source=path,
                                meta={"pixel_spacing": meta.pixel_spacing}).xray
                good = out.ndim == 3 and out.shape[2] == 1
            else:
                from kneetf.io.readers import read_mri, read_mri_window

                out = read_mri_window(path, 4, 20)[0] if window else read_mri(path)[0]
                good = out.ndim == 3
            good = good and min(out.shape) > 0 and bool(np.isfinite(out).all())
            return {"outcome": "ok" if good else "bad output", "shape": list(out.shape)}
        except InputError as e:
            return {"outcome": "refused" if path in str(e) else "unnamed", "message": str(e)[:300]}
    except BaseException as e:  # noqa: BLE001 - what the fuzzing looks for
        return classify_crash(e)


def classify_crash(error: BaseException) -> dict[str, Any]:
    """The outcome of an exception that is not an InputError."""
    return {"outcome": "crash", "error": f"{type(error).__name__}: {str(error)[:300]}",
            "traceback": traceback.format_exc()[-1500:]}


class Worker:
    """One spawned process that reads one case at a time; replaced when it dies or hangs."""

    def __init__(self, memory: int) -> None:
        self.memory = memory
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_limit_memory,
                                   initargs=(self.memory,))

    def run(self, fn: Callable[..., dict[str, Any]], *args: Any, timeout: float) -> dict[str, Any]:
        future = self.pool.submit(fn, *args)
        try:
            return future.result(timeout=timeout)
        except TimeoutError:
            result = {"outcome": "timeout"}
        except BrokenProcessPool:
            result = {"outcome": "died"}
        for process in list(getattr(self.pool, "_processes", {}).values()):
            process.kill()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._start()
        return result

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def fuzz(kind: str, cases: int, seed: int, folder: Path, timeout: float = 60.0,
         memory: int = 6 * 2**30, progress: bool = True) -> dict[str, Any]:
    """Run `cases` mutated inputs of `kind` ("xray" or "mri") -> counts and failures; failing
    inputs stay in `folder`/mutated."""
    rng = random.Random(seed)
    seeds = (xray_seeds if kind == "xray" else mri_seeds)(folder / "seeds")
    mutated = folder / "mutated"
    mutated.mkdir(parents=True, exist_ok=True)
    counts: dict[str, Counter] = defaultdict(Counter)
    failures = []
    worker = Worker(memory)
    try:
        for i in range(cases):
            source = rng.choice(seeds)
            target = mutated / f"{i:05d}_{source.name}"
            mutation = mutate(source, target, rng)
            result = worker.run(read_case, kind, str(target), rng.random() < 0.5, timeout=timeout)
            counts[source.name][result["outcome"]] += 1
            if result["outcome"] in FAILURES:
                failures.append({"input": str(target), "seed": source.name, "mutation": mutation, **result})
                print(f"FAILED {target.name} ({mutation}): {result['outcome']} {result.get('error', '')}",
                      flush=True)
            elif target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
            if progress and (i + 1) % 100 == 0:
                print(f"{i + 1}/{cases} cases", file=sys.stderr, flush=True)
    finally:
        worker.close()
    total = sum(counts.values(), Counter())
    return {"kind": kind, "cases": cases, "seed": seed, "outcomes": dict(total),
            "per_seed": {name: dict(c) for name, c in sorted(counts.items())},
            "failed": sum(total[f] for f in FAILURES), "failures": failures}


def print_table(result: dict[str, Any]) -> None:
    outcomes = ["ok", "refused", *FAILURES]
    print(f"{'seed file':34s}" + "".join(f"{o:>11s}" for o in outcomes))
    for name, counts in result["per_seed"].items():
        print(f"{name:34s}" + "".join(f"{counts.get(o, 0):>11d}" for o in outcomes))
    print(f"{'all':34s}" + "".join(f"{result['outcomes'].get(o, 0):>11d}" for o in outcomes))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=("xray", "mri"), default="xray")
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case")
    ap.add_argument("--keep", help="write seeds and failing inputs into this folder and keep them")
    a = ap.parse_args(argv)
    folder = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="kneetf_fuzz_"))
    try:
        result = fuzz(a.kind, a.cases, a.seed, folder, timeout=a.timeout)
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print_table(result)
    print("RESULT " + json.dumps({k: v for k, v in result.items() if k != "per_seed"}))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
