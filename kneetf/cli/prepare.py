"""`kneetf prepare MANIFEST --out CACHE`: decode, crop the ROI, preprocess, write shards."""
from __future__ import annotations

import argparse

from kneetf.io.limits import DEFAULT_MAX_PIXELS, MAX_PIXELS_HELP, max_pixels_type

HELP = "decode a manifest, crop the knee ROI and write the TFRecord cache"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="manifest CSV (id,xray,mri[,side,split])")
    p.add_argument("--out", required=True, help="cache folder to write (resumable)")
    roi = p.add_mutually_exclusive_group()
    roi.add_argument("--rois", help="boxes CSV id,x0,y0,x1,y1 (pixels of the full X-ray)")
    roi.add_argument("--roi-detector", help="trained ROI detector (.keras from `kneetf train-roi`)")
    p.add_argument("--roi-preview", action="store_true", help="write roi_preview/<id>.png with the box drawn")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (default 2; 0 = in-process)")
    p.add_argument("--shard-size", type=int, default=64, help="pairs per TFRecord shard (default 64)")
    p.add_argument("--slice-start", type=int, default=20, help="first kept MRI slice, 0-based (default 20)")
    p.add_argument("--num-slices", type=int, default=20, help="number of kept MRI slices (default 20)")
    p.add_argument("--mirror-left", action="store_true", help="mirror left knees to look like right ones")
    p.add_argument("--allow-outside", action="store_true",
                   help="allow manifest paths that leave the manifest's folder tree")
    p.add_argument("--max-pixels", type=max_pixels_type, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=MAX_PIXELS_HELP)


def run(args: argparse.Namespace) -> int:
    from kneetf.config import PreprocessConfig
    from kneetf.data.sources import prepare_manifest
    from kneetf.io.limits import ReaderConfig

    config = PreprocessConfig(slice_start=args.slice_start, num_slices=args.num_slices, mirror_left=args.mirror_left)
    result = prepare_manifest(args.manifest, args.out, config, rois=args.rois, detector=args.roi_detector,
                              allow_outside=args.allow_outside, roi_preview=args.roi_preview,
                              workers=args.workers, shard_size=args.shard_size,
                              reader=ReaderConfig(max_pixels=args.max_pixels))
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    print(f"prepared {result.total} pair(s) into {result.out_dir} ({counts}); "
          f"{result.skipped_shards} shard(s) were already complete")
    if result.errors:
        print(f"{len(result.errors)} problem(s) with the inputs; those pairs were skipped "
              f"(see {result.out_dir / 'errors.csv'}):")
        for e in result.errors[:20]:
            print(f"  {e.get('id') or '-'}: {e.get('file')}: {e.get('reason')}")
        if len(result.errors) > 20:
            print(f"  ... and {len(result.errors) - 20} more")
    return 0 if result.total else 1
