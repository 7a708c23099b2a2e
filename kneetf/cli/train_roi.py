"""`kneetf train-roi [--data DIR_OR_MANIFEST --boxes CSV] [--init DETECTOR] --out roi_detector.keras`.

Trains the knee-joint ROI detector (`kneetf.training.roi.train_roi_detector`): by default on
simulated hospital radiographs (`kneetf.data.radiograph`: markers, collimation, borders,
processing, any spacing, both photometric interpretations), plus the training rows of a
manifest with a boxes CSV when given; `--init` fine-tunes an existing detector (a `.keras`
file or `builtin`) instead of starting afresh. Prints the found-rate of the detector beside
the classical fallback's on held-out radiograph styles training never saw and on the
manifest's held-out rows, and writes the model plus a JSON report.
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
        ConfigFlag(RoiDataConfig, "style"),
        ConfigFlag(RoiDataConfig, "user_share"),
        ConfigFlag(RoiDataConfig, "workers"),
        ConfigFlag(RoiTrainConfig, "seed"),
        ConfigFlag(RoiDataConfig, "val_fraction"),
        ConfigFlag(RoiTrainConfig, "epochs"),
        ConfigFlag(RoiTrainConfig, "batch_size"),
        ConfigFlag(RoiTrainConfig, "learning_rate"),
        ConfigFlag(RoiTrainConfig, "finetune_learning_rate"),
    ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kneetf.training.roi import ROI_CSV_NAMES

    p.add_argument("--data", help="a manifest CSV or a folder holding manifest.csv (e.g. from `kneetf synth`) whose "
                                  "boxed X-rays are added to the training data (its val/test rows are held out)")
    p.add_argument("--boxes", "--rois", dest="rois",
                   help=f"boxes CSV id,x0,y0,x1,y1 for --data (default: {' or '.join(ROI_CSV_NAMES)} beside the "
                        "manifest)")
    p.add_argument("--init", metavar="DETECTOR", help="fine-tune this detector (.keras, or builtin) instead of "
                                                      "training a new one; --n 0 trains on --data alone")
    p.add_argument("--out", default="roi_detector.keras", help="model file to write (default: %(default)s)")
    p.add_argument("--report", help="JSON report to write (default: the --out path with .json)")
    add_config_flags(p, _flags())
    p.add_argument("--arch", choices=_archs(), default="default", help="detector size (tiny: for smoke tests)")
    p.add_argument("--roi-preview", metavar="DIR", help="write DIR/<id>.png of held-out X-rays with the "
                                                        "detected (red) and true (green) boxes")
    p.add_argument("--allow-outside", action="store_true",
                   help="allow manifest paths that leave the manifest's folder tree")


def _archs() -> list[str]:
    from kneetf.preprocess.roi_detector_config import DETECTOR_ARCHS

    return list(DETECTOR_ARCHS)


def _row(name: str, n: int, r: dict) -> str:
    d, c = r["detector"], r["classical"]
    return (f"{name:<14}{n:>5}{d['found_rate']:>9.1%}{d['median_iou']:>8.3f}{d['reported_rate']:>9.1%}"
            f"{c['found_rate']:>11.1%}{c['median_iou']:>8.3f}{c['reported_rate']:>9.1%}")


def run(args: argparse.Namespace) -> int:
    from kneetf.preprocess.roi import draw_box_png
    from kneetf.preprocess.roi_detector_config import DETECTOR_ARCHS
    from kneetf.training.roi import RoiDataConfig, RoiTrainConfig, train_roi_detector

    from kneetf.io.outdir import check_output_file
    from kneetf.training.roi import data_files, report_file

    inputs = data_files(args.data, args.rois)  # --init may be --out: it is read before it is replaced
    check_output_file(args.out, "--out", inputs=inputs)  # before the training, not after it
    check_output_file(report_file(args.out, args.report), "--report", inputs=[*inputs, args.out])
    flags = _flags()
    result = train_roi_detector(args.out, data=args.data, rois=args.rois,
                                examples=RoiDataConfig(**config_values(args, flags, RoiDataConfig)),
                                config=DETECTOR_ARCHS[args.arch], arch=args.arch, init=args.init,
                                train=RoiTrainConfig(**config_values(args, flags, RoiTrainConfig)),
                                allow_outside=args.allow_outside, report_path=args.report,
                                verbose=2 if args.verbose else 0)
    report = result.report
    rows = [(name, r) for name, r in report["heldout"].items()]
    if "data_val" in report:
        rows.append(("--data held out", report["data_val"]))
    if rows:
        print(f"{'held out':<14}{'n':>5}{'detector: found':>17}{'IoU':>8}{'unsure':>9}"
              f"{'classical: found':>19}{'IoU':>8}{'failed':>9}")
        for name, r in rows:
            print(_row(name, r["n"], r))
        print("found: box centre within 15 % of the true side, side 0.5-2x; unsure: confidence below "
              f"{report['config']['min_confidence']}; failed: the fallback reported no box")
    val_ids, val_x, val_b = result.val
    if args.roi_preview and val_x:
        for case_id, x, p, t in list(zip(val_ids, val_x, result.predicted, val_b))[:16]:
            draw_box_png(Path(args.roi_preview) / f"{case_id}.png", x, [p, t],
                         label=f"{case_id} IoU {p.iou(t):.2f}")
    print(f"wrote {args.out} and {result.report_path} (data {report['data_s']:.0f} s, training "
          f"{report['train_s']:.0f} s)")
    return 0
