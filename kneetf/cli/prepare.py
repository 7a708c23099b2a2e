"""`kneetf prepare MANIFEST --out CACHE`: decode, crop the ROI, preprocess, write shards."""
from __future__ import annotations

import argparse

from kneetf.cli.options import ConfigFlag, add_config_flags, config_values


def _flags() -> list[ConfigFlag]:
    """The config fields `kneetf prepare` exposes, in the order of `--help`."""
    from kneetf.config import PreprocessConfig
    from kneetf.data.sources import PrepareOptions
    from kneetf.io.limits import ReaderConfig

    return [
        ConfigFlag(PrepareOptions, "roi_preview"),
        ConfigFlag(PrepareOptions, "workers"),
        ConfigFlag(PrepareOptions, "shard_size"),
        ConfigFlag(PreprocessConfig, "slice_start"),
        ConfigFlag(PreprocessConfig, "num_slices"),
        ConfigFlag(PreprocessConfig, "mirror_left"),
        ConfigFlag(PrepareOptions, "allow_outside"),
        ConfigFlag(ReaderConfig, "max_pixels"),
    ]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="manifest CSV (id,xray,mri[,side,split])")
    p.add_argument("--out", required=True, help="cache folder to write (resumable)")
    roi = p.add_mutually_exclusive_group()
    roi.add_argument("--rois", help="boxes CSV id,x0,y0,x1,y1 (pixels of the full X-ray)")
    roi.add_argument("--roi-detector", metavar="DETECTOR",
                     help="where boxes come from without --rois: 'builtin' (the detector shipped with kneetf, the "
                          "default), a trained detector (.keras from `kneetf train-roi`) or 'classical' (the "
                          "image-analysis fallback)")
    add_config_flags(p, _flags())


def roi_summary_line(summary: dict) -> str:
    """'ROI boxes: classical 120 (3 flagged for review), csv 4; knee not found in 2 X-ray(s)'."""
    parts = [f"{source} {n}" for source, n in sorted(summary["by_source"].items())] or ["none"]
    flagged = f" ({summary['flagged']} flagged for review)" if summary["flagged"] else ""
    return f"ROI boxes: {', '.join(parts)}{flagged}; knee not found in {summary['failed']} X-ray(s)"


def run(args: argparse.Namespace) -> int:
    from kneetf.cli.exits import EXIT_ERROR, EXIT_OK, EXIT_PARTIAL
    from kneetf.config import PreprocessConfig
    from kneetf.data.sources import PrepareOptions, prepare_manifest
    from kneetf.io.limits import ReaderConfig

    flags = _flags()
    config = PreprocessConfig(**config_values(args, flags, PreprocessConfig))
    result = prepare_manifest(args.manifest, args.out, config, rois=args.rois, detector=args.roi_detector,
                              progress=args.progress, reader=ReaderConfig(**config_values(args, flags, ReaderConfig)),
                              **config_values(args, flags, PrepareOptions))
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    print(f"prepared {result.total} pair(s) into {result.out_dir} ({counts}); "
          f"{result.skipped_shards} shard(s) were already complete")
    summary = result.roi_summary()
    print(roi_summary_line(summary) + f" (boxes in {result.out_dir / 'rois.csv'})")
    if not args.rois and (summary["failed"] or summary["flagged"]):
        hint = "look at their boxes (--roi-preview, rois.csv's flagged column) and give the boxes you trust with --rois"
        if args.roi_detector == "classical":
            hint += "; the built-in detector (the default) finds more knees on processed or collimated radiographs"
        print(f"the ROI source was unsure of some X-rays: {hint} (docs/roi_detector.md)")
    if args.roi_preview:
        sheets = sorted((result.out_dir / "roi_preview").glob("sheet-*.png"))
        print(f"ROI contact sheet(s) for review: {', '.join(str(p) for p in sheets)}")
    if result.errors:
        print(f"{len(result.errors)} problem(s) with the inputs; those pairs were skipped "
              f"(see {result.out_dir / 'errors.csv'}):")
        for e in result.errors[:20]:
            print(f"  {e.get('id') or '-'}: {e.get('file')}: {e.get('reason')}")
        if len(result.errors) > 20:
            print(f"  ... and {len(result.errors) - 20} more")
    if not result.total:
        return EXIT_ERROR
    return EXIT_PARTIAL if result.errors else EXIT_OK
