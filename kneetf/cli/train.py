"""`kneetf train` / `kneetf-train`: train KneeNet; with no arguments, the compact preset on
the built-in synthetic knees. The flags are the fields in `_flags()` (see `kneetf.cli.options`);
training fields default to the recipe's, as `--help` lists per recipe."""
from __future__ import annotations

import argparse
import json

from kneetf.cli.options import ConfigFlag, Default, add_config_flags, config_values, field_default, format_value


def _flags() -> list[ConfigFlag]:
    """The config fields `kneetf train` exposes, in the order of `--help`."""
    from kneetf.config import ModelConfig, TrainConfig
    from kneetf.training.train import DataSpec

    return [
        ConfigFlag(DataSpec, "path", "--data"),
        ConfigFlag(DataSpec, "synthetic_n"),
        ConfigFlag(DataSpec, "rois"),
        ConfigFlag(DataSpec, "roi_detector"),
        ConfigFlag(TrainConfig, "epochs"),
        ConfigFlag(TrainConfig, "batch_size"),
        ConfigFlag(TrainConfig, "lr_encdec"),
        ConfigFlag(TrainConfig, "lr_generator"),
        ConfigFlag(TrainConfig, "loss_weights"),
        ConfigFlag(TrainConfig, "augment"),
        ConfigFlag(TrainConfig, "shift_augment"),
        ConfigFlag(TrainConfig, "ssim_weight"),
        ConfigFlag(TrainConfig, "gradient_weight"),
        ConfigFlag(ModelConfig, "latent_dropout"),
        ConfigFlag(ModelConfig, "residual_prior"),
        ConfigFlag(ModelConfig, "prior_kernel"),
        ConfigFlag(ModelConfig, "prior_landmarks"),
        ConfigFlag(ModelConfig, "prior_rank"),
        ConfigFlag(ModelConfig, "prior_basis_size"),
        ConfigFlag(ModelConfig, "prior_downsample"),
        ConfigFlag(ModelConfig, "prior_features"),
        ConfigFlag(TrainConfig, "prior_gradient_weight"),
        ConfigFlag(TrainConfig, "prior_cv_repeats"),
        ConfigFlag(TrainConfig, "prior_loo_targets"),
        ConfigFlag(TrainConfig, "early_stopping_patience", "--early-stopping"),
        ConfigFlag(TrainConfig, "monitor"),
        ConfigFlag(TrainConfig, "lr_schedule"),
        ConfigFlag(TrainConfig, "time_budget_s", "--budget"),
        ConfigFlag(TrainConfig, "seed"),
        ConfigFlag(DataSpec, "workers"),
    ]


def _run_flags() -> list[ConfigFlag]:
    from kneetf.training.train import RunOptions

    return [ConfigFlag(RunOptions, "strategy"), ConfigFlag(RunOptions, "precision"), ConfigFlag(RunOptions, "jit")]


def _resume_flags() -> list[ConfigFlag]:
    from kneetf.training.train import RunOptions

    return [ConfigFlag(RunOptions, "resume"), ConfigFlag(RunOptions, "fresh")]


def _recipe_default(flag: ConfigFlag) -> Default:
    """Model and training fields keep the preset's and recipe's values unless given; the
    help shows them, per recipe where the recipes differ."""
    from kneetf.config import ModelConfig, TrainConfig
    from kneetf.presets import DEFAULT_PRESET, get_preset
    from kneetf.training.recipes import RECIPES

    if flag.config not in (ModelConfig, TrainConfig):
        return field_default(flag)
    values = {}
    for name, recipe in RECIPES.items():
        model, train = recipe.apply(get_preset(DEFAULT_PRESET), TrainConfig())
        values[name] = format_value(getattr(model if flag.config is ModelConfig else train, flag.name))
    if len(set(values.values())) == 1:
        return None, next(iter(values.values()))
    return None, "the recipe's: " + ", ".join(f"{v} for {name}" for name, v in values.items())


def add_arguments(p: argparse.ArgumentParser) -> None:
    from kneetf.presets import DEFAULT_PRESET, describe_presets
    from kneetf.training.recipes import RECIPES

    presets = "; ".join(f"{name} ({text})" for name, text in describe_presets().items())
    recipes = "; ".join(f"{name} ({r.description})" for name, r in RECIPES.items())
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"model preset: {presets} (default: %(default)s)")
    p.add_argument("--recipe", default="default", help=f"training recipe: {recipes} (default: %(default)s)")
    add_config_flags(p, _flags(), _recipe_default)
    p.add_argument("--out", default="runs/train",
                   help="run folder (default: %(default)s); run again to resume an interrupted run")
    add_config_flags(p, _run_flags())
    group = p.add_mutually_exclusive_group()
    add_config_flags(group, _resume_flags())


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kneetf.config import ModelConfig, TrainConfig, replace
    from kneetf.errors import ConfigError
    from kneetf.presets import get_preset
    from kneetf.protocol import RUN_BACKUP_DIR
    from kneetf.training.recipes import get_recipe
    from kneetf.training.train import DataSpec, RunOptions, train

    if args.resume and not (Path(args.out) / RUN_BACKUP_DIR).exists():
        raise ConfigError(f"--resume: {args.out} holds no run to resume (no {RUN_BACKUP_DIR}/ folder)")

    flags, run_flags = _flags(), _run_flags() + _resume_flags()
    model_config, train_config = get_recipe(args.recipe).apply(get_preset(args.preset), TrainConfig())
    overrides = config_values(args, flags, TrainConfig)
    if "time_budget_s" in overrides:  # --budget is this run's budget on any data (0: none), the demo's too
        overrides.setdefault("demo_time_budget_s", overrides["time_budget_s"])
    train_config = replace(train_config, **overrides)
    model_config = replace(model_config, **config_values(args, flags, ModelConfig))
    data = DataSpec(**config_values(args, flags, DataSpec), synthetic_seed=train_config.seed)
    options = RunOptions(**config_values(args, run_flags, RunOptions))
    # Keras' progress bar, or one line per epoch (-q: none)
    verbose = "auto" if args.progress else 0 if args.quiet else 2
    from kneetf.data.pipeline import corrupt_shards_named

    with corrupt_shards_named(*(p for p in (args.data, Path(args.out) / "data") if p)):
        metrics = train(model_config, train_config, args.out, data=data, preset=args.preset, options=options,
                        recipe=args.recipe, verbose=verbose)
    if not metrics.get("chief", True):
        return 0
    from kneetf.training.train import stop_summary

    m, b = metrics["model"], metrics["mean_baseline"]
    print(f"\n{stop_summary(metrics)}")
    print(f"validation ({metrics['val_split']}, {metrics['val_pairs'] or metrics['train_pairs']} pairs):")
    print(f"  {'':22s} {'PSNR dB':>8s} {'SSIM-2D':>8s}")
    print(f"  {'model':22s} {m['psnr']['mean']:8.2f} {m['ssim_2d']['mean']:8.4f}")
    if "prior_baseline" in metrics:
        p = metrics["prior_baseline"]
        print(f"  {'kernel ridge prior':22s} {p['psnr']['mean']:8.2f} {p['ssim_2d']['mean']:8.4f}")
    print(f"  {'mean volume':22s} {b['psnr']['mean']:8.2f} {b['ssim_2d']['mean']:8.4f}")
    print(f"  gain over the mean volume: {metrics['psnr_gain_db']:+.2f} dB PSNR, {metrics['ssim_gain']:+.4f} SSIM")
    if "prior_baseline" in metrics:
        p = metrics["prior_baseline"]
        print(f"  gain over the kernel ridge prior alone: {m['psnr']['mean'] - p['psnr']['mean']:+.2f} dB PSNR, "
              f"{m['ssim_2d']['mean'] - p['ssim_2d']['mean']:+.4f} SSIM")
    print("  (kneetf evaluate scores the test split against every baseline)")
    print(f"run folder: {args.out}  (model.keras, history.csv, metrics.json, samples.png, tensorboard/)")
    print("RESULT " + json.dumps({"psnr_gain_db": round(metrics["psnr_gain_db"], 3),
                                  "total_s": metrics["total_s"]}))
    return 0
