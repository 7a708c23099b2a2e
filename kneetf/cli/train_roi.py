"""`kneetf train-roi [--data DIR_OR_MANIFEST --rois CSV] --out roi_detector.keras`.

Trains the knee-joint ROI detector (`kneetf.training.roi.train_roi_detector`), by default on
built-in synthetic X-rays and their known boxes, prints the held-out mean IoU of the
detector beside the classical fallback's, and writes the model plus a JSON report.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kneetf.cli.options import ConfigFlag, add_config_flags, config_values


def _flags() -> list[ConfigFlag]:
    from kneetf.training.roi import RoiDataConfig, RoiTrainConfig

    return [
        ConfigFlag(RoiDataConfig, "n"),
        ConfigFlag(RoiDataConfig, "n_val"),
        ConfigFlag(RoiTrainConfig, "seed"),
        ConfigFlag(RoiDataConfig, "val_fraction"),
        ConfigFlag(RoiTrainConfig, "epochs"),
        ConfigFlag(RoiTrainConfig, "batch_size"),
        ConfigFlag(RoiTrainConfig, "learning_rate"),
    ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kneetf.training.roi import ROI_CSV_NAMES

    p.add_argument("--data", help="a manifest CSV or a folder holding manifest.csv (e.g. from `kneetf synth`); "
                                  "default: built-in synthetic X-rays generated in memory")
    p.add_argument("--rois", help=f"boxes CSV id,x0,y0,x1,y1 for --data (default: {' or '.join(ROI_CSV_NAMES)} "
                                  "beside the manifest)")
    p.add_argument("--out", default="roi_detector.keras", help="model file to write (default: %(default)s)")
    p.add_argument("--report", help="JSON report to write (default: the --out path with .json)")
    add_config_flags(p, _flags())
    p.add_argument("--arch", choices=_archs(), default="default", help="detector size (tiny: for smoke tests)")
    p.add_argument("--roi-preview", metavar="DIR", help="write DIR/<id>.png of held-out X-rays with the "
                                                        "detected (red) and true (green) boxes")
    p.add_argument("--allow-outside", action="store_true",
                   help="allow manifest paths that leave the manifest's folder tree")


def _archs() -> list[str]:
    from kneetf.preprocess.roi_detector import DETECTOR_ARCHS

    return list(DETECTOR_ARCHS)


def run(args: argparse.Namespace) -> int:
    from kneetf.preprocess.roi import draw_box_png
    from kneetf.preprocess.roi_detector import DETECTOR_ARCHS
    from kneetf.training.roi import RoiDataConfig, RoiTrainConfig, train_roi_detector

    flags = _flags()
    result = train_roi_detector(args.out, data=args.data, rois=args.rois,
                                examples=RoiDataConfig(**config_values(args, flags, RoiDataConfig)),
                                config=DETECTOR_ARCHS[args.arch], arch=args.arch,
                                train=RoiTrainConfig(**config_values(args, flags, RoiTrainConfig)),
                                allow_outside=args.allow_outside, report_path=args.report,
                                verbose=2 if args.verbose else 0)
    report = result.report
    val_ids, val_x, val_b = result.val
    if val_x:
        print(f"{'held-out (' + str(len(val_x)) + ')':<18}{'mean IoU':>9}{'median':>8}{'p10':>7}{'>=0.75':>8}")
        for name in ("detector", "classical"):
            r = report[name]
            print(f"{name:<18}{r['mean_iou']:>9.3f}{r['median_iou']:>8.3f}{r['p10_iou']:>7.3f}"
                  f"{r['frac_iou_ge_0.75']:>8.2f}")
        if args.roi_preview:
            for case_id, x, p, t in list(zip(val_ids, val_x, result.predicted, val_b))[:16]:
                draw_box_png(Path(args.roi_preview) / f"{case_id}.png", x, [p, t],
                             label=f"{case_id} IoU {p.iou(t):.2f}")
    print(f"wrote {args.out} and {result.report_path} (training {report['train_s']:.0f} s)")
    return 0
