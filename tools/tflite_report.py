"""Size and accuracy of the TFLite variants (fp32, fp16, int8) against Keras.

    python tools/tflite_report.py                        # tiny preset, random weights
    python tools/tflite_report.py runs/x/model.keras --data cache/ --samples 64 --check 16

For each variant: file size, max / mean absolute difference and PSNR (data range 1) of both
outputs against Keras on the same normalised inputs (check samples are not calibration
samples), and the mean TFLite latency per image. Prints a table and `RESULT {json}`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", help=".keras model or run folder (default: --preset, random weights)")
    parser.add_argument("--preset", default="tiny", help="preset when no model is given (default tiny)")
    parser.add_argument("--data", metavar="CACHE", help="kneetf cache for calibration and check samples")
    parser.add_argument("--samples", type=int, default=32, help="int8 calibration samples (default 32)")
    parser.add_argument("--check", type=int, default=8, help="check samples (default 8)")
    parser.add_argument("--variants", default="fp32,fp16,int8", help="comma-separated variants")
    parser.add_argument("--out", help="keep the .tflite files and report.json in this folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import numpy as np

    from kneetf.export.samples import structured_samples
    from kneetf.export.savedmodel import load_for_export
    from kneetf.export.tflite import export_tflite, samples_from_cache
    from kneetf.inference.litert import TFLiteModel

    with tempfile.TemporaryDirectory(prefix="kneetf-tflite-report-") as tmp:
        if args.model:
            model_path = args.model
        else:
            spec = importlib.util.spec_from_file_location("kneetf_test_serving_server",
                                                          ROOT / "tests" / "serving_server.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            model_path = module.make_test_model(Path(tmp) / "model.keras", args.preset)
        model = load_for_export(model_path).model
        size = int(model.inputs[0].shape[1])
        if args.data:
            pool = samples_from_cache(args.data, args.samples + args.check)
            if len(pool) <= args.check:
                raise SystemExit(f"{args.data}: {len(pool)} samples; need more than --check {args.check}")
            calibration, check = pool[:-args.check], pool[-args.check:]
        else:
            calibration = structured_samples(args.samples, size, seed=0)
            check = structured_samples(args.check, size, seed=10_000)
        out_dir = Path(args.out) if args.out else Path(tmp) / "tflite"
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        t0 = time.perf_counter()
        report = export_tflite(model, out_dir, variants, representative=calibration, check=check)
        convert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.predict(check, verbose=0)
        keras_ms = (time.perf_counter() - t0) * 1000 / len(check)
        print(f"{'variant':<8} {'bytes':>10} {'output':<11} {'max|d|':>10} {'mean|d|':>10} {'PSNR dB':>8} "
              f"{'ms/img':>7}")
        for variant, rep in report.items():
            runner = TFLiteModel(rep["path"])
            runner.predict(check[:1])
            t0 = time.perf_counter()
            runner.predict(check)
            rep["ms_per_image"] = (time.perf_counter() - t0) * 1000 / len(check)
            rep["path"] = Path(rep["path"]).name
            for name, m in rep["outputs"].items():
                print(f"{variant:<8} {rep['bytes']:>10} {name:<11} {m['max_abs_diff']:>10.3g} "
                      f"{m['mean_abs_diff']:>10.3g} {m['psnr']:>8.1f} {rep['ms_per_image']:>7.2f}")
        print(f"(Keras predict: {keras_ms:.2f} ms/img on the same {len(check)} images, batched)")
    result = {"model": args.model, "preset": None if args.model else args.preset,
              "calibration": args.data or "structured", "calibration_samples": int(len(calibration)),
              "check_samples": int(len(check)), "convert_s": round(convert_s, 1),
              "keras_ms_per_image": round(keras_ms, 3), "variants": report,
              "input_range": [float(np.min(check)), float(np.max(check))]}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    from kneetf.errors import KneetfError

    try:
        sys.exit(main())
    except KneetfError as e:  # a missing or unreadable model or cache: the message, not a traceback
        sys.exit(f"error: {e}")
