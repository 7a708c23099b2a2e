"""tools/bench_train.py: the twin's view of the presets (tools/perf/spec.py), FLOPs, option parsing,
targets, and one real (tiny) measurement."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("kneetf_bench_train", ROOT / "tools" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _trainable_params(preset: str) -> int:
    from kneetf.models.kneenet import KneeNet

    model = KneeNet(preset)
    return sum(int(v.numpy().size) for v in model.trainable_weights)


def test_the_twin_reads_every_preset_from_kneetf(bench) -> None:
    spec, _, _ = bench._perf_modules()
    from kneetf.presets import get_preset, preset_names

    assert list(spec.PRESETS) == preset_names()
    paper = spec.PRESETS["paper"]
    cfg = get_preset("paper")
    assert (paper["enc"], paper["gen"], paper["gen_strides"]) == (
        list(cfg.encoder_filters), list(cfg.generator_filters), [tuple(s) for s in cfg.generator_strides])
    # compact's output layers are element-wise choices (no FLOPs), named in the notes
    assert any("sigmoid" in n for n in bench.twin_notes("compact"))
    assert bench.twin_notes("paper") == []


@pytest.mark.parametrize("preset", ["tiny", "compact"])
def test_the_twin_has_kneetfs_layers(bench, preset: str) -> None:
    """The twin's convolutions (flops.py's layer list, which torch_ref.py builds) have the
    output shapes of the Keras model's, in order: the twin is kneetf's network."""
    _, flops, _ = bench._perf_modules()
    from kneetf.models.kneenet import KneeNet

    model = KneeNet(preset)
    ours = [tuple(layer.output.shape[1:]) for sub in (model.encoder, model.decoder, model.generator)
            for layer in sub.layers if layer.name.endswith(("_conv", "_deconv"))]
    twin = [tuple(layer["out_shape"]) for layer in flops.layers(preset) if layer["kind"] != "bn"]
    assert ours == twin


def test_flops_of_the_compact_preset(bench) -> None:
    ours = bench.flops_summary("compact")
    assert ours["train_gflop_per_sample"] == pytest.approx(0.577, abs=1e-3)  # docs/performance.md
    assert "layers" not in ours


def test_parameter_counts_match_the_analytic_count(bench) -> None:
    # the twin builds kneetf's network: Keras' count against flops.py's formula over the
    # spec the twin reads. compact's 1-channel X-ray output has no BatchNorm (2 parameters
    # fewer than the twin)
    assert _trainable_params("compact") == bench.flops_summary("compact")["trainable_params"] - 2
    assert _trainable_params("tiny") == bench.flops_summary("tiny")["trainable_params"] - 2


def test_batches_per_preset(bench) -> None:
    out = bench.parse_batches(["paper=1,4", "compact=16"], ["paper", "compact"], bench.DEFAULT_TRAIN_BATCHES)
    assert out == {"paper": [1, 4], "compact": [16]}
    assert bench.parse_batches(["2"], ["paper", "tiny"], {}) == {"paper": [2], "tiny": [2]}
    assert bench.parse_batches(None, ["paper"], bench.DEFAULT_TRAIN_BATCHES) == {"paper": [2, 4]}


def test_targets_read_the_right_rows(bench) -> None:
    row = lambda preset, mode, batch, step, frac, speedup: dict(  # noqa: E731
        preset=preset, mode=mode, batch=batch, speedup=speedup, tf=dict(step_s=step, peak_frac=frac))
    t = bench.targets([row("paper", "train", 4, 2.0, 0.45, 1.6), row("compact", "train", 32, 0.3, 0.1, 1.2),
                       row("paper", "infer", 1, 0.25, 0.2, None), row("paper", "train", 2, 9.0, 0.1, 0.5)])
    assert t["paper_train_b4_speedup"] == {"value": 1.6, "target": 1.5, "met": True}
    assert t["paper_train_b4_peak_frac"]["met"] is True
    assert t["compact_train_b32_speedup"]["met"] is False
    assert t["paper_infer_b1_s"] == {"value": 0.25, "target": 0.2, "met": False}


def test_bf16_ceiling_line_shows_each_ratio(bench, capsys) -> None:
    bench.print_peaks({"tf": {"gflops_best": 100.0}, "tf_bf16": {"gflops_best": 210.0},
                       "tf_conv3d": {"gflops_best": 80.0}, "tf_conv3d_bf16": {"gflops_best": 176.0}})
    out = capsys.readouterr().out
    assert "matmul: fp32 100, bf16 210 GFLOP/s (x2.10)" in out and "(x2.20)" in out
    bench.print_peaks({"tf": {"gflops_best": 100.0}})  # an older result without the bf16 lines
    assert capsys.readouterr().out == ""


@pytest.mark.slow
def test_one_tf_training_measurement(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py"), "--worker", "tf", "--preset", "tiny",
                        "--mode", "train", "--batch", "2", "--steps", "3", "--warmup", "1"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    assert r["preset"] == "tiny" and r["batch"] == 2 and len(r["step_s_all"]) == 3
    assert min(r["step_s_all"]) == r["step_s_min"] > 0
    assert sorted(r["step_s_all"])[1] == r["step_s_median"]
    assert r["first_step_s"] > r["step_s_median"]  # the first step traces the graph
    assert r["last_value"] == r["last_value"] and r["last_value"] > 0  # a real, finite loss
    assert r["peak_rss_mib"] >= r["rss_after_build_mib"] > 0


def test_opprofile_classes_and_bound() -> None:
    spec = importlib.util.spec_from_file_location("kneetf_opprofile", ROOT / "tools" / "perf" / "opprofile.py")
    op = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(op)
    ops = {"kneenet_1/generator_1/generator_block3_deconv_1/conv_transpose:_MklNativeConv3DBackpropInputV2": 1.0,
           "gradient_tape/kneenet_1/generator_1/generator_block3_deconv_1/conv_transpose/Conv3D:_MklNativeConv3D": 2.0,
           "gradient_tape/kneenet_1/generator_1/generator_block3_deconv_1/conv_transpose/"
           "Conv3DBackpropFilterV2:_MklNativeConv3DBackpropFilterV2": 3.0,
           "kneenet_1/generator_1/generator_block7_deconv_1/Conv3D:_MklNativeFusedConv3D": 0.5,
           "Conv3DBackpropFilterV2_1:_MklNativeConv3DBackpropFilterV2": 0.5,
           "kneenet_1/generator_1/generator_block1_deconv_1/MatMul:_MklMatMul": 0.25,
           "kneenet_1/encoder_1/encoder_block1_bn_1/Cast:Cast": 0.125,
           "kneenet_1/generator_1/generator_block3_bn_1/moments/mean:Mean": 1.0,
           "two_rate_adam/Sub_3:Sub": 1.5, "compile_loss/mean_squared_error/sub:Sub": 0.125}
    t = op.class_times(ops)
    assert set(t) == set(op.CLASSES) and sum(t.values()) == pytest.approx(sum(ops.values()))
    assert (t["wide Conv3DTranspose forward"], t["wide Conv3DTranspose input gradient"],
            t["wide Conv3DTranspose kernel gradient"]) == (1.0, 2.0, 3.0)
    assert t["narrow phase-decomposed Conv3DTranspose (fwd+grad)"] == 1.0
    assert t["tiny-input matmul transposed convs (fwd+grad)"] == 0.25
    assert (t["BatchNorm casts"], t["BatchNorm (fwd+grad)"], t["optimizer (Adam)"]) == (0.125, 1.0, 1.5)
    fp32 = dict.fromkeys(op.CLASSES, 0.0)
    fp32.update({"optimizer (Adam)": 2.0, "wide Conv3DTranspose forward": 8.0})
    bf16 = dict.fromkeys(op.CLASSES, 0.0)
    # 10 s in fp32, of which 2 s stay fp32: at best 10 / (2 + 8 / 2)
    assert op.amdahl(fp32, bf16)["bound_batchnorm_fp32"] == pytest.approx(10 / 6)
