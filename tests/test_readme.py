"""Every command block of README.md runs as written: here, or in the test or CI step named in
`ELSEWHERE`. A block that is in neither fails `test_every_block_is_run_or_covered`.

Blocks run here go through `kneetf.cli.main` in-process (what the `kneetf` and `kneetf-train`
console scripts call), in the test's own working folder, with these tiny substitutions so
that they take seconds instead of minutes:

- every `kneetf-train` gets `--preset tiny --epochs 1 --batch-size 4` appended (the last
  value of a flag wins), and `--synthetic-n 16` when it trains on the built-in synthetic
  knees; its synthetic data are generated once and copied into each fresh working folder;
- the placeholder `CACHE_OR_MANIFEST.csv` is a cache prepared by `kneetf prepare`;
- `synthetic-n512` (the default run's data folder) becomes `synthetic-n16`;
- `kneetf synth --n 300` becomes `--n 16`;
- the client example's `localhost:8500` is the in-process test server's address, and its
  `knee_roi.png`, like the predict block's `knee.dcm` and `more_xrays/`, is a made-up knee.
"""
from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

#: README blocks run by another test or by CI, by their first line: (file, test or step, why).
ELSEWHERE: dict[str, tuple[str, str, str]] = {
    "# train: install kneetf and train the default model on the built-in synthetic knees (CPU, about 10 min)": (
        ".ci/run", "# test:", "CI runs the '# test:' line as written in a fresh clone (a clean venv, the same "
        "editable install as the '# train:' line); the train line's `kneetf-train` is the Training block's "
        "first command, run here"),
    "import numpy as np": ("tests/test_api.py", "test_readme_example_runs_verbatim", "the Python API example"),
    "# machine A (chief)": ("tests/test_distributed.py", "test_two_workers_end_with_the_same_weights",
                            "two workers with their own TF_CONFIG on localhost (hostA / hostB are placeholders)"),
    "python tools/bench_train.py --presets compact,paper --batches compact=32 --batches paper=4 \\": (
        "tests/test_bench.py", "test_one_tf_training_measurement",
        "tools/bench_train.py on the tiny preset; the full benchmark is a measurement, not a test"),
    "kneetf train-roi --out roi.keras                                  # simulated radiographs, about 10-15 min on 2 cores": (
        "tests/test_roi_training.py", "test_train_roi_cli_on_simulated_radiographs",
        "train-roi on a few radiographs for one epoch (--data / --boxes / --init in the tests next to it; bench_roi in "
        "tests/test_bench_roi.py)"),
    "python tools/compare_priors.py --data evalA/cache     # likewise evalB, evalC": (
        "tests/test_compare_priors.py", "test_compare_priors_scores_every_predictor_against_kernel_ridge",
        "the tool on a small cache; the three held-out sets are a measurement, not a test"),
    "python tools/fuzz_readers.py --kind xray --cases 1500 --seed 4": (
        "tests/test_fuzz_readers.py", "test_mutated_inputs_give_an_image_or_their_own_error",
        "the tool on 40 X-ray and 16 MRI cases; the 1,500 and 700 cases are a measurement, not a test"),
    '.venv/bin/python -m pytest -q -m "not slow"    # the fast tests only': (
        ".ci/run", "# test:", "CI runs the whole suite; the fast tests are a subset of it"),
}
#: README blocks run here, by their first line: the test that runs them.
RUN_HERE: dict[str, str] = {
    "kneetf-train                                   # compact preset, synthetic knees, runs/train/":
        "test_training_block",
    "kneetf evaluate --model runs/train --data runs/train/data/synthetic-n512-seed0 --split test --out runs/eval":
        "test_evaluate_and_predict_block",
    "from kneetf.client import ServingClient": "test_serving_client_block",
    "kneetf-train                                                         # runs/train":
        "test_results_default_run_block",
    "kneetf synth --out heldout/raw --n 300 --seed 2026 --formats dicom --monochrome1-fraction 0.3 \\":
        "test_heldout_block",
}
TINY_TRAIN = ["--preset", "tiny", "--epochs", "1", "--batch-size", "4"]
SUBSTITUTIONS = [("synthetic-n512", "synthetic-n16"), ("--n 300", "--n 16")]


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    line: int

    @property
    def first(self) -> str:
        return self.text.splitlines()[0]


def readme_blocks() -> list[Block]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        out.append(Block(m.group(1), m.group(2), text[:m.start()].count("\n") + 1))
    return out


def block(first: str) -> Block:
    [b] = [b for b in readme_blocks() if b.first == first]
    return b


def commands(text: str) -> list[list[str]]:
    """The shell commands of a block: continuation lines joined, comments dropped."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        for old, new in SUBSTITUTIONS:
            line = line.replace(old, new)
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def run_command(argv: list[str], synthetic: Path | None = None) -> None:
    """One README command through `kneetf.cli.main`, with the tiny substitutions."""
    from kneetf.cli.main import main

    if argv[0] == "kneetf-train":
        args = ["train", *argv[1:], *TINY_TRAIN]
        if "--data" not in argv:
            args += ["--synthetic-n", "16"]
            if synthetic is not None:  # the built-in data, generated once
                dest = Path(args[args.index("--out") + 1] if "--out" in args else "runs/train") / "data"
                if not (dest / synthetic.name).exists():
                    shutil.copytree(synthetic, dest / synthetic.name)
    else:
        assert argv[0] == "kneetf", argv
        args = argv[1:]
    assert main(args) == 0, argv


def _knee_image(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:160, 0:140].astype("float32")
    bones = np.where(np.abs(yy - 80) > 6, 1.0, 0.2) * np.exp(-((xx - 70) / 40.0) ** 2)
    return np.round(800 + 3000 * bones + 40 * rng.standard_normal(yy.shape)).astype("float32")


def test_every_block_is_run_or_covered():
    blocks = readme_blocks()
    firsts = [b.first for b in blocks]
    uncovered = [f"README.md:{b.line}: {b.first}" for b in blocks if b.first not in RUN_HERE and b.first not in ELSEWHERE]
    assert not uncovered, "README blocks that no test or CI step runs:\n" + "\n".join(uncovered)
    stale = [k for k in (*RUN_HERE, *ELSEWHERE) if k not in firsts]
    assert not stale, f"no README block starts with: {stale}"
    assert len(set(firsts)) == len(firsts), "two README blocks start with the same line"
    for name in RUN_HERE.values():
        assert callable(globals().get(name)), name
    for path, where, _ in ELSEWHERE.values():
        text = (REPO / path).read_text(encoding="utf-8")
        assert (f"def {where}(" in text) if path.endswith(".py") else (where in text), (path, where)
    ci = (REPO / ".ci" / "run").read_text()
    assert "'^# test:'" in ci and "# test:" in (REPO / "README.md").read_text()


def test_readme_cites_only_files_in_the_repository():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert "DESIGN.md" not in text and "STYLE.md" not in text
    for target in re.findall(r"\]\(([^)#\s]+)", text):  # markdown links and images
        if "://" not in target:
            assert (REPO / target).exists(), target
    for name in set(re.findall(r"(?<![\w/.-])((?:docs|tools|serving|kneetf|tests)/[\w./-]*\w)", text)):
        assert (REPO / name).exists(), name


# === blocks run here (slow: they train tiny models) ===

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """The default run's synthetic data at the tiny size, made by `kneetf-train` itself."""
    import os

    root = tmp_path_factory.mktemp("synthetic")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_command(["kneetf-train"])
    finally:
        os.chdir(cwd)
    return root / "runs" / "train" / "data" / "synthetic-n16-seed0"


@pytest.fixture(scope="module")
def default_run(synthetic) -> Path:
    """The folder where `kneetf-train` (no options) ran: runs/train and its data."""
    return synthetic.parents[3]


@pytest.mark.slow
def test_training_block(tmp_path, synthetic, monkeypatch):
    for k, argv in enumerate(commands(block(next(k for k, v in RUN_HERE.items()
                                                 if v == "test_training_block")).text)):
        folder = tmp_path / f"cmd{k}"
        folder.mkdir()
        monkeypatch.chdir(folder)
        argv = [str(synthetic) if a == "CACHE_OR_MANIFEST.csv" else a for a in argv]
        run_command(argv, synthetic)
        assert (folder / "runs" / "train" / "model.keras").is_file(), argv


@pytest.mark.slow
def test_evaluate_and_predict_block(default_run, monkeypatch):
    import csv

    from kneetf.io.writers import write_dicom_xray, write_png

    monkeypatch.chdir(default_run)
    write_dicom_xray(Path("knee.dcm"), _knee_image(0), laterality="R")
    Path("more_xrays").mkdir(exist_ok=True)
    write_png(Path("more_xrays") / "a.png", _knee_image(1).astype("uint16"))
    np.save(Path("more_xrays") / "b.npy", _knee_image(2))
    shutil.rmtree("predictions", ignore_errors=True)
    for argv in commands(block("kneetf evaluate --model runs/train --data runs/train/data/synthetic-n512-seed0 "
                               "--split test --out runs/eval").text):
        run_command(argv)
    assert Path("runs/eval/summary.json").is_file()
    key = list(csv.DictReader(open("predictions/PRIVATE_pseudonym_key.csv")))
    assert len(key) == 3 and {r["result"] for r in key} == {"written"}
    for r in key:
        for suffix in (".nii.gz", "_dicom", ".png"):
            assert Path("predictions", r["pseudonym"] + suffix).exists()


@pytest.mark.slow
def test_results_default_run_block(default_run, monkeypatch):
    monkeypatch.chdir(default_run)
    shutil.rmtree("runs/eval", ignore_errors=True)
    argvs = commands(block("kneetf-train                                                         # runs/train").text)
    assert argvs[0] == ["kneetf-train"]  # the run `default_run` made; run again, it only re-evaluates
    for argv in argvs:
        run_command(argv)
    assert Path("runs/eval/per_subject.csv").is_file()


@pytest.mark.slow
def test_heldout_block(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first = "kneetf synth --out heldout/raw --n 300 --seed 2026 --formats dicom --monochrome1-fraction 0.3 \\"
    for argv in commands(block(first).text):
        run_command(argv)
    for folder in ("runs/heldout_eval", "runs/heldout_paper_eval"):
        assert (tmp_path / folder / "summary.json").is_file()


@pytest.mark.slow
def test_serving_client_block(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_serving.apis")
    import serving_server

    from kneetf.export.savedmodel import export_savedmodel
    from kneetf.io.writers import write_png

    model = serving_server.make_test_model(tmp_path / "model.keras", "tiny", seed=1)
    export_savedmodel(model, tmp_path / "saved_models" / "kneetf", verify=False, warmup_batch_sizes=())
    server = serving_server.LocalServingServer({"kneetf": tmp_path / "saved_models" / "kneetf"}).start()
    try:
        monkeypatch.chdir(tmp_path)
        write_png(tmp_path / "knee_roi.png", _knee_image(3).astype("uint16"))
        code = block("from kneetf.client import ServingClient").text.replace("localhost:8500", server.grpc_target)
        ast.parse(code)
        scope: dict = {}
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, "README.md", "exec"), scope)
    finally:
        server.stop()
    assert scope["out"]["mri"].shape == (1, 128, 128, 20)
