"""Flags generated from the config dataclasses (`kneetf.cli.options`) and the commands that
use them: every flag name users know still parses into the same config field, defaults come
from the configs and recipes, and the help lists presets and recipes from their registries."""
from __future__ import annotations

import argparse
import dataclasses
import re
from dataclasses import dataclass, field

import pytest

from kneetf.cli.main import _command_parser, main
from kneetf.cli.options import ConfigFlag, add_config_flags, config_values
from kneetf.config import ModelConfig, PreprocessConfig, TrainConfig
from kneetf.errors import ConfigError


@dataclass(frozen=True)
class Toy:
    count: int = field(default=3, metadata={"help": "how many"})
    rate: float = field(default=0.5, metadata={"help": "how fast", "metavar": "R"})
    name: str | None = field(default=None, metadata={"help": "who; default: nobody"})
    mode: str = field(default="a", metadata={"help": "which", "choices": ("a", "b")})
    loud: bool = field(default=False, metadata={"help": "shout"})
    flip: bool = field(default=True, metadata={"help": "flip it"})
    pair: tuple[float, float] = field(default=(1.0, 2.0), metadata={"help": "two", "metavar": "X,Y"})


TOY_FLAGS = [ConfigFlag(Toy, f.name) for f in dataclasses.fields(Toy) if f.name != "rate"] + \
    [ConfigFlag(Toy, "rate", "--speed")]


def _toy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_config_flags(parser, TOY_FLAGS)
    return parser


def test_a_field_is_one_line_of_the_table() -> None:
    parser = _toy_parser()
    assert Toy(**config_values(parser.parse_args([]), TOY_FLAGS, Toy)) == Toy()
    args = parser.parse_args(["--count", "7", "--speed", "2e-3", "--name", "x", "--mode", "b", "--loud", "--no-flip",
                              "--pair", "3,4"])
    assert Toy(**config_values(args, TOY_FLAGS, Toy)) == Toy(7, 2e-3, "x", "b", True, False, (3.0, 4.0))
    text = parser.format_help()
    for expected in ("how many (default: 3)", "--speed R", "how fast (default: 0.5)", "{a,b}", "--no-flip",
                     "--pair X,Y", "two (default: 1,2)"):
        assert expected in " ".join(text.split()), expected
    assert "default: None" not in text and "--rate" not in text
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    with pytest.raises(ConfigError, match=r"--pair takes two numbers X,Y. Received: '3'"):
        config_values(parser.parse_args(["--pair", "3"]), TOY_FLAGS, Toy)


def _train_configs(monkeypatch, tmp_path, argv: list[str]) -> dict:
    import kneetf.training.train as T

    seen = {}

    def fake_train(model_config, train_config, out, **kwargs):
        seen.update(model=model_config, train=train_config, **kwargs)
        return {"chief": False}

    monkeypatch.setattr(T, "train", fake_train)
    assert main(["train", "--out", str(tmp_path / "run"), *argv]) == 0
    return seen


def test_train_without_flags_is_the_recipe(monkeypatch, tmp_path) -> None:
    from kneetf.presets import get_preset
    from kneetf.training.recipes import get_recipe
    from kneetf.training.train import DataSpec, RunOptions

    for recipe in ("default", "mean", "paper"):
        seen = _train_configs(monkeypatch, tmp_path, ["--recipe", recipe])
        model, train = get_recipe(recipe).apply(get_preset("compact"), TrainConfig())
        assert (seen["model"], seen["train"]) == (model, train)
        assert seen["data"] == DataSpec() and seen["options"] == RunOptions()


def test_every_train_flag_name_sets_its_field(monkeypatch, tmp_path) -> None:
    seen = _train_configs(monkeypatch, tmp_path, [
        "--preset", "tiny", "--data", "cache", "--synthetic-n", "64", "--epochs", "3", "--batch-size", "4",
        "--lr-encdec", "1e-4", "--lr-generator", "2e-4", "--loss-weights", "2,1", "--augment", "0.5",
        "--shift-augment", "2", "--ssim-weight", "0.1", "--gradient-weight", "0.2", "--latent-dropout", "0.1",
        "--early-stopping", "3", "--lr-schedule", "constant", "--budget", "100", "--seed", "5", "--workers", "1",
        "--strategy", "one-device", "--precision", "mixed_bfloat16", "--jit", "--fresh",
        "--prior-features", "pixels", "--prior-downsample", "4", "--prior-gradient-weight", "0.25",
        "--prior-cv-repeats", "2"])
    t, m, data, options = seen["train"], seen["model"], seen["data"], seen["options"]
    assert (t.epochs, t.batch_size, t.lr_encdec, t.lr_generator, t.loss_weights) == (3, 4, 1e-4, 2e-4, (2.0, 1.0))
    assert (t.augment, t.shift_augment, t.ssim_weight, t.gradient_weight) == (0.5, 2, 0.1, 0.2)
    assert (t.early_stopping_patience, t.lr_schedule, t.time_budget_s, t.seed) == (3, "constant", 100.0, 5)
    assert m.latent_dropout == 0.1 and m.encoder_filters == (2, 2, 4, 4, 8, 8)
    assert (m.prior_features, m.prior_downsample, t.prior_gradient_weight, t.prior_cv_repeats) == ("pixels", 4, 0.25, 2)
    assert (data.path, data.synthetic_n, data.synthetic_seed, data.workers) == ("cache", 64, 5, 1)
    assert (options.strategy, options.precision, options.jit, options.fresh) == ("one-device", "mixed_bfloat16",
                                                                                True, True)


def test_train_on_a_manifest_takes_the_prepare_roi_choices(monkeypatch, tmp_path, capsys) -> None:
    """`--rois` / `--roi-detector` reach the preparation of a manifest --data; with a cache or
    the synthetic knees, or both at once, they are refused before anything runs."""
    import kneetf.data.sources as S
    from kneetf.training.train import DataSpec, resolve_cache

    seen = _train_configs(monkeypatch, tmp_path, ["--data", "m.csv", "--rois", "boxes.csv"])
    assert (seen["data"].rois, seen["data"].roi_detector) == ("boxes.csv", None)
    prepared = {}

    def fake_prepare(manifest, out, config, **kwargs):
        prepared.update(kwargs)
        return S.CacheResult(out_dir=out, counts={"train": 1})

    monkeypatch.setattr(S, "prepare_manifest", fake_prepare)
    (tmp_path / "m.csv").write_text("id,xray,mri\n")
    resolve_cache(DataSpec(path=str(tmp_path / "m.csv"), roi_detector="classical"), tmp_path / "run",
                  PreprocessConfig(), progress=False)
    assert (prepared["rois"], prepared["detector"]) == (None, "classical")
    for argv, says in ((["--data", "cache", "--rois", "b.csv"], "a cache holds its boxes already"),
                       (["--roi-detector", "classical"], "the synthetic knees need none"),
                       (["--data", "m.csv", "--rois", "b.csv", "--roi-detector", "builtin"], "not both")):
        assert main(["train", "--out", str(tmp_path / "run"), *argv]) == 1
        assert says in capsys.readouterr().err


def test_the_default_recipes_budget_is_the_demos_and_budget_replaces_it(monkeypatch, tmp_path) -> None:
    from kneetf.training.train import DataSpec, time_budget

    seen = _train_configs(monkeypatch, tmp_path, ["--preset", "tiny"])
    assert time_budget(seen["train"], DataSpec(path=None)) == 500.0  # the built-in demo
    assert time_budget(seen["train"], DataSpec(path="cache")) == 0.0  # a user's data is never cut
    seen = _train_configs(monkeypatch, tmp_path, ["--preset", "tiny", "--budget", "0"])
    assert time_budget(seen["train"], DataSpec(path=None)) == 0.0
    seen = _train_configs(monkeypatch, tmp_path, ["--preset", "tiny", "--budget", "60", "--data", "cache"])
    assert time_budget(seen["train"], seen["data"]) == 60.0


def test_train_help_lists_registries_and_recipe_defaults() -> None:
    from kneetf.presets import preset_names
    from kneetf.training.recipes import RECIPES

    text = " ".join(_command_parser("train")[0].format_help().split())
    for name in [*preset_names(), *RECIPES]:
        assert f"{name} (" in text, name
    assert "the recipe's: 32 for paper, 16 for mean, 16 for default" in text  # --batch-size
    assert "(default: 1,1)" in text  # --loss-weights: the same in every recipe
    for flag in ("--budget", "--early-stopping", "--lr-encdec", "--loss-weights", "--synthetic-n", "--fresh"):
        assert flag in text


def test_prepare_flags_set_the_preprocessing_and_options(monkeypatch, tmp_path) -> None:
    import kneetf.data.sources as S

    seen = {}

    def fake_prepare(manifest, out, config, **kwargs):
        seen.update(config=config, **kwargs)
        return S.CacheResult(out_dir=tmp_path, counts={"train": 1})

    monkeypatch.setattr(S, "prepare_manifest", fake_prepare)
    assert main(["prepare", "m.csv", "--out", "c"]) == 0
    assert seen["config"] == PreprocessConfig()
    assert (seen["workers"], seen["shard_size"], seen["roi_preview"], seen["allow_outside"]) == (2, 64, False, False)
    assert main(["prepare", "m.csv", "--out", "c", "--slice-start", "10", "--num-slices", "8", "--mirror-left",
                 "--workers", "0", "--shard-size", "16", "--roi-preview", "--allow-outside"]) == 0
    assert seen["config"] == PreprocessConfig(slice_start=10, num_slices=8, mirror_left=True)
    assert (seen["workers"], seen["shard_size"], seen["roi_preview"], seen["allow_outside"]) == (0, 16, True, True)


def test_exposed_fields_have_help() -> None:
    """A field the CLI exposes says what it is; a `--help` without it would be empty."""
    from kneetf.cli import prepare, synth, train, train_roi

    for flags in (train._flags(), train._run_flags(), prepare._flags(), synth._flags(), train_roi._flags()):
        for flag in flags:
            assert flag.field.metadata.get("help"), f"{flag.config.__name__}.{flag.name}"
    assert ModelConfig.__dataclass_fields__["latent_dropout"].metadata["metavar"] == "P"


def test_command_help_does_not_import_tensorflow() -> None:
    """`kneetf COMMAND --help` builds its flags from the configs without loading TensorFlow
    (train-roi's --arch choices come from the detector's config module, not the Keras one)."""
    import subprocess
    import sys

    commands = ["train", "prepare", "synth", "import-oai", "evaluate", "predict", "export", "client", "train-roi"]
    code = ("import sys; from kneetf.cli.main import _command_parser\n"
            f"for c in {commands!r}: _command_parser(c)[0].format_help()\n"
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], r"seed must lie in \[0, 2\*\*32\)"),
    (["--seed", "99999999999"], r"seed must lie in \[0, 2\*\*32\)"),
    (["--lr-encdec", "inf"], "lr_encdec must be a finite number"),
    (["--ssim-weight", "nan"], "ssim_weight must be a finite number"),
    (["--loss-weights=nan,1"], "loss_weights must be finite numbers"),
    (["--budget", "nan"], "time_budget_s must be a number of seconds"),
])
def test_training_values_that_cannot_train_are_refused(argv, message, tmp_path, capsys):
    """A negative seed crashed in Keras; NaN weights and an infinite rate trained on NaN and ended 'done'."""
    assert main(["train", "--preset", "tiny", "--epochs", "1", "--out", str(tmp_path / "run"), *argv]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["jpeg", "", "nifti,mp4"])
def test_a_bad_output_format_is_a_bad_command_line(value, capsys) -> None:
    """--format was checked only once the command ran (exit 1); --names, its neighbour, exits 2."""
    with pytest.raises(SystemExit) as e:
        main(["predict", "--model", "m.keras", "x.png", "--out", "o", "--format", value])
    assert e.value.code == 2
    assert f"argument --format: takes a comma-separated list of nifti, dicom, png. Received: {value!r}" in \
        capsys.readouterr().err
    parser, _ = _command_parser("predict")
    assert parser.parse_args(["--model", "m", "x.png", "--out", "o", "--format", "NII,png,png"]).format == \
        ("nifti", "png")
    assert parser.parse_args(["--model", "m", "x.png", "--out", "o"]).format == ("nifti",)
