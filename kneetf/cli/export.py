"""`kneetf export MODEL_OR_RUN --out saved_models/kneetf`: TF Serving SavedModel (+ TFLite)."""
from __future__ import annotations

import argparse


def _batch_sizes(text: str) -> tuple[int, ...]:
    if text.strip() == "0":
        return ()
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kneetf.export.tflite import VARIANTS
    from kneetf.protocol import SERVING_BATCH_SIZES

    p.add_argument("model", metavar="MODEL_OR_RUN", help="a .keras file or a training run folder (model.keras)")
    p.add_argument("--out", default="saved_models/kneetf",
                   help="model base folder; versions go to OUT/<version>/ (default: %(default)s)")
    p.add_argument("--version", type=int, help="version number (default: the next free one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --version")
    p.add_argument("--model-name", help="model name in the warm-up requests (default: the --out folder name)")
    p.add_argument("--tflite", action="store_true", help="also write fp32, fp16 and int8 TFLite models")
    p.add_argument("--tflite-variants", default=",".join(VARIANTS),
                   help="comma-separated TFLite variants with --tflite (default: %(default)s)")
    p.add_argument("--data", metavar="CACHE", help="kneetf cache: int8 calibration and check samples")
    p.add_argument("--calibration-samples", type=int, default=32,
                   help="int8 calibration samples (default: %(default)s)")
    warmup = p.add_mutually_exclusive_group()
    warmup.add_argument("--warmup-batch-sizes", type=_batch_sizes, default=SERVING_BATCH_SIZES,
                        help="batch sizes of the warm-up requests, e.g. 1,8; 0 for none (default: "
                             f"{','.join(map(str, SERVING_BATCH_SIZES))}, the allowed batch sizes of "
                             "serving/batching.config)")
    warmup.add_argument("--batching-config", metavar="FILE",
                        help="warm up every batch size this TF Serving batching config allows (its "
                             "allowed_batch_sizes)")
    warmup.add_argument("--no-warmup", action="store_true", help="write no warm-up requests")
    p.add_argument("--no-verify", action="store_true", help="skip reloading the export and comparing it with Keras")


def run(args: argparse.Namespace) -> int:
    from kneetf.errors import ConfigError
    from kneetf.export.savedmodel import export_savedmodel, read_batching_config
    from kneetf.export.tflite import VARIANTS

    variants: tuple[str, ...] = ()
    if args.tflite:
        variants = tuple(v.strip() for v in args.tflite_variants.split(",") if v.strip())
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"unknown --tflite-variants {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    elif args.data:
        raise ConfigError("--data is used for TFLite calibration; add --tflite")
    if args.calibration_samples < 1:
        raise ConfigError(f"--calibration-samples must be >= 1. Received: {args.calibration_samples}")
    warmup = args.warmup_batch_sizes
    if args.no_warmup:
        warmup = ()
    elif args.batching_config:
        warmup = read_batching_config(args.batching_config)
    result = export_savedmodel(args.model, args.out, version=args.version, overwrite=args.overwrite,
                               model_name=args.model_name, warmup_batch_sizes=warmup,
                               verify=not args.no_verify, tflite_variants=variants, data=args.data,
                               calibration_samples=args.calibration_samples)
    info = result.info
    if result.reused:
        print(f"{info['model_name']} version {result.version} in {result.path} already holds this export "
              "(same weights, preprocessing and options); nothing written")
    else:
        print(f"exported {info['model_name']} version {result.version} to {result.path}")
    for name, sig in info["signatures"].items():
        spec = sig["inputs"]["xray"]
        shape = "x".join("?" if d is None else str(d) for d in spec["shape"])
        print(f"  signature {name:<20} xray {spec['dtype']:<8} {shape:<14} -> {', '.join(sig['outputs'])}")
    if info["verify_max_abs_diff"]:
        diffs = ", ".join(f"{k} {v:.2g}" for k, v in info["verify_max_abs_diff"].items())
        print(f"  checked against Keras: max abs diff {diffs}")
    if result.tflite:
        print(f"  {'TFLite':<8} {'bytes':>10} {'mri max|d|':>11} {'mri mean|d|':>12} {'mri PSNR':>9} {'xray PSNR':>10}")
        for variant, rep in result.tflite.items():
            mri, xr = rep["outputs"]["mri"], rep["outputs"]["xray_recon"]
            print(f"  {variant:<8} {rep['bytes']:>10} {mri['max_abs_diff']:>11.3g} {mri['mean_abs_diff']:>12.3g} "
                  f"{mri['psnr']:>9.1f} {xr['psnr']:>10.1f}")
        print("  (TFLite models take the normalised 128x128 input; see kneetf.export.tflite)")
    return 0
