"""A model file is code: SavedModels and TFLite files that would do I/O are refused unless trusted."""
from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from kneetf.cli.main import main  # noqa: E402
from kneetf.errors import UnsafeModelError  # noqa: E402
from kneetf.inference.predictor import load_predictor  # noqa: E402
from kneetf.inference.trust import (ALLOWED_OPS, check_savedmodel, check_tflite, custom_tflite_ops,  # noqa: E402
                                    unsafe_savedmodel_ops)


SPEC = tf.TensorSpec((None, 128, 128, 1), tf.float32, name="xray")


def _outputs(xray: tf.Tensor) -> dict[str, tf.Tensor]:
    return {"mri": tf.tile(xray, [1, 1, 1, 20]), "xray_recon": xray}


def _save(module: tf.Module, folder) -> str:
    tf.saved_model.save(module, str(folder), signatures={"predict_normalized": module.serve})
    return str(folder)


def _writer(target: str) -> tf.Module:
    """A model that looks like a kneetf export and writes `target` when called."""

    class Writer(tf.Module):
        @tf.function(input_signature=[SPEC])
        def serve(self, xray):
            tf.io.write_file(target, "written by the model")
            return _outputs(xray)

    return Writer()


def test_malicious_savedmodel_is_refused_by_predict(tmp_path, capsys):
    """The model writes a file outside --out when it runs: predict refuses it, naming the
    operation, and runs it only with --trust-model."""
    from roi_factory import standin_knee

    target = tmp_path / "outside" / "pwned.txt"
    target.parent.mkdir()
    model = _save(_writer(str(target)), tmp_path / "evil")
    image, _ = standin_knee(np.random.default_rng(0), (200, 220))
    np.save(tmp_path / "knee.npy", image.astype(np.float32))

    rc = main(["predict", "--model", model, str(tmp_path / "knee.npy"), "--out", str(tmp_path / "out"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "WriteFile" in err and "--trust-model" in err and "evil" in err
    assert not target.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.nii.gz"))

    assert main(["predict", "--model", model, str(tmp_path / "knee.npy"), "--out", str(tmp_path / "out"),
                 "--no-progress", "--trust-model", "--names", "id"]) == 0
    assert target.read_text() == "written by the model"  # what the check prevented
    assert (tmp_path / "out" / "knee.nii.gz").is_file()


def test_malicious_savedmodel_is_refused_by_evaluate(tmp_path, capsys):
    """evaluate loads models through the same check: refused, then run with --trust-model."""
    from cache_factory import load_disc_pair as load_pair

    from kneetf.data.cache import CacheTask, build_cache

    cache = tmp_path / "cache"
    tasks = [CacheTask(f"k{i:03d}", "train", i) for i in range(6)] + [CacheTask("k100", "test", 100)]
    build_cache(tasks, load_pair, cache, workers=0, progress=False)
    target = tmp_path / "outside" / "pwned.txt"
    target.parent.mkdir()
    model = _save(_writer(str(target)), tmp_path / "evil")
    command = ["evaluate", "--model", model, "--data", str(cache), "--out", str(tmp_path / "report"),
               "--no-strong", "--knn", "2", "--no-progress"]

    rc = main(command)
    err = capsys.readouterr().err
    assert rc == 1 and "WriteFile" in err and "--trust-model" in err and "evil" in err
    assert not target.exists()
    assert main(command + ["--trust-model"]) == 0
    assert target.read_text() == "written by the model"
    assert (tmp_path / "report" / "summary.json").is_file()


def _nested(root):
    @tf.function
    def inner(x):
        tf.io.write_file(str(root / "nested.txt"), tf.strings.as_string(tf.reduce_sum(x)))
        return x

    class Nested(tf.Module):
        @tf.function(input_signature=[SPEC])
        def serve(self, xray):
            return _outputs(inner(xray))

    return Nested()


def _table(root):
    """Reads a file when loaded (a resource initialiser), before any signature runs."""
    (root / "vocab.txt").write_text("a\nb\n")

    class Table(tf.Module):
        def __init__(self):
            init = tf.lookup.TextFileInitializer(str(root / "vocab.txt"), tf.string, tf.lookup.TextFileIndex.WHOLE_LINE,
                                                 tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER)
            self.table = tf.lookup.StaticHashTable(init, -1)

        @tf.function(input_signature=[SPEC])
        def serve(self, xray):
            return _outputs(xray * tf.cast(self.table.lookup(tf.constant("a")), tf.float32))

    return Table()


def _reader(root):
    class Reader(tf.Module):
        @tf.function(input_signature=[SPEC])
        def serve(self, xray):
            return _outputs(xray + tf.cast(tf.strings.length(tf.io.read_file(str(root / "secret"))), tf.float32))

    return Reader()


def _printer(root):
    class Printer(tf.Module):
        @tf.function(input_signature=[SPEC])
        def serve(self, xray):
            tf.print("x", output_stream=f"file://{root / 'printed.txt'}")
            return _outputs(xray)

    return Printer()


def _saver(root):
    class Saver(tf.Module):
        @tf.function(input_signature=[SPEC])
        def serve(self, xray):
            tf.raw_ops.SaveV2(prefix=str(root / "ckpt"), tensor_names=["x"], shape_and_slices=[""], tensors=[xray])
            return _outputs(xray)

    return Saver()


def _py(root):
    class Py(tf.Module):
        @tf.function(input_signature=[SPEC])
        def serve(self, xray):
            return _outputs(tf.py_function(lambda x: x, [xray], tf.float32))

    return Py()


@pytest.mark.parametrize("build, op", [
    (_nested, "WriteFile"),  # in a function the signature calls
    (_table, "InitializeTableFromTextFileV2"),  # run by tf.saved_model.load itself
    (_reader, "ReadFile"),
    (_printer, "PrintV2"),
    (_saver, "SaveV2"),  # allowed in the SavedModel's own saver only
    (_py, "EagerPyFunc"),
])
def test_io_operations_are_found_wherever_they_are(tmp_path, build, op):
    folder = _save(build(tmp_path), tmp_path / "model")
    assert op in unsafe_savedmodel_ops(folder)
    with pytest.raises(UnsafeModelError, match=op):
        load_predictor(folder)
    with pytest.raises(UnsafeModelError, match="trust"):
        check_savedmodel(folder)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["compact", "paper"])
def test_exports_of_every_preset_pass(tmp_path, preset):
    """Every operation of an export (signatures, gradients, the saver) is allowed, so the
    exports of today's models load without --trust-model (the tiny preset's: test_export);
    a new operation in the model fails here first."""
    from kneetf.export.savedmodel import write_savedmodel
    from kneetf.config import PreprocessConfig
    from kneetf.models.kneenet import KneeNet

    write_savedmodel(KneeNet.from_preset(preset), PreprocessConfig(), tmp_path / "export")
    assert unsafe_savedmodel_ops(tmp_path / "export") == {}


def test_allow_list_holds_no_io():
    assert not ALLOWED_OPS & {"ReadFile", "WriteFile", "MatchingFiles", "SaveV2", "RestoreV2", "PyFunc",
                              "EagerPyFunc", "PrintV2", "DecodeProtoV2", "ImmutableConst"}


def test_tflite_custom_and_flex_ops_are_refused(tmp_path):
    @tf.function(input_signature=[tf.TensorSpec((1, 4), tf.float32)])
    def flex(x):
        return x * tf.linalg.det(tf.reshape(x, (1, 2, 2)))

    @tf.function(input_signature=[tf.TensorSpec((1, 4), tf.float32)])
    def custom(x):
        return tf.math.bessel_i0e(x)

    for name, fn in (("flex", flex), ("custom", custom)):
        converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
        if name == "flex":
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
        else:
            converter.allow_custom_ops = True
        (tmp_path / f"{name}.tflite").write_bytes(converter.convert())
    assert custom_tflite_ops(tmp_path / "flex.tflite") == ["FlexMatrixDeterminant"]
    assert custom_tflite_ops(tmp_path / "custom.tflite") == ["BesselI0e"]
    with pytest.raises(UnsafeModelError, match="FlexMatrixDeterminant"):
        load_predictor(tmp_path / "flex.tflite")
    with pytest.raises(UnsafeModelError, match="BesselI0e.*trust"):
        check_tflite(tmp_path / "custom.tflite")
    (tmp_path / "junk.tflite").write_bytes(b"\x00" * 16)
    with pytest.raises(UnsafeModelError, match="junk.tflite"):
        check_tflite(tmp_path / "junk.tflite")
