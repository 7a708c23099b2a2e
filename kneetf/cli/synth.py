"""`kneetf synth`: write the built-in synthetic paired knee dataset as real files (DICOM series,
DICOM X-rays, NIfTI, PNG) with its manifests and ROI boxes."""
from __future__ import annotations

import argparse

from kneetf.cli.options import ConfigFlag, add_config_flags, config_values


def _flags() -> list[ConfigFlag]:
    from kneetf.data.synthetic import SynthConfig

    return [ConfigFlag(SynthConfig, "monochrome1_fraction"), ConfigFlag(SynthConfig, "left_fraction")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (run again on it to resume)")
    p.add_argument("--n", type=int, default=256, help="number of knees (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default: %(default)s)")
    p.add_argument("--workers", type=int, default=2,
                   help="generating processes (default: %(default)s; 1 = in this process)")
    from kneetf.data.synthetic import FORMATS

    p.add_argument("--formats", default=",".join(FORMATS),
                   help=f"comma-separated file formats among {', '.join(FORMATS)} (default: all)")
    add_config_flags(p, _flags())
    p.add_argument("--split-fractions", default="0.8,0.1,0.1", metavar="TRAIN,VAL,TEST",
                   help="train/val/test fractions (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any SynthConfig field, e.g. --set mri_noise=0.05 --set bias_field=0.25 (repeatable)")
    p.add_argument("--radiograph", metavar="STYLE",
                   help="write the X-rays as simulated hospital radiographs of this style (train, clinic, oai, "
                        "wide, rotated, processed, collimated: kneetf.data.radiograph.STYLES): pixel spacing, "
                        "image size, rotation, collimation, lead markers, burned-in text, processing, 8-16 bits, "
                        "MONOCHROME1/2; rois.csv holds their true joint boxes")


def _settings(items: list[str]) -> dict[str, object]:
    """["mri_noise=0.05", "placement_mm=[2, 3]"] -> {"mri_noise": 0.05, "placement_mm": [2, 3]} (JSON values)."""
    import json

    from kneetf.errors import ConfigError

    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes FIELD=VALUE. Received: {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"--set {key.strip()}: {value!r} is not a number, list or true/false") from None
    return out


def _fractions(text: str) -> tuple[float, float, float]:
    from kneetf.errors import ConfigError

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ConfigError(f"--split-fractions takes three numbers TRAIN,VAL,TEST. Received: {text!r}")
    return values  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    from kneetf.config import from_dict
    from kneetf.data.synthetic import SynthConfig, synthesize

    config = from_dict(SynthConfig, {**config_values(args, _flags(), SynthConfig), **_settings(args.set)})
    radiograph = None
    if args.radiograph:
        from kneetf.data.radiograph import get_style

        radiograph = get_style(args.radiograph)
    summary = synthesize(args.out, n=args.n, seed=args.seed, config=config, fractions=_fractions(args.split_fractions),
                         formats=args.formats.split(","), workers=args.workers, progress=args.progress,
                         radiograph=radiograph)
    print(f"kneetf synth: {summary.n} knees in {summary.out_dir} ({summary.generated} generated, "
          f"{summary.reused} reused) in {summary.seconds:.1f} s; manifest {summary.manifest}")
    return 0
