"""`kneetf train` / `kneetf-train`: train KneeNet; with no arguments, the compact preset on
the built-in synthetic knees."""
from __future__ import annotations

import argparse
import json

HELP = "train KneeNet (default: the compact preset on built-in synthetic knees)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="compact", help="model preset: paper, compact (default), tiny")
    p.add_argument("--recipe", default="default",
                   help="training recipe: default, or paper (the paper's recipe as written)")
    p.add_argument("--data", default=None,
                   help="a cache folder (from `kneetf prepare`) or a manifest CSV; default: built-in synthetic knees")
    p.add_argument("--synthetic-n", type=int, default=512, help="number of synthetic knees (default 512)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the recipe's)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: the recipe's)")
    p.add_argument("--lr-encdec", type=float, default=None,
                   help="Adam rate of encoder+decoder (default: the recipe's)")
    p.add_argument("--lr-generator", type=float, default=None,
                   help="Adam rate of the generator (default: the recipe's)")
    p.add_argument("--loss-weights", default=None, metavar="XRAY,MRI",
                   help="weights of the X-ray and MRI MSE terms (default 1,1)")
    p.add_argument("--augment", type=float, default=None, metavar="STRENGTH",
                   help="X-ray intensity augmentation strength (0 = off; default: the recipe's)")
    p.add_argument("--shift-augment", type=int, default=None, metavar="PIXELS",
                   help="move each training X-ray by up to this many pixels (default: the recipe's)")
    p.add_argument("--ssim-weight", type=float, default=None, metavar="W",
                   help="weight of a 1 - SSIM (2-D slices) term in the MRI loss (default: the recipe's)")
    p.add_argument("--gradient-weight", type=float, default=None, metavar="W",
                   help="weight of an image-gradient MSE term in the MRI loss (default: the recipe's)")
    p.add_argument("--latent-dropout", type=float, default=None, metavar="P",
                   help="dropout rate on the latent the generator sees (default: the recipe's)")
    p.add_argument("--early-stopping", type=int, default=None, metavar="EPOCHS",
                   help="stop when the validation loss has not improved for this many epochs (0 = off)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default=None,
                   help="learning-rate schedule (default: the recipe's)")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="stop after the epoch that ends this long after the start, data preparation "
                        "included (default: the recipe's, 500 s; 0 = no limit)")
    p.add_argument("--seed", type=int, default=0, help="random seed (data order, init, synthetic set)")
    p.add_argument("--workers", type=int, default=2, help="processes that decode / generate data")
    p.add_argument("--out", default="runs/train",
                   help="run folder (default runs/train); run again to resume an interrupted run")
    p.add_argument("--strategy", default="auto", choices=["auto", "one-device", "mirrored", "multiworker"],
                   help="tf.distribute strategy (auto: mirrored when several GPUs are visible; "
                        "multiworker reads TF_CONFIG)")
    p.add_argument("--precision", default="float32", choices=["float32", "mixed_float16", "mixed_bfloat16"],
                   help="Keras dtype policy while training (saved models are float32)")
    p.add_argument("--jit", action="store_true", help="XLA-compile the training step (slower on CPU)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --out (an error if there is none); with a larger --epochs, "
                            "train a finished run further")
    group.add_argument("--fresh", action="store_true", help="discard the backup in --out and start over")


def _loss_weights(text: str) -> tuple[float, float]:
    from kneetf.errors import ConfigError

    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--loss-weights takes two numbers XRAY,MRI. Received: {text!r}") from None
    return (a, b)


def run(args: argparse.Namespace) -> int:
    from kneetf.config import TrainConfig, replace
    from kneetf.presets import get_preset
    from kneetf.training.recipes import get_recipe
    from pathlib import Path

    from kneetf.errors import ConfigError
    from kneetf.training.train import DataSpec, RunOptions, train

    if args.resume and not (Path(args.out) / "backup").exists():
        raise ConfigError(f"--resume: {args.out} holds no run to resume (no backup/ folder)")

    model_config, train_config = get_recipe(args.recipe).apply(get_preset(args.preset), TrainConfig(seed=args.seed))
    overrides = {k: v for k, v in {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr_encdec": args.lr_encdec,
        "lr_generator": args.lr_generator, "time_budget_s": args.budget,
        "loss_weights": _loss_weights(args.loss_weights) if args.loss_weights else None,
        "augment": args.augment, "shift_augment": args.shift_augment, "lr_schedule": args.lr_schedule,
        "ssim_weight": args.ssim_weight, "gradient_weight": args.gradient_weight,
        "early_stopping_patience": args.early_stopping,
    }.items() if v is not None}
    train_config = replace(train_config, **overrides)
    if args.latent_dropout is not None:
        model_config = replace(model_config, latent_dropout=args.latent_dropout)
    data = DataSpec(path=args.data, synthetic_n=args.synthetic_n, synthetic_seed=args.seed, workers=args.workers)
    options = RunOptions(strategy=args.strategy, precision=args.precision, jit=args.jit, fresh=args.fresh)
    metrics = train(model_config, train_config, args.out, data=data, preset=args.preset, options=options,
                    recipe=args.recipe)
    if not metrics.get("chief", True):
        return 0
    m, b = metrics["model"], metrics["mean_baseline"]
    print(f"\nvalidation ({metrics['val_split']}, {metrics['val_pairs'] or metrics['train_pairs']} pairs):")
    print(f"  {'':14s} {'PSNR dB':>8s} {'SSIM-2D':>8s}")
    print(f"  {'model':14s} {m['psnr']['mean']:8.2f} {m['ssim_2d']['mean']:8.4f}")
    print(f"  {'mean volume':14s} {b['psnr']['mean']:8.2f} {b['ssim_2d']['mean']:8.4f}")
    print(f"  gain over the mean volume: {metrics['psnr_gain_db']:+.2f} dB PSNR, {metrics['ssim_gain']:+.4f} SSIM")
    print(f"run folder: {args.out}  (model.keras, history.csv, metrics.json, samples.png, tensorboard/)")
    print("RESULT " + json.dumps({"psnr_gain_db": round(metrics["psnr_gain_db"], 3),
                                  "total_s": metrics["total_s"]}))
    return 0
