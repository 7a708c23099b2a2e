"""`kneetf prepare` throughput on OAI-sized inputs: pairs per second with 1 and 2 workers.

Each pair is a 160-slice 384x384 DICOM MR series (shuffled file names) and a 2000x2500
DICOM X-ray, the sizes of an OAI SAG_3D_DESS series and a knee radiograph; the knee ROI is
found by the classical fallback, as with no boxes CSV. `--distinct` pairs are generated and
the manifest lists them `--pairs` times in all (distinct ids), so the benchmark measures
decoding and preprocessing, not file generation.

    python tools/bench_prepare.py                       # 2 distinct pairs, 16 rows, workers 1 and 2
    python tools/bench_prepare.py --pairs 32 --workers 1,2

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


def make_inputs(root: Path, distinct: int, seed: int = 0) -> list[tuple[str, str]]:
    """Write `distinct` OAI-sized pairs under root; returns (xray, mri) relative paths."""
    from kneetf.io.writers import write_dicom_series, write_dicom_xray

    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(distinct):
        zz, yy, xx = np.mgrid[0:160, 0:384, 0:384].astype("float32")
        volume = 300 + 200 * np.sin(xx / 40 + i) * np.cos(yy / 50) + 50 * np.sin(zz / 20)
        volume += rng.normal(0, 20, volume.shape).astype("float32")
        write_dicom_series(root / f"mri{i}", np.clip(volume, 0, None), (0.7, 0.365, 0.365), shuffle_names=True,
                           rng=rng, series_description="SAG_3D_DESS_RIGHT")
        yy, xx = np.mgrid[0:2000, 0:2500].astype("float32")
        image = 1500 + 800 * np.exp(-((yy - 900 - 40 * i) ** 2) / 8e4) * (np.abs(xx - 1250) < 500)
        image[960 + 40 * i:1000 + 40 * i, 800:1700] -= 600  # a joint space
        image += rng.normal(0, 15, image.shape)
        write_dicom_xray(root / f"xray{i}.dcm", np.clip(image, 0, 4095).astype("uint16"), pixel_spacing=0.14)
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=16, help="manifest rows to prepare per measurement")
    ap.add_argument("--distinct", type=int, default=2, help="distinct generated pairs")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--keep", help="keep the generated inputs in this folder")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from kneetf.data.sources import prepare_manifest

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kneetf-bench-prepare-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pairs = make_inputs(root, args.distinct)
    manifest = write_manifest(root, pairs, args.pairs)
    gen_s = time.perf_counter() - t0
    # warm-up (TensorFlow's first ops, the page cache) so the first measurement is not penalised
    prepare_manifest(write_manifest(root, pairs, len(pairs), "warmup.csv"), root / "cache-warm", workers=0,
                     progress=False)
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
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
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    print("RESULT " + json.dumps({"bench": "prepare", "rows": rows, "cpus": os.cpu_count()}))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
