"""Knee-ROI benchmark: does an ROI source find the joint on radiographs it was not tuned on?

Scores ROI sources on the held-out simulated radiograph sets of `kneetf.data.radiograph`
(`HELDOUT_SETS`: deterministic seeds, styles training never uses) and/or on a user's folder
of X-rays with a boxes CSV. A box finds the joint when its centre is within 15 % of the true
side and its side within 0.5-2x (`kneetf.preprocess.roi_score`). Per set and source: the
found-rate, median IoU, median centre error (fraction of the side), how many images the
source reported as failed or unsure, the silent misses (wrong and not reported), and the
time per image (one image per call, as `kneetf prepare` calls it, on the machine that runs it).

Sources (`--source`, repeatable): `classical` (the fallback), `builtin` (the packaged
detector), a detector `.keras` file, or a boxes CSV `id,x0,y0,x1,y1` (simulated images have
ids `<set>-<index>`, e.g. `clinic-00007`).

    python tools/bench_roi.py                                       # classical, all held-out sets
    python tools/bench_roi.py --source classical --source roi.keras --sets clinic,oai --n 50
    python tools/bench_roi.py --source roi.keras --data my_xrays/ --truth my_xrays/rois.csv

Prints a table per set and one final line `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclass
class Case:
    id: str
    image: np.ndarray
    truth: Any
    spacing: float | None


# === Sets ===

def _simulate_one(seed: int, index: int, style: str) -> tuple[np.ndarray, tuple[float, ...], float]:
    from kneetf.data.radiograph import simulate

    r = simulate(seed, index, style)
    return r.presentation(), r.box.as_tuple(), r.pixel_spacing[0]


def simulated_set(name: str, n: int | None, workers: int) -> list[Case]:
    """Held-out set `name` (its size unless `n`), generated with `workers` processes."""
    from kneetf.data.radiograph import HELDOUT_SETS, get_style
    from kneetf.preprocess.roi import Box

    spec = next((s for s in HELDOUT_SETS if s.name == name), None)
    get_style(name)  # a clear error for an unknown name
    seed = spec.seed if spec else 0
    n = n or (spec.n if spec else 100)
    jobs = [(seed, i, name) for i in range(n)]
    if workers > 1:
        from kneetf.workers import process_pool

        with process_pool(workers) as pool:
            results = list(pool.map(_simulate_one, *zip(*jobs), chunksize=4))
    else:
        results = [_simulate_one(*j) for j in jobs]
    return [Case(f"{name}-{i:05d}", im, Box(*box), px) for i, (im, box, px) in enumerate(results)]


def folder_set(data: Path, truth: Path | None) -> list[Case]:
    """A user's X-rays with true boxes: a manifest (or a folder holding manifest.csv), or a
    folder of DICOM files named `<id>.dcm`; boxes from `truth` (default rois.csv beside)."""
    from kneetf.io.readers import read_xray
    from kneetf.preprocess.roi import load_boxes

    root = data if data.is_dir() else data.parent
    truth = truth or root / "rois.csv"
    boxes = load_boxes(truth)
    manifest = data if data.is_file() else data / "manifest.csv"
    if manifest.is_file():
        from kneetf.io.manifest import read_manifest

        result = read_manifest(manifest, require_mri=False)
        files = [(c.id, c.xray, c.xray_half) for c in result.cases]
    else:
        files = [(p.stem, p, None) for p in sorted(data.rglob("*.dcm"))]
    cases = []
    for case_id, path, half in files:
        if case_id not in boxes:
            continue
        image, meta = read_xray(path, half=half)
        spacing = float(np.sqrt(np.prod(meta.pixel_spacing))) if meta.pixel_spacing else None
        cases.append(Case(case_id, image, boxes[case_id], spacing))
    if not cases:
        raise SystemExit(f"no X-ray of {data} has a box in {truth}")
    return cases


# === Sources ===

@dataclass
class Source:
    name: str
    run: Callable[[Case], tuple[Any, bool]]  # -> (box or None, flagged)


def _load_detector(spec: str):
    try:
        from kneetf.preprocess.roi_detector import load_detector
    except ImportError:
        from kneetf.models.roi_detector import load_detector
    return load_detector(spec)


def make_source(spec: str, use_spacing: bool) -> Source:
    from kneetf.errors import KneetfError

    if spec == "classical":
        from kneetf.preprocess.roi import ClassicalRoi

        classical = ClassicalRoi()

        def run(case: Case) -> tuple[Any, bool]:
            # as `kneetf prepare` uses it: failed, or a box flagged for review when unsure
            spacing = case.spacing if use_spacing else None
            try:
                finding = classical.finding_for(case.id, case.image, spacing)
            except KneetfError:
                return None, True
            return finding.box, finding.flagged

        return Source("classical", run)
    if spec.endswith(".csv"):
        from kneetf.preprocess.roi import load_boxes

        boxes = load_boxes(spec)
        return Source(Path(spec).name, lambda case: (boxes.get(case.id), case.id not in boxes))
    model = _load_detector(spec)
    detect = getattr(model, "detect", None)
    takes_spacing = detect is not None and "pixel_spacings" in inspect.signature(detect).parameters

    def run_detector(case: Case) -> tuple[Any, bool]:
        if detect is None:
            return model.predict_boxes([case.image])[0], False
        kw = {"pixel_spacings": [case.spacing]} if takes_spacing and use_spacing else {}
        d = detect([case.image], **kw)[0]
        return d.box, bool(d.flagged)

    return Source(Path(spec).name if spec != "builtin" else "builtin", run_detector)


# === Scoring ===

def score(source: Source, cases: list[Case]) -> dict[str, Any]:
    from kneetf.preprocess.roi_score import score_boxes

    source.run(cases[0])  # warm-up (TensorFlow's first call)
    pred, flags = [], []
    t0 = time.perf_counter()
    for case in cases:
        box, flagged = source.run(case)
        pred.append(box)
        flags.append(flagged)
    seconds = time.perf_counter() - t0
    result = score_boxes(pred, [c.truth for c in cases], flags)
    result["ms_per_image"] = 1000.0 * seconds / len(cases)
    result["boxes"] = pred
    return result


def write_preview(path: Path, cases: list[Case], boxes: list[Any], limit: int = 48) -> None:
    """A contact sheet: true box green, the source's red (none: a red cross)."""
    import cv2

    from kneetf.preprocess.roi import to_uint8

    tiles = []
    for case, box in list(zip(cases, boxes))[:limit]:
        canvas = cv2.cvtColor(to_uint8(case.image), cv2.COLOR_GRAY2BGR)
        f = 200.0 / max(canvas.shape[:2])
        canvas = cv2.resize(canvas, (max(1, round(canvas.shape[1] * f)), max(1, round(canvas.shape[0] * f))),
                            interpolation=cv2.INTER_AREA)
        for b, colour in ((case.truth, (0, 200, 0)), (box, (0, 0, 255))):
            if b is not None:
                cv2.rectangle(canvas, (round(b.x0 * f), round(b.y0 * f)), (round(b.x1 * f), round(b.y1 * f)), colour, 1)
        if box is None:
            cv2.line(canvas, (0, 0), (canvas.shape[1] - 1, canvas.shape[0] - 1), (0, 0, 255), 1)
        tile = np.zeros((204, 204, 3), np.uint8)
        tile[:canvas.shape[0], :canvas.shape[1]] = canvas
        tiles.append(tile)
    while len(tiles) % 8:
        tiles.append(np.zeros_like(tiles[0]))
    sheet = np.vstack([np.hstack(tiles[i:i + 8]) for i in range(0, len(tiles), 8)])
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), sheet)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", action="append", help="classical, builtin, a detector .keras or a boxes .csv "
                                                      "(repeatable; default: classical)")
    ap.add_argument("--sets", help="comma-separated held-out sets (default: all of HELDOUT_SETS unless --data)")
    ap.add_argument("--n", type=int, help="images per simulated set (default: the set's size)")
    ap.add_argument("--data", help="a folder of DICOM X-rays or a manifest, scored against --truth")
    ap.add_argument("--truth", help="true boxes CSV for --data (default: rois.csv beside it)")
    ap.add_argument("--no-spacing", action="store_true", help="do not tell the sources the pixel spacing")
    ap.add_argument("--workers", type=int, default=2, help="processes generating the simulated sets (default 2)")
    ap.add_argument("--preview", metavar="DIR", help="write DIR/<set>_<source>.png contact sheets")
    ap.add_argument("--save-boxes", metavar="DIR", help="write DIR/<set>_<source>.csv of the boxes found")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from kneetf.data.radiograph import HELDOUT_SETS

    sources = [make_source(s, not args.no_spacing) for s in (args.source or ["classical"])]
    names = args.sets.split(",") if args.sets else ([] if args.data else [s.name for s in HELDOUT_SETS])
    sets: list[tuple[str, Callable[[], list[Case]]]] = [
        (name, lambda name=name: simulated_set(name, args.n, args.workers)) for name in names]
    if args.data:
        sets.append((Path(args.data).name or "data", lambda: folder_set(Path(args.data),
                                                                        Path(args.truth) if args.truth else None)))
    results: dict[str, dict[str, Any]] = {}
    cols = ("found", "med IoU", "med err", "reported", "silent", "found|kept", "ms/img")
    for set_name, load in sets:
        t = time.perf_counter()
        cases = load()
        gen_s = time.perf_counter() - t
        print(f"\n{set_name}: {len(cases)} images (loaded in {gen_s:.0f} s)")
        print(f"{'source':<24}" + "".join(f"{c:>11}" for c in cols))
        results[set_name] = {}
        for source in sources:
            r = score(source, cases)
            boxes = r.pop("boxes")
            results[set_name][source.name] = {k: round(v, 4) for k, v in r.items()}
            print(f"{source.name:<24}{r['found_rate']:>11.1%}{r['median_iou']:>11.3f}{r['median_centre_error']:>11.3f}"
                  f"{r['reported_rate']:>11.1%}{r['silent_miss_rate']:>11.1%}{r['found_rate_unflagged']:>11.1%}"
                  f"{r['ms_per_image']:>11.1f}")
            safe = source.name.replace("/", "_")
            if args.preview:
                write_preview(Path(args.preview) / f"{set_name}_{safe}.png", cases, boxes)
            if args.save_boxes:
                out = Path(args.save_boxes) / f"{set_name}_{safe}.csv"
                out.parent.mkdir(parents=True, exist_ok=True)
                with out.open("w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["id", "x0", "y0", "x1", "y1"])
                    w.writerows([c.id, *b.as_tuple()] for c, b in zip(cases, boxes) if b is not None)
    summary = {s.name: {"min_found_rate": min(results[k][s.name]["found_rate"] for k in results),
                        "mean_found_rate": float(np.mean([results[k][s.name]["found_rate"] for k in results]))}
               for s in sources}
    print("\nfound = centre within 15 % of the true side and side 0.5-2x; reported = failed or flagged unsure; "
          "silent = missed and not reported; found|kept = found among the boxes not reported")
    print("RESULT " + json.dumps({"bench": "roi", "sets": results, "summary": summary, "cpus": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
