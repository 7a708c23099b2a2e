"""`kneetf predict`: X-ray files -> `<name>.nii.gz` (and optional DICOM series / PNG montages); names
are pseudonyms unless `--names id` or `--keep-patient`."""
from __future__ import annotations

import argparse
import sys

from kneetf.cli.options import ConfigFlag, add_config_flags, add_naming_flags, add_trust_flag, config_values


def _flags() -> list[ConfigFlag]:
    """The config fields `kneetf predict` exposes."""
    from kneetf.io.limits import ReaderConfig

    return [ConfigFlag(ReaderConfig, "max_pixels")]


def _formats(text: str) -> tuple[str, ...]:
    """--format's value, checked as the command line is read (a bad one exits 2, as --names)."""
    from kneetf.errors import ConfigError
    from kneetf.inference.outputs import parse_formats

    try:
        return parse_formats(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--format ")) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kneetf.inference.outputs import FORMATS

    parser.add_argument("inputs", nargs="+", metavar="INPUT",
                        help="X-ray files (DICOM, PNG/TIFF/JPEG, .npy), folders of them, or a manifest .csv")
    parser.add_argument("--model", required=True, metavar="M",
                        help="a .keras file, a training run folder, a SavedModel folder or a .tflite file")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (the only place written to)")
    parser.add_argument("--format", default=FORMATS[0], metavar="FORMATS", type=_formats,
                        help=f"comma-separated: {', '.join(FORMATS)} (default: %(default)s)")
    roi = parser.add_mutually_exclusive_group()
    roi.add_argument("--rois", metavar="BOXES_CSV",
                     help="ROI boxes CSV id,x0,y0,x1,y1 (ids as the outputs'; default: the ROI source the model "
                          "was trained with)")
    roi.add_argument("--roi-detector", metavar="DETECTOR",
                     help="'builtin' (the detector shipped with kneetf), a trained ROI detector (.keras from "
                          "kneetf train-roi) or 'classical' (the image-analysis fallback); default: the ROI source "
                          "the model was trained with, else the built-in detector")
    parser.add_argument("--keep-patient", action="store_true",
                        help="DICOM output joins the DICOM X-ray's study and keeps its patient name, ID, birth "
                             "date and sex (default: a random pseudonymous patient per output)")
    add_naming_flags(parser)
    parser.add_argument("--batch-size", type=int, default=8, help="X-rays per model call (default: %(default)s)")
    parser.add_argument("--preprocess", metavar="JSON",
                        help="take the preprocessing config from this run config.json / dataset.json "
                             "(default: the one recorded with the model)")
    parser.add_argument("--allow-outside", action="store_true",
                        help="let a manifest name files outside its folder tree")
    add_config_flags(parser, _flags())
    add_trust_flag(parser)


def run(args: argparse.Namespace) -> int:
    from kneetf.cli.exits import EXIT_OK, EXIT_PARTIAL
    from kneetf.errors import KneetfError
    from kneetf.inference.batch import predict_files
    from kneetf.io.limits import ReaderConfig, use_reader_config
    formats = args.format
    roi = args.rois or args.roi_detector  # None: the ROI source recorded with the model
    with use_reader_config(ReaderConfig(**config_values(args, _flags(), ReaderConfig))):
        report = predict_files(args.model, args.inputs, args.out, formats=formats, roi=roi,
                               keep_patient=args.keep_patient, batch_size=args.batch_size,
                               preprocess=args.preprocess, allow_outside=args.allow_outside,
                               progress=args.progress, trust_model=args.trust_model, names=args.names,
                               pseudonym_key=args.pseudonym_key)
    total = report.ok + len(report.errors)
    print(f"wrote {report.ok} of {total} reconstruction(s) to {report.out_dir}")
    if report.flagged:
        print(f"{len(report.flagged)} ROI box(es) flagged for review, the ROI source being unsure where the knee is "
              f"(roi_flagged in {report.out_dir / 'predictions.csv'}): {', '.join(report.flagged[:10])}"
              + (" ..." if len(report.flagged) > 10 else ""))
    if report.errors:
        print(f"{len(report.errors)} failure(s) (also in {report.out_dir / 'errors.csv'}):", file=sys.stderr)
        for e in report.errors:
            file = e.get("source") or e["file"]
            who = f"{e['id']} ({file})" if e.get("id") else file
            print(f"  {who}: {e['reason']}", file=sys.stderr)
    if report.ok == 0:
        raise KneetfError("no reconstruction was written" + ("" if total else ": no input files"))
    return EXIT_PARTIAL if report.errors else EXIT_OK
