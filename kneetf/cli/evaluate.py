"""`kneetf evaluate`: score a model on a cache split against the baselines (mean volume,
nearest neighbours, cross-validated k-NN and kernel ridge regression); print the table, which
baselines the model does not beat, and write the report folder."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="M",
                        help="a .keras file, a training run folder, a SavedModel folder or a .tflite file")
    parser.add_argument("--data", required=True, metavar="CACHE", help="a cache folder (kneetf prepare)")
    from kneetf.baselines import DEFAULT_FOLDS, DEFAULT_K

    parser.add_argument("--split", default="test", help="split to score (default: %(default)s)")
    parser.add_argument("--baseline-split", default="train",
                        help="split the baselines are computed from (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="report folder (the only place written to)")
    parser.add_argument("--knn", type=int, default=DEFAULT_K, metavar="K",
                        help="k of the k-NN average baseline; 1 leaves it out (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=DEFAULT_FOLDS, metavar="K",
                        help="cross-validation folds of the k-NN and kernel ridge baselines, on the baseline split "
                             "(default: %(default)s)")
    parser.add_argument("--no-strong", action="store_true",
                        help="leave out the cross-validated baselines (k-NN with k by CV, kernel ridge)")
    parser.add_argument("--batch-size", type=int, default=16, help="X-rays per model call (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="score the first N subjects only")
    parser.add_argument("--save-volumes", action="store_true",
                        help="also write each subject's reconstruction as volumes/<id>.nii.gz (as kneetf predict)")
    from kneetf.cli.options import add_trust_flag

    add_trust_flag(parser)


def run(args: argparse.Namespace) -> int:
    from kneetf.errors import ConfigError
    from kneetf.evaluate import evaluate, format_table, verdict_lines

    if args.knn < 1:
        raise ConfigError(f"--knn must be >= 1. Received: --knn {args.knn}")
    if args.folds < 2:
        raise ConfigError(f"--folds must be >= 2. Received: --folds {args.folds}")
    from kneetf.data.pipeline import corrupt_shards_named

    with corrupt_shards_named(args.data):
        result = evaluate(args.model, args.data, args.split, args.out, baseline_split=args.baseline_split,
                          k=args.knn, batch_size=args.batch_size, limit=args.limit, progress=args.progress,
                          log_verdict=False, strong=not args.no_strong, folds=args.folds,
                          save_volumes=args.save_volumes, trust_model=args.trust_model)
    print(format_table(result))
    print()
    for line in verdict_lines(result):
        print(("WARNING: " if "NOT" in line else "") + line)
    print(f"report: {args.out} ({', '.join(result.get('files', []))})")
    return 0
