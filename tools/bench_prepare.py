"""`kneetf prepare` throughput on OAI-sized inputs: pairs per second, CPU time per pair and
peak RSS, per ROI source and worker count.

Each pair is a 160-slice 384x384 DICOM MR series (shuffled file names) and a 2000x2500
DICOM X-ray at 0.14 mm (a simulated radiograph of the `oai` style, `kneetf.data.radiograph`),
the sizes of an OAI SAG_3D_DESS series and a knee radiograph. Every slice's header is read,
only the 20 kept slices' pixels. `--distinct` pairs are generated and the manifest lists them
`--pairs` times in all (distinct ids), so the benchmark measures decoding and preprocessing,
not file generation (warm page cache). ROI sources (`--roi-sources`): `classical` (the
fallback finds the knee, `--roi-detector classical`), `csv` (a boxes CSV gives it: the
radiographs' true boxes) and `builtin` (the built-in detector, the default without a boxes
CSV).

Every measurement runs in its own process (a warm-up pair first, untimed), so its peak RSS
is its own: `rss main` is the prepare process, `rss worker` the largest decoding process.
`cpu s/pair` is the CPU time of all its processes per pair (user + system), which other load
on the machine disturbs less than the wall time: on N idle cores prepare cannot exceed
N / (cpu s/pair) pairs/s. `of it main` is the prepare process's share (resize, normalisation
and writing, while the workers decode): one process, so prepare cannot exceed
1 / (of it main) pairs/s however many workers decode. `--rounds` repeats every row, interleaved; the table gives the
median and the range.

    python tools/bench_prepare.py                       # 2 distinct pairs, 32 rows, 1 and 2 workers, 3 rounds
    python tools/bench_prepare.py --pairs 64 --workers 2 --roi-sources csv
    python tools/bench_prepare.py --pairs 96 --rounds 1 --workers 2     # starting the workers weighs less
    python tools/bench_prepare.py --pairs 384 --rounds 2 --workers 2 --roi-sources builtin,classical,csv
    python tools/bench_prepare.py --roi classical,builtin --pairs 0    # ROI time per image only

With `builtin` each worker imports TensorFlow and loads the detector first (about 4 s of CPU),
which a short run mostly measures; a few hundred pairs spread it out.

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
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


#: the X-rays: the `oai` radiograph style (`kneetf.data.radiograph`) at a fixed OAI size and spacing
XRAY_SIZE, XRAY_MM, XRAY_SEED = (2000, 2500), 0.14, 7


def make_inputs(root: Path, distinct: int, seed: int = 0) -> list[tuple[str, str, tuple[float, ...]]]:
    """Write `distinct` OAI-sized pairs under root; returns (xray, mri, true box) per pair."""
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
        pairs.append((f"xray{i}.dcm", f"mri{i}", radiograph.box.as_tuple()))
    return pairs


def write_manifest(root: Path, pairs: list[tuple[str, str, tuple[float, ...]]], rows: int,
                   name: str = "manifest.csv") -> Path:
    """A manifest of `rows` rows cycling through `pairs`, and next to it `<name>.boxes.csv`
    with each row's true box."""
    path = root / name
    with path.open("w", newline="") as f, path.with_suffix(".boxes.csv").open("w", newline="") as g:
        w, b = csv.writer(f), csv.writer(g)
        w.writerow(["id", "xray", "mri", "side", "split"])
        b.writerow(["id", "x0", "y0", "x1", "y1"])
        for k in range(rows):
            x, m, box = pairs[k % len(pairs)]
            w.writerow([f"case{k:04d}", x, m, "right", "train"])
            b.writerow([f"case{k:04d}", *box])
    return path


def vm_hwm_mb(pid: int | str = "self") -> float:
    """Peak RSS (VmHWM) of a process in MiB; 0 when it is gone. Not ru_maxrss: Linux carries
    a parent's peak into a child's ru_maxrss across fork + exec."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class ChildPeaks(threading.Thread):
    """Samples the peak RSS of this process's child processes (the decoding workers) every
    `every` seconds until stopped; `peak` is the largest seen. A child that has not yet run
    its own program (between fork and exec it shares or copies this process's memory and
    reports this process's peak) is skipped: it still has this process's command line."""

    def __init__(self, every: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.every, self.peak, self._done = every, 0.0, threading.Event()

    def run(self) -> None:
        me = str(os.getpid())
        with open("/proc/self/cmdline", "rb") as f:
            my_cmdline = f.read()
        while not self._done.wait(self.every):
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry.name}/stat") as f:
                        ppid = f.read().rsplit(")", 1)[1].split()[1]
                    if ppid != me:
                        continue
                    with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                        if f.read() == my_cmdline:
                            continue
                except (OSError, IndexError):
                    continue
                self.peak = max(self.peak, vm_hwm_mb(entry.name))

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak


def measure_one(manifest: Path, warmup: Path, out: Path, workers: int, roi: str) -> dict:
    """One timed `prepare_manifest` in this process (after an untimed in-process warm-up
    pair, which also imports TensorFlow): wall seconds, CPU seconds of this process and its
    workers, peak RSS of each."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from kneetf.data.sources import prepare_manifest

    def rois(m: Path) -> Path | None:
        return m.with_suffix(".boxes.csv") if roi == "csv" else None

    detector = roi if roi in ("builtin", "classical") else None  # csv: the boxes decide
    warm = out.with_name(out.name + "-warm")
    shutil.rmtree(warm, ignore_errors=True)  # a kept warm-up cache would be reused: TensorFlow unloaded
    prepare_manifest(warmup, warm, workers=0, progress=False, rois=rois(warmup), detector=detector)
    shutil.rmtree(out, ignore_errors=True)
    peaks = ChildPeaks()
    peaks.start()
    self0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    result = prepare_manifest(manifest, out, workers=workers, progress=False, rois=rois(manifest), detector=detector)
    wall = time.perf_counter() - t
    self1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_peak = peaks.stop()
    main_cpu, kids_cpu = (sum(getattr(r1, f) - getattr(r0, f) for f in ("ru_utime", "ru_stime"))
                          for r0, r1 in ((self0, self1), (kids0, kids1)))
    return {"pairs": result.total, "errors": len(result.errors), "seconds": wall, "cpu_s": main_cpu + kids_cpu,
            "cpu_main_s": main_cpu, "rss_main_mb": vm_hwm_mb(), "rss_worker_mb": worker_peak}


def roi_times(sources: list[str], images: dict[str, np.ndarray], repeat: int = 5) -> list[dict]:
    """Milliseconds per image of each ROI source (`classical`, `builtin` or a detector .keras),
    one image per call after a warm-up call."""
    rows = []
    for name in sources:
        if name == "classical":
            from kneetf.preprocess.roi import ClassicalRoi

            source = ClassicalRoi()
        else:
            from kneetf.preprocess.roi_detector_source import DetectorRoi

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
    ap.add_argument("--pairs", type=int, default=32, help="manifest rows to prepare per measurement")
    ap.add_argument("--distinct", type=int, default=2, help="distinct generated pairs")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--roi-sources", default="classical,csv",
                    help="comma-separated ROI sources of the prepare rows: classical, csv, builtin "
                         "(default: classical,csv)")
    ap.add_argument("--rounds", type=int, default=3, help="measurements per row, interleaved (default 3)")
    ap.add_argument("--keep", help="keep the generated inputs in this folder (and reuse them when there)")
    ap.add_argument("--roi", default="", help="comma-separated ROI sources to time per image: classical, builtin "
                                              "or a detector .keras (default: none)")
    ap.add_argument("--measure", nargs=5, metavar=("MANIFEST", "WARMUP", "OUT", "WORKERS", "ROI"),
                    help=argparse.SUPPRESS)  # one measurement, in a child process
    args = ap.parse_args(argv)
    if args.measure:
        manifest, warmup, out, workers, roi = args.measure
        print("MEASURE " + json.dumps(measure_one(Path(manifest), Path(warmup), Path(out), int(workers), roi)))
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    unknown = set(args.roi_sources.split(",")) - {"classical", "csv", "builtin"}
    if unknown:
        ap.error(f"--roi-sources: unknown {', '.join(sorted(unknown))} (classical, csv or builtin)")

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="kneetf-bench-prepare-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ready = root / "inputs.json"
    if ready.exists() and json.loads(ready.read_text())["distinct"] == args.distinct:
        pairs = [(x, m, tuple(b)) for x, m, b in json.loads(ready.read_text())["pairs"]]
    else:
        pairs = make_inputs(root, args.distinct)
        ready.write_text(json.dumps({"distinct": args.distinct, "pairs": pairs}))
    manifest = write_manifest(root, pairs, args.pairs)
    warmup = write_manifest(root, pairs, 1, "warmup.csv")
    gen_s = time.perf_counter() - t0
    plan = [(roi, int(w)) for roi in args.roi_sources.split(",") for w in args.workers.split(",")] if args.pairs else []
    samples: dict[tuple[str, int], list[dict]] = {key: [] for key in plan}
    for _ in range(args.rounds):
        for roi, workers in plan:
            out = root / f"cache-{roi}-w{workers}"
            done = subprocess.run([sys.executable, __file__, "--measure", str(manifest), str(warmup), str(out),
                                   str(workers), roi], capture_output=True, text=True)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("MEASURE ")]
            if done.returncode or not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"the measurement {roi}, {workers} worker(s) failed")
            samples[(roi, workers)].append(json.loads(lines[-1][len("MEASURE "):]))
    rows = []
    for (roi, workers), ms in samples.items():
        rate = [m["pairs"] / m["seconds"] for m in ms]
        cpu = [m["cpu_s"] / max(m["pairs"], 1) for m in ms]
        cpu_main = [m["cpu_main_s"] / max(m["pairs"], 1) for m in ms]
        rows.append({"roi": roi, "workers": workers, "pairs": ms[0]["pairs"], "errors": max(m["errors"] for m in ms),
                     "rounds": len(ms), "pairs_per_s": round(statistics.median(rate), 3),
                     "pairs_per_s_range": [round(min(rate), 3), round(max(rate), 3)],
                     "cpu_s_per_pair": round(statistics.median(cpu), 4),
                     "cpu_s_per_pair_range": [round(min(cpu), 4), round(max(cpu), 4)],
                     "cpu_main_s_per_pair": round(statistics.median(cpu_main), 4),
                     "rss_main_mb": round(max(m["rss_main_mb"] for m in ms)),
                     "rss_worker_mb": round(max(m["rss_worker_mb"] for m in ms))})
    print(f"inputs: {args.distinct} distinct pair(s) of a 160x384x384 DICOM series + 2000x2500 DICOM X-ray "
          f"(ready in {gen_s:.1f} s), {args.pairs} manifest rows, {args.rounds} round(s), {os.cpu_count()} CPUs")
    print(f"{'roi':<10}{'workers':>7} {'pairs':>6} {'errors':>6} {'pairs/s (range)':>22} "
          f"{'cpu s/pair (range)':>24} {'of it main':>10} {'rss main':>9} {'rss worker':>11}")
    for r in rows:
        lo, hi = r["pairs_per_s_range"]
        clo, chi = r["cpu_s_per_pair_range"]
        print(f"{r['roi']:<10}{r['workers']:7d} {r['pairs']:6d} {r['errors']:6d} "
              f"{r['pairs_per_s']:7.2f} ({lo:5.2f}-{hi:5.2f}) {r['cpu_s_per_pair']:9.3f} ({clo:5.3f}-{chi:5.3f}) "
              f"{r['cpu_main_s_per_pair']:10.3f} {r['rss_main_mb']:6d} MB {r['rss_worker_mb']:8d} MB")
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
