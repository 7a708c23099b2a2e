"""`kneetf prepare` throughput on OAI-sized inputs: pairs per second with 1 and 2 workers.

Each pair is a 160-slice 384x384 DICOM MR series (shuffled file names) and a 2000x2500
DICOM X-ray, the sizes of an OAI SAG_3D_DESS series and a knee radiograph; the knee ROI is
found by the classical fallback, as with no boxes CSV. `--distinct` pairs are generated and
the manifest lists them `--pairs` times in all (distinct ids), so the benchmark measures
decoding and preprocessing, not file generation.

    python tools/bench_prepare.py                       # 2 distinct pairs, 16 rows, workers 1 and 2
    python tools/bench_prepare.py --pairs 32 --workers 1,2
    python tools/bench_prepare.py --roi classical,builtin --pairs 0    # ROI time per image only

`--roi` also times each ROI source on one X-ray at a time (as a prepare worker calls it):
the OAI-sized X-ray and a 500 x 600 radiograph of the `clinic` style (`kneetf.data.radiograph`).
`tools/bench_roi.py` times them on every held-out radiograph set, with their found-rates.

Prints a table and one final line `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


#: the X-rays: the `oai` radiograph style (`kneetf.data.radiograph`) at a fixed OAI size and spacing
XRAY_SIZE, XRAY_MM, XRAY_SEED = (2000, 2500), 0.14, 7


def make_inputs(root: Path, distinct: int, seed: int = 0) -> list[tuple[str, str]]:
    """Write `distinct` OAI-sized pairs under root; returns (xray, mri) relative paths."""
    import dataclasses

    from kneetf.data.radiograph import STYLES, simulate
    from kneetf.io.writers import write_dicom_series, write_dicom_xray

    rng = np.random.default_rng(seed)
    style = dataclasses.replace(STYLES["oai"], name="bench", size=XRAY_SIZE, pixel_mm=(XRAY_MM, XRAY_MM))
    pairs = []
    for i in range(distinct):
        zz, yy, xx = np.mgrid[0:160, 0:384, 0:384].astype("float32")
        volume = 300 + 200 * np.sin(xx / 40 + i) * np.cos(yy / 50) + 50 * np.sin(zz / 20)
        volume += rng.normal(0, 20, volume.shape).astype("float32")
        write_dicom_series(root / f"mri{i}", np.clip(volume, 0, None), (0.7, 0.365, 0.365), shuffle_names=True,
                           rng=rng, series_description="SAG_3D_DESS_RIGHT")
        radiograph = simulate(XRAY_SEED, i, style)  # a knee the classical ROI finds
        write_dicom_xray(root / f"xray{i}.dcm", radiograph.presentation().astype("uint16"),
                         pixel_spacing=XRAY_MM)
        pairs.append((f"xray{i}.dcm", f"mri{i}"))
    return pairs


def write_manifest(root: Path, pairs: list[tuple[str, str]], rows: int, name: str = "manifest.csv") -> Path:
    path = root / name
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "xray", "mri", "side", "split"])
        for k in range(rows):
            x, m = pairs[k % len(pairs)]
            w.writerow([f"case{k:04d}", x, m, "right", "train"])
    return path


def roi_times(sources: list[str], images: dict[str, np.ndarray], repeat: int = 5) -> list[dict]:
    """Milliseconds per image of each ROI source (`classical`, `builtin` or a detector .keras),
    one image per call after a warm-up call."""
    rows = []
    for name in sources:
        if name == "classical":
            from kneetf.preprocess.roi import ClassicalRoi

            source = ClassicalRoi()
        else:
            from kneetf.preprocess.roi_detector import DetectorRoi

            source = DetectorRoi.load(name)
        for label, image in images.items():
            try:
                source.box_for("warm-up", image)
            except Exception:  # a fallback that reports a failure still spent its time
                pass
            t = time.perf_counter()
            for _ in range(repeat):
                try:
                    source.box_for("x", image)
                except Exception:
                    pass
            ms = 1000.0 * (time.perf_counter() - t) / repeat
            rows.append({"source": name, "image": label, "ms_per_image": round(ms, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=16, help="manifest rows to prepare per measurement")
    ap.add_argument("--distinct", type=int, default=2, help="distinct generated pairs")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--keep", help="keep the generated inputs in this folder")
    ap.add_argument("--roi", default="", help="comma-separated ROI sources to time per image: classical, builtin "
                                              "or a detector .keras (default: none)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from kneetf.data.sources import prepare_manifest

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kneetf-bench-prepare-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pairs = make_inputs(root, args.distinct)
    manifest = write_manifest(root, pairs, args.pairs)
    gen_s = time.perf_counter() - t0
    if args.pairs > 0:  # warm-up (TensorFlow's first ops, the page cache): not the first measurement's cost
        prepare_manifest(write_manifest(root, pairs, len(pairs), "warmup.csv"), root / "cache-warm", workers=0,
                         progress=False)
    rows = []
    for workers in (int(w) for w in args.workers.split(",") if args.pairs > 0):
        out = root / f"cache-w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        result = prepare_manifest(manifest, out, workers=workers, progress=False)
        dt = time.perf_counter() - t
        rows.append({"workers": workers, "pairs": result.total, "errors": len(result.errors), "seconds": round(dt, 2),
                     "pairs_per_s": round(result.total / dt, 3)})
    print(f"inputs: {args.distinct} distinct pair(s) of a 160x384x384 DICOM series + 2000x2500 DICOM X-ray "
          f"(generated in {gen_s:.1f} s), {args.pairs} manifest rows, classical ROI")
    print(f"{'workers':>7s} {'pairs':>6s} {'errors':>6s} {'seconds':>8s} {'pairs/s':>8s}")
    for r in rows:
        print(f"{r['workers']:7d} {r['pairs']:6d} {r['errors']:6d} {r['seconds']:8.2f} {r['pairs_per_s']:8.3f}")
    roi_rows = []
    if args.roi:
        from kneetf.data.radiograph import simulate
        from kneetf.io.readers import read_xray

        images = {"2000x2500 (OAI-sized)": read_xray(root / pairs[0][0])[0],
                  "500x600 clinic-style": simulate(9101, 0, "clinic").presentation()}
        roi_rows = roi_times(args.roi.split(","), images)
        print(f"\nROI time per image, one image per call ({os.cpu_count()} CPUs)")
        print(f"{'source':<24}{'image':<24}{'ms/image':>9}")
        for r in roi_rows:
            print(f"{r['source']:<24}{r['image']:<24}{r['ms_per_image']:>9.1f}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print("RESULT " + json.dumps({"bench": "prepare", "rows": rows, "roi": roi_rows, "cpus": os.cpu_count()}))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
