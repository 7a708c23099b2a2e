"""`kneetf import-oai ROOT --visit 00m --out manifest.csv`: pair OAI knee MRIs with their
bilateral X-rays and write a manifest (see `kneetf.io.oai` for the rules)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", type=Path, help="OAI root holding <visit>/<release>/... and contents.csv files")
    parser.add_argument("--visit", action="append", default=None,
                        help="visit folder, e.g. 00m (repeat for several; default 00m)")
    parser.add_argument("--mri-series", default="SAG_3D_DESS",
                        help="SeriesDescription prefix of the knee MRI (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-participant split (default: %(default)s)")
    parser.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    parser.add_argument("--skipped-report", type=Path, default=None,
                        help="where to write the series not used, with the reason (CSV "
                             "participant,visit,what,reason,folder; default: <manifest stem>.skipped.csv beside it)")


def run(args: argparse.Namespace) -> int:
    from kneetf.io.manifest import split_counts
    from kneetf.io.oai import import_oai, parse_split, skipped_report_path

    visits = args.visit or ["00m"]
    report = args.skipped_report or skipped_report_path(args.out)
    result = import_oai(args.root, args.out, visits, mri_series=args.mri_series, seed=args.seed,
                        split=parse_split(args.split), skipped_report=report)
    counts = split_counts(result.cases)
    print(f"wrote {args.out}: {len(result.cases)} knees of {result.participants} participants "
          f"(train {counts.get('train', 0)}, val {counts.get('val', 0)}, test {counts.get('test', 0)}) "
          f"from {result.rows_read} listed series")
    print(f"skipped {len(result.skipped)} candidate series or images and {len(result.ignored)} other series; "
          f"reasons in {report}")
    if result.skipped:
        for reason, n in sorted(result.skipped_by_reason().items(), key=lambda kv: -kv[1]):
            print(f"  {n:6d}  {reason}")
        for s in result.skipped[:10]:
            print(f"    {s.participant} {s.visit} {s.what}: {s.reason}", file=sys.stderr)
        if len(result.skipped) > 10:
            print(f"    ... {len(result.skipped) - 10} more in {report}", file=sys.stderr)
    out_dir = os.path.normpath(args.out.absolute().parent)
    if any(os.path.commonpath([out_dir, os.path.normpath(c.xray.absolute())]) != out_dir for c in result.cases):
        print("note: the manifest holds absolute paths outside its folder; reading it needs "
              "allow_outside (an explicit opt-in)", file=sys.stderr)
    from kneetf.cli.exits import EXIT_OK, EXIT_PARTIAL

    failures = result.failures()  # other views, extra or unpaired series are how OAI is, not failures
    if failures:
        print(f"{len(failures)} of the skipped series point at a problem with the files (exit status "
              f"{EXIT_PARTIAL})", file=sys.stderr)
    return EXIT_PARTIAL if failures else EXIT_OK
