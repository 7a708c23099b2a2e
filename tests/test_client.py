"""gRPC and REST clients over the wire, against a test server running a real export."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tensorflow_serving.apis")

from kneetf.cli.main import main  # noqa: E402
from kneetf.config import PreprocessConfig  # noqa: E402
from kneetf.client import ModelNotFoundError, RestClient, ServerUnavailableError, ServingClient  # noqa: E402
from kneetf import protocol  # noqa: E402
from kneetf.client.request import as_batch  # noqa: E402
from kneetf.errors import ConfigError, InputError, ServingError  # noqa: E402
from kneetf.protocol import OUTPUT_KEYS, SERVING_BATCH_SIZES  # noqa: E402
from kneetf.export.samples import structured_samples  # noqa: E402
from kneetf.export.savedmodel import export_savedmodel  # noqa: E402
from kneetf.preprocess import ops  # noqa: E402


import serving_server  # noqa: E402  (tests/serving_server.py; pytest puts tests/ on sys.path)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """The tiny preset exported once (version 1) and served over gRPC and REST; the same
    weights exported with left-knee mirroring served as model "mirrored"."""
    import keras

    import kneetf.models.kneenet  # noqa: F401

    root = tmp_path_factory.mktemp("serving")
    server_module = serving_server
    model_path = server_module.make_test_model(root / "model.keras", "tiny", seed=11)
    base = root / "saved_models" / "kneetf"
    export_savedmodel(model_path, base, verify=False)
    mirrored = root / "saved_models" / "mirrored"
    export_savedmodel(model_path, mirrored, verify=False, warmup_batch_sizes=(),
                      preprocess=PreprocessConfig(mirror_left=True))
    model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    server = server_module.LocalServingServer({"kneetf": base, "mirrored": mirrored}).start()
    yield {"server": server, "model": model, "base": base, "mirrored": mirrored, "root": root}
    server.stop()


@pytest.fixture
def server(served):
    s = served["server"]
    s.faults.reset()
    yield s
    s.faults.reset()


def _raw(batch: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    images = structured_samples(batch, max(h, w), seed)[:, :h, :w, 0]
    return (images * 3000 + 200).astype(np.float32)


def _reference(model, raw: np.ndarray) -> dict[str, np.ndarray]:
    """Keras on the input preprocessed by the shared ops (resize, then normalise)."""
    x = raw if raw.ndim == 4 else raw[..., None] if raw.ndim == 3 else raw[None, ..., None]
    out = model.predict(ops.preprocess_xray(x.astype(np.float32)).numpy(), verbose=0)
    return {k: np.asarray(out[k]) for k in OUTPUT_KEYS}


def _close(got, ref, atol=1e-5):
    for k in OUTPUT_KEYS:
        assert got[k].shape == ref[k].shape, k
        np.testing.assert_allclose(got[k], ref[k], atol=atol, err_msg=k)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# === Same numbers as Keras, every path ===

@pytest.mark.parametrize("resize", [True, False])
def test_grpc_matches_keras(served, server, resize):
    raw = _raw(3, 200, 170, seed=1)
    with ServingClient(server.grpc_target, resize=resize) as client:
        got = client.predict(raw)
    _close(got, _reference(served["model"], raw))
    assert got["mri"].shape == (3, 128, 128, 20) and got["mri"].dtype == np.float32


@pytest.mark.parametrize("form", ["inputs", "instances"])
def test_rest_matches_keras(served, server, form):
    raw = _raw(2, 150, 160, seed=2)
    got = RestClient(server.rest_url, form=form, version=1).predict(raw)
    _close(got, _reference(served["model"], raw))


def test_layouts_files_and_signatures(served, server, tmp_path):
    model = served["model"]
    raw = _raw(2, 140, 140, seed=3)
    client = ServingClient(server.grpc_target)
    ref = _reference(model, raw)
    _close(client.predict(raw[0]), {k: v[:1] for k, v in ref.items()})  # 2-D
    _close(client.predict(raw[..., None]), ref)  # (B, H, W, 1)
    np.save(tmp_path / "knee.npy", raw[1])
    _close(client.predict(tmp_path / "knee.npy"), {k: v[1:] for k, v in ref.items()})  # a file path
    pixels = np.round(raw).astype(np.uint16)
    _close(ServingClient(server.grpc_target, signature="serving_uint16").predict(pixels),
           _reference(model, pixels.astype(np.float32)))
    normalized = ops.preprocess_xray(raw[..., None]).numpy()
    _close(ServingClient(server.grpc_target, signature="predict_normalized").predict(normalized), ref)
    _close(RestClient(server.rest_url, signature="serving_uint16").predict(pixels),
           _reference(model, pixels.astype(np.float32)))


def test_large_batches_are_split(served, server):
    raw = _raw(5, 128, 128, seed=4)
    calls = server.faults.calls
    got = ServingClient(server.grpc_target, max_batch=2).predict(raw)
    assert server.faults.calls - calls == 3  # 2 + 2 + 1
    _close(got, _reference(served["model"], raw))


# === Status, not found, unavailable, retries, deadlines ===

def test_status_and_health(server):
    client = ServingClient(server.grpc_target)
    assert client.status() == [{"version": 1, "state": "AVAILABLE", "error_code": 0, "error_message": ""}]
    assert client.health()
    rest = RestClient(server.rest_url)
    assert [(s["version"], s["state"]) for s in rest.status()] == [(1, "AVAILABLE")]
    assert rest.health()
    assert not ServingClient(server.grpc_target, model="other").health()
    assert not RestClient(server.rest_url, version=5).health()


def test_unknown_model_or_version_is_not_found_without_retry(server):
    raw = _raw(1, 128, 128)
    calls = server.faults.calls
    with pytest.raises(ModelNotFoundError, match=r"model 'other'"):
        ServingClient(server.grpc_target, model="other", backoff=0.01).predict(raw)
    with pytest.raises(ModelNotFoundError, match=r"version 9"):
        ServingClient(server.grpc_target, version=9, backoff=0.01).predict(raw)
    assert server.faults.calls - calls == 2  # one call each: NOT_FOUND is not retried
    with pytest.raises(ModelNotFoundError, match="version 9"):
        RestClient(server.rest_url, version=9).predict(raw)
    with pytest.raises(ModelNotFoundError):
        ServingClient(server.grpc_target, model="other").status()


def test_retries_with_backoff_on_unavailable_only(server):
    raw = _raw(1, 128, 128)
    server.faults.unavailable = 2
    calls = server.faults.calls
    got = ServingClient(server.grpc_target, retries=3, backoff=0.01).predict(raw)
    assert server.faults.calls - calls == 3 and got["mri"].shape == (1, 128, 128, 20)
    server.faults.unavailable = 5
    with pytest.raises(ServerUnavailableError, match=r"after 2 attempt"):
        ServingClient(server.grpc_target, retries=1, backoff=0.01).predict(raw)


def test_server_down(tmp_path):
    port = _free_port()
    raw = _raw(1, 128, 128)
    with pytest.raises(ServerUnavailableError, match=rf"127.0.0.1:{port} after 3 attempt"):
        ServingClient(f"127.0.0.1:{port}", retries=2, backoff=0.01, timeout=5).predict(raw)
    with pytest.raises(ServerUnavailableError, match="after 2 attempt"):
        RestClient(f"127.0.0.1:{port}", retries=1, backoff=0.01, timeout=5).predict(raw)
    assert not ServingClient(f"127.0.0.1:{port}", retries=0, timeout=5).health()


def test_deadline(server):
    server.faults.delay_s = 1.0
    with pytest.raises(ServingError, match=r"within 0.2 s"):
        ServingClient(server.grpc_target, timeout=0.2, retries=0).predict(_raw(1, 128, 128))


# === Clear errors for bad input ===

@pytest.mark.parametrize("bad, message", [
    (np.zeros(100, np.float32), "expected a 2-D image"),
    (np.zeros((64, 64, 3), np.float32), "too small"),
    (np.zeros((1, 64, 64, 3), np.float32), "expected a 2-D image"),
    (np.full((64, 64), np.nan, np.float32), "NaN"),
    (np.array([["a"] * 16] * 16), "numeric"),
    (np.zeros((0, 64, 64), np.float32), "empty"),
])
def test_bad_inputs_are_refused_before_sending(server, bad, message):
    with pytest.raises(InputError, match=message):
        ServingClient(server.grpc_target).predict(bad)


def test_signature_specific_input_checks(server, tmp_path):
    with pytest.raises(InputError, match="65535"):
        ServingClient(server.grpc_target, signature="serving_uint16").predict(np.full((32, 32), -1.0))
    with pytest.raises(InputError, match="integer"):
        ServingClient(server.grpc_target, signature="serving_uint16").predict(np.full((32, 32), 0.5))
    with pytest.raises(InputError, match="128x128"):
        ServingClient(server.grpc_target, signature="predict_normalized").predict(np.zeros((64, 64)))
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ServingClient(server.grpc_target, signature="predict_normalized").predict(np.full((128, 128), 7.0))
    with pytest.raises(ConfigError, match="unknown signature"):
        ServingClient(server.grpc_target, signature="serving")
    with pytest.raises(InputError, match="missing.dcm"):
        ServingClient(server.grpc_target).predict(tmp_path / "missing.dcm")


def test_server_side_dtype_refusal_maps_to_input_error(server):
    """A request the server refuses (INVALID_ARGUMENT) becomes an InputError naming it."""
    client = ServingClient(server.grpc_target)
    wrong = np.zeros((1, 64, 64, 1), np.uint16)  # serving_default takes float32
    with pytest.raises(InputError, match="refused the request.*float"):
        client._predict_chunk(wrong)
    with pytest.raises(InputError, match="refused"):
        RestClient(server.rest_url)._request("POST", protocol.rest_path("kneetf", None, "predict"),
                                             {"instances": [[1, 2]], "inputs": [[1, 2]]})


# === The one request builder ===

@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.float64, np.int32, np.float16, np.uint8])
def test_tensor_codec_agrees_with_tensorflow(dtype):
    x = (np.arange(24).reshape(2, 3, 4, 1) * 3).astype(dtype)
    proto = protocol.tensor_proto(x)
    np.testing.assert_array_equal(tf.make_ndarray(proto), x)  # TF decodes ours
    theirs = tf.make_tensor_proto(x)
    got = protocol.to_ndarray(theirs)  # we decode TF's
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, x)


def test_codec_reads_repeated_fields():
    compact = tf.make_tensor_proto(1.5, dtype=tf.float32, shape=[2, 3])  # one value, broadcast
    np.testing.assert_array_equal(protocol.to_ndarray(compact), np.full((2, 3), 1.5, np.float32))
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1, 2, 3, 4],
                                   tensor_shape=tensor_shape_pb2.TensorShapeProto(
                                       dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=2)] * 2))
    np.testing.assert_array_equal(protocol.to_ndarray(proto), [[1, 2], [3, 4]])


def test_request_builders_share_one_layout():
    batch = as_batch(_raw(2, 64, 80), "serving_default")
    request = protocol.predict_request(batch, "kneetf", 3, "serving_default")
    assert request.model_spec.version.value == 3 and list(request.output_filter) == list(OUTPUT_KEYS)
    np.testing.assert_array_equal(tf.make_ndarray(request.inputs["xray"]), batch)
    body = protocol.rest_body(batch, "serving_default", "inputs")
    np.testing.assert_array_equal(np.asarray(body["inputs"]["xray"], np.float32), batch)
    rows = protocol.rest_body(batch, "serving_default", "instances")["instances"]
    np.testing.assert_array_equal(np.asarray(rows, np.float32), batch)
    with pytest.raises(ServingError, match="lacks output"):
        protocol.parse_rest_response({"outputs": {"output_0": [[[[0.0]]]]}})
    with pytest.raises(ServingError, match="boom"):
        protocol.parse_rest_response({"error": "boom"})
    resized = as_batch(_raw(1, 300, 200), "serving_default", resize=True)
    np.testing.assert_array_equal(resized, ops.resize(_raw(1, 300, 200)[..., None], 128).numpy())


# === TLS ===

@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls(served, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    secure = serving_server.LocalServingServer({"kneetf": served["base"]}, tls=(key, cert)).start()
    try:
        raw = _raw(1, 130, 130, seed=8)
        got = ServingClient(secure.grpc_target, tls=cert).predict(raw)
        _close(got, _reference(served["model"], raw))
        got = ServingClient(f"localhost:{secure.grpc_port}", tls={"root_certificates": cert}).predict(raw)
        _close(got, _reference(served["model"], raw))
        with pytest.raises(ServerUnavailableError):  # plaintext client, TLS server
            ServingClient(secure.grpc_target, retries=0, timeout=5).predict(raw)
        with pytest.raises(InputError, match="nope.pem"):
            ServingClient(secure.grpc_target, tls=tmp_path / "nope.pem")
    finally:
        secure.stop()


# === CLI ===

def test_cli_client_writes_nifti(served, server, tmp_path, capsys):
    nib = pytest.importorskip("nibabel")
    raw = _raw(2, 150, 150, seed=9)  # square, as knee ROI crops are (--cropped)
    np.save(tmp_path / "a.npy", raw[0])
    np.save(tmp_path / "b.npy", raw[1])
    ref = _reference(served["model"], raw)["mri"]  # (2, 128, 128, 20)

    out = tmp_path / "pred.nii.gz"
    assert main(["client", "--server", server.grpc_target, str(tmp_path / "a.npy"), "--out", str(out),
                 "--cropped"]) == 0
    data = np.asarray(nib.load(out).dataobj)  # (slice, row, column)
    np.testing.assert_allclose(data, ref[0].transpose(2, 0, 1), atol=1e-5)

    folder = tmp_path / "preds"
    assert main(["client", "--rest", server.rest_url, str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
                 "--out", str(folder), "--cropped", "--names", "id"]) == 0
    data = np.asarray(nib.load(folder / "b.nii.gz").dataobj)
    np.testing.assert_allclose(data, ref[1].transpose(2, 0, 1), atol=1e-5)
    assert "20 slices of 128x128" in capsys.readouterr().out

    assert main(["client", "--server", server.grpc_target, "--status"]) == 0
    assert "version 1: AVAILABLE" in capsys.readouterr().out
    assert main(["client", "--server", server.grpc_target, "--model", "nope", "--status"]) == 1
    assert "does not serve model 'nope'" in capsys.readouterr().err
    assert main(["client", "--server", server.grpc_target, str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
                 "--out", str(tmp_path / "one.nii.gz")]) == 1
    assert "use a folder" in capsys.readouterr().err

    # exit status 4: some X-rays failed, the others were written; 1: none was
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    assert main(["client", "--server", server.grpc_target, str(tmp_path / "a.npy"), str(tmp_path / "bad.npy"),
                 "--out", str(tmp_path / "some"), "--names", "id"]) == 4
    assert (tmp_path / "some" / "a.nii.gz").exists() and "1 of 2 X-ray(s) failed" in capsys.readouterr().err
    assert main(["client", "--server", server.grpc_target, str(tmp_path / "bad.npy"),
                 "--out", str(tmp_path / "none")]) == 1
    capsys.readouterr()
    # an X-ray written before that fails now loses its earlier output, as with kneetf predict
    np.save(tmp_path / "c.npy", np.load(tmp_path / "a.npy"))
    assert main(["client", "--server", server.grpc_target, str(tmp_path / "c.npy"), "--out", str(tmp_path / "some"),
                 "--names", "id"]) == 0 and (tmp_path / "some" / "c.nii.gz").is_file()
    (tmp_path / "c.npy").write_bytes(b"not an array any more")
    assert main(["client", "--server", server.grpc_target, str(tmp_path / "c.npy"), "--out", str(tmp_path / "some"),
                 "--names", "id"]) == 1
    assert "its earlier output c.nii.gz removed" in capsys.readouterr().err
    assert not (tmp_path / "some" / "c.nii.gz").exists() and (tmp_path / "some" / "a.nii.gz").is_file()

    # as kneetf predict: a folder --out never holds an input, and a file kneetf did not write stays
    assert main(["client", "--server", server.grpc_target, str(tmp_path / "a.npy"), "--out", str(tmp_path),
                 "--cropped"]) == 1
    assert f"holds the input {tmp_path / 'a.npy'}" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.nii.gz").write_bytes(b"the user's own file")
    assert main(["client", "--server", server.grpc_target, str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
                 "--out", str(mine), "--cropped", "--names", "id"]) == 4
    assert (mine / "a.nii.gz").read_bytes() == b"the user's own file" and (mine / "b.nii.gz").is_file()
    assert "exists and was not written by kneetf" in capsys.readouterr().err
    assert main(["client", "--server", server.grpc_target, str(tmp_path / "b.npy"), "--out", str(mine),
                 "--cropped", "--names", "id"]) == 0  # its own output is replaced


def test_client_names_outputs_by_pseudonym_with_a_private_key(served, server, tmp_path):
    """As kneetf predict: in a folder --out the outputs are random pseudonyms by default (input
    file names may hold patient data), and the key maps each to its source and result."""
    import csv

    raw = np.random.default_rng(3).uniform(0, 1, (128, 128)).astype(np.float32)
    np.save(tmp_path / "Doe_Jane_MRN123.npy", raw)
    (tmp_path / "bad.npy").write_bytes(b"not an array")
    out, key = tmp_path / "out", tmp_path / "private" / "key.csv"
    assert main(["client", "--server", server.grpc_target, str(tmp_path / "Doe_Jane_MRN123.npy"),
                 str(tmp_path / "bad.npy"), "--out", str(out), "--cropped", "--pseudonym-key", str(key)]) == 4
    written = [p.name for p in out.iterdir() if p.name != ".kneetf-outputs.json"]
    assert len(written) == 1 and "Doe" not in written[0] and written[0].startswith("knee-")
    rows = {r["source"]: r for r in csv.DictReader(key.open())}
    assert rows[str(tmp_path / "Doe_Jane_MRN123.npy")]["result"] == "written"
    assert rows[str(tmp_path / "Doe_Jane_MRN123.npy")]["pseudonym"] + ".nii.gz" == written[0]
    assert rows[str(tmp_path / "bad.npy")]["result"] == "failed"
    # a single output file is named by the user: no key
    assert main(["client", "--server", server.grpc_target, str(tmp_path / "Doe_Jane_MRN123.npy"), "--out",
                 str(tmp_path / "one.nii.gz"), "--cropped"]) == 0
    assert not (tmp_path / "kneetf_pseudonym_key.csv").exists()


def test_client_boxes_csv_and_same_stems_under_pseudonyms(served, server, tmp_path, capsys):
    """A boxes CSV gives one box per file name: of two `knee.npy` in different folders the second
    is refused with that reason (as `kneetf predict`), naming no other input's folder."""
    import csv

    from kneetf.preprocess.roi import Box, write_boxes

    raw = np.random.default_rng(4).uniform(0, 1, (160, 160)).astype(np.float32)
    for who in ("JohnDoe", "JaneRoe"):
        (tmp_path / who).mkdir()
        np.save(tmp_path / who / "knee.npy", raw)
    write_boxes(tmp_path / "boxes.csv", {"knee": Box(10, 10, 150, 150)})
    out, key = tmp_path / "out", tmp_path / "private" / "key.csv"
    capsys.readouterr()
    assert main(["client", "--server", server.grpc_target, str(tmp_path / "JohnDoe" / "knee.npy"),
                 str(tmp_path / "JaneRoe" / "knee.npy"), "--rois", str(tmp_path / "boxes.csv"), "--out", str(out),
                 "--pseudonym-key", str(key)]) == 4
    err = capsys.readouterr().err
    refused = [ln for ln in err.splitlines() if "JaneRoe" in ln]
    assert len(refused) == 1 and "boxes CSV gives one box per name" in refused[0] and "JohnDoe" not in refused[0]
    rows = {r["source"]: r["result"] for r in csv.DictReader(key.open())}  # the refused one too, as predict's key
    assert rows == {str(tmp_path / "JohnDoe" / "knee.npy"): "written", str(tmp_path / "JaneRoe" / "knee.npy"): "failed"}


# === The client gives the predict answer ===

@pytest.fixture(scope="module")
def full_xrays(tmp_path_factory):
    """Whole knee X-rays, not crops (an ROI source finds the knee): a 16-bit PNG, a
    float .npy and DICOMs of a left and a right knee."""
    from roi_factory import standin_knee

    from kneetf.io.writers import write_dicom_xray, write_png

    folder = tmp_path_factory.mktemp("xrays")
    rng = np.random.default_rng(5)
    images = [standin_knee(rng, (210, 250))[0] for _ in range(4)]
    write_png(folder / "a.png", images[0])
    np.save(folder / "b.npy", images[1].astype(np.float32))
    write_dicom_xray(folder / "c_left.dcm", images[2], laterality="L")
    write_dicom_xray(folder / "d_right.dcm", images[3], laterality="R")
    return {"folder": folder, "images": images}


@pytest.mark.parametrize("transport", ["--server", "--rest"])
def test_cli_client_gives_the_predict_answer(served, server, full_xrays, tmp_path, transport):
    """`kneetf client` on whole X-rays finds the ROI, mirrors the left knee and undoes it like
    `kneetf predict` on the same export: the same volumes and the same NIfTI geometry."""
    import csv

    nib = pytest.importorskip("nibabel")
    from kneetf.io.readers import read_xray
    from kneetf.preprocess.roi import crop_box, find_roi
    from kneetf.preprocess.xray import roi_source

    folder, version = full_xrays["folder"], served["mirrored"] / "1"
    assert main(["predict", "--model", str(version), str(folder), "--out", str(tmp_path / "predict"),
                 "--no-progress", "--names", "id"]) == 0
    address = server.grpc_target if transport == "--server" else server.rest_url
    assert main(["client", transport, address, "--model", "mirrored", "--model-info", str(version), str(folder),
                 "--out", str(tmp_path / "client"), "--names", "id"]) == 0
    names = sorted(p.name for p in (tmp_path / "predict").glob("*.nii.gz"))
    assert names == ["a.nii.gz", "b.nii.gz", "c_left.nii.gz", "d_right.nii.gz"]
    for name in names:
        ours, theirs = nib.load(tmp_path / "client" / name), nib.load(tmp_path / "predict" / name)
        np.testing.assert_allclose(np.asarray(ours.dataobj), np.asarray(theirs.dataobj), atol=1e-5, err_msg=name)
        np.testing.assert_array_equal(ours.affine, theirs.affine)
        assert ours.shape == theirs.shape == (20, 128, 128)
    rows = {r["id"]: r for r in csv.DictReader(open(tmp_path / "predict" / "predictions.csv"))}
    assert rows["c_left"]["mirrored"] == "1" and rows["d_right"]["mirrored"] == "0"
    # independently: the left knee's crop (the built-in detector's box), flipped, through Keras;
    # slice order restored
    image, meta = read_xray(folder / "c_left.dcm")
    crop = crop_box(image, find_roi(roi_source(), "c_left", image, meta.pixel_spacing).box)[:, ::-1]
    want = _reference(served["model"], crop[None])["mri"][0].transpose(2, 0, 1)[::-1]
    np.testing.assert_allclose(np.asarray(nib.load(tmp_path / "client" / "c_left.nii.gz").dataobj), want,
                               atol=1e-5)


def test_client_roi_options_and_model_info(served, server, full_xrays, tmp_path, capsys, caplog):
    """--rois and --roi-detector are predict's; the ROI source recorded with the model is
    the default; a model info without a preprocessing config is refused, naming it."""
    import json
    import logging
    import shutil

    from kneetf.client.xray import read_model_info
    from kneetf.preprocess.roi import Box, write_boxes

    folder = full_xrays["folder"]
    write_boxes(tmp_path / "boxes.csv", {"a": Box(40, 30, 190, 180)})
    assert main(["client", "--server", server.grpc_target, str(folder / "a.png"), "--rois",
                 str(tmp_path / "boxes.csv"), "--out", str(tmp_path / "boxed.nii.gz")]) == 0
    assert main(["predict", "--model", str(served["base"] / "1"), str(folder / "a.png"), "--rois",
                 str(tmp_path / "boxes.csv"), "--out", str(tmp_path / "p"), "--no-progress", "--names", "id"]) == 0
    nib = pytest.importorskip("nibabel")
    np.testing.assert_allclose(np.asarray(nib.load(tmp_path / "boxed.nii.gz").dataobj),
                               np.asarray(nib.load(tmp_path / "p" / "a.nii.gz").dataobj), atol=1e-5)

    info = tmp_path / "info"
    shutil.copytree(served["mirrored"] / "1", info, ignore=shutil.ignore_patterns("variables", "*.pb"))
    blob = json.loads((info / "kneetf_export.json").read_text())
    assert read_model_info(info).roi is None and read_model_info(info).preprocess.mirror_left
    (info / "kneetf_export.json").write_text(json.dumps({**blob, "roi": "detector/roi.keras"}))
    assert read_model_info(info).roi == {"source": "detector", "name": "roi.keras", "file": "detector/roi.keras"}
    with caplog.at_level(logging.WARNING):  # the recorded detector is looked for: here, missing
        assert main(["client", "--server", server.grpc_target, "--model-info", str(info), str(folder / "a.png"),
                     "--out", str(tmp_path / "x.nii.gz")]) == 0
    assert "roi.keras, which is not beside it" in caplog.text
    (info / "kneetf_export.json").write_text(json.dumps({"model_name": "kneetf"}))
    assert main(["client", "--server", server.grpc_target, "--model-info", str(info), str(folder / "a.png"),
                 "--out", str(tmp_path / "x.nii.gz")]) == 1
    assert "holds no model description" in capsys.readouterr().err


def test_rest_client_imports_no_tensorflow_with_crops_sent_whole(served, server, full_xrays, tmp_path):
    """Without client-side resize and with an ROI source that is not a network (the classical
    fallback here), the REST path (read, ROI, crop, request, checks, NIfTI) runs without
    TensorFlow in the client process."""
    out = tmp_path / "a.nii.gz"
    code = ("import sys; from kneetf.cli.main import main; "
            f"rc = main(['client', '--rest', {server.rest_url!r}, {str(full_xrays['folder'] / 'a.png')!r}, "
            f"'--out', {str(out)!r}, '--no-client-resize', '--roi-detector', 'classical']); "
            "print(rc, sorted(m for m in ('tensorflow', 'keras', 'grpc') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.strip().splitlines()[-1] == "0 []", result.stderr[-2000:]
    assert out.is_file()


# === The client does not trust the server ===

def _lie(mri_shape, fill=0.5, recon_shape=None, content=False):
    """A gRPC Predict answer with outputs of the given shapes, in TF's compact form (one
    value for the whole tensor) unless `content`."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
    from tensorflow_serving.apis import predict_pb2

    def tensor(shape):
        dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in shape]
        proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT,
                                       tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims))
        if content:
            proto.tensor_content = np.full(shape, fill, np.float32).tobytes()
        else:
            proto.float_val.append(fill)
        return proto

    response = predict_pb2.PredictResponse()
    response.outputs["mri"].CopyFrom(tensor(mri_shape))
    response.outputs["xray_recon"].CopyFrom(tensor(recon_shape or (mri_shape[0], 128, 128, 1)))
    return response


def test_grpc_shape_lie_is_refused_before_decoding(server):
    """An 81-byte answer declaring 1x4000x4000x20 floats is refused from its declared shape,
    without allocating the 1.3 GB it describes."""
    import tracemalloc

    lie = _lie((1, 4000, 4000, 20))
    assert len(lie.outputs["mri"].SerializeToString()) < 100
    server.faults.grpc_reply = lambda request: lie
    client = ServingClient(server.grpc_target)
    tracemalloc.start()
    try:
        with pytest.raises(ServingError, match=r"\(1, 4000, 4000, 20\); expected \(1, 128, 128, 20\)"):
            client.predict(_raw(1, 128, 128))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20, peak
    for shape, message in [((1, 128, 128, 3), "expected"), ((2, 128, 128, 20), "expected"),
                           ((1, 128, 128), "expected")]:
        server.faults.grpc_reply = lambda request, shape=shape: _lie(shape)
        with pytest.raises(ServingError, match=message):
            client.predict(_raw(1, 128, 128))


def test_grpc_answer_larger_than_the_receive_limit_is_refused(server):
    client = ServingClient(server.grpc_target, max_batch=1)
    assert client.max_receive_bytes < 4 * 2**20
    server.faults.grpc_reply = lambda request: _lie((1, 128, 128, 20), recon_shape=(1, 1024, 1024, 1), content=True)
    with pytest.raises(ServingError, match="receives at most"):
        client.predict(_raw(1, 128, 128))


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_nan_answer_is_an_error(server, transport):
    if transport == "grpc":
        server.faults.grpc_reply = lambda request: _lie((1, 128, 128, 20), fill=float("nan"))
        client = ServingClient(server.grpc_target)
    else:
        body = {"outputs": {"mri": np.zeros((1, 128, 128, 20)).tolist(), "xray_recon": [[[[None]] * 128] * 128]}}
        server.faults.rest_reply = lambda raw: (200, {"Content-Type": "application/json"}, json.dumps(body).encode())
        client = RestClient(server.rest_url)
    with pytest.raises(ServingError, match="NaN"):
        client.predict(_raw(1, 128, 128))


def test_rest_shape_lies_are_refused(server):
    client = RestClient(server.rest_url)
    for outputs in [{"mri": np.zeros((1, 5, 5, 3)).tolist(), "xray_recon": np.zeros((1, 5, 5, 1)).tolist()},
                    {"mri": [[1, 2], [3]], "xray_recon": [0]}, {"mri": "x", "xray_recon": "y"}]:
        body = json.dumps({"outputs": outputs}).encode()
        server.faults.rest_reply = lambda raw, body=body: (200, {"Content-Length": str(len(body))}, body)
        with pytest.raises(ServingError, match="shape|numeric"):
            client.predict(_raw(1, 128, 128))


def test_rest_body_is_capped(server):
    """An answer bigger than what the expected outputs take is refused: at once when it says
    so (Content-Length), after the limit when it does not."""
    client = RestClient(server.rest_url, max_batch=1)
    limit = client.max_response_bytes
    assert limit < 16 * 2**20
    big = b"[" * (limit + 2**20)
    server.faults.rest_reply = lambda raw: (200, {"Content-Length": str(len(big))}, big)
    with pytest.raises(ServingError, match=rf"announced an answer of {len(big)} bytes"):
        client.predict(_raw(1, 128, 128))
    server.faults.rest_reply = lambda raw: (200, {}, big)
    with pytest.raises(ServingError, match=rf"more than {limit} bytes"):
        client.predict(_raw(1, 128, 128))
    deep = b"[" * 100_000  # JSON nesting past Python's recursion limit
    server.faults.rest_reply = lambda raw: (200, {}, deep)
    with pytest.raises(ServingError, match="did not answer JSON"):
        client.predict(_raw(1, 128, 128))


def test_rest_redirects_are_not_followed(server):
    """A redirect to another host gets neither the request nor its Authorization header."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import threading

    seen = []

    class Recorder(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(dict(self.headers))
            self.send_response(500)
            self.end_headers()

        def log_message(self, *args):
            pass

    other = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        location = f"http://localhost:{other.server_address[1]}/v1/models/kneetf:predict"
        for code in (301, 302, 307, 308):
            server.faults.rest_reply = lambda raw, code=code: (code, {"Location": location, "Content-Length": "0"}, b"")
            client = RestClient(server.rest_url, headers={"Authorization": "Bearer s3cret"}, retries=0)
            where = f"localhost:{other.server_address[1]}"
            with pytest.raises(ServingError, match=rf"HTTP {code}, a redirect to .*{where}"):
                client.predict(_raw(1, 128, 128))
    finally:
        other.shutdown()
        other.server_close()
    assert seen == []


def test_metadata_is_checked_once_and_optional(server):
    calls = server.faults.calls
    with pytest.raises(ServingError, match=r"'mri' is declared as \(-1, 128, 128, 20\).*\(B, 128, 128, 24\)"):
        ServingClient(server.grpc_target, num_slices=24).predict(_raw(1, 128, 128))
    with pytest.raises(ServingError, match=r"'xray_recon' is declared as \(-1, 128, 128, 1\).*\(B, 64, 64, 1\)"):
        RestClient(server.rest_url, image_size=64).predict(_raw(1, 64, 64))
    assert server.faults.calls == calls  # refused before any Predict
    server.faults.metadata = False  # a server without metadata: answers are still checked
    got = ServingClient(server.grpc_target).predict(_raw(1, 128, 128))
    assert got["mri"].shape == (1, 128, 128, 20)
    with pytest.raises(ServingError, match=r"expected \(1, 128, 128, 24\)"):
        RestClient(server.rest_url, num_slices=24).predict(_raw(1, 128, 128))


def test_cli_client_reports_bad_answers_per_file(served, server, full_xrays, tmp_path, capsys):
    """One lying answer (NaN), one wrong shape, one unreadable file: each is named at the end,
    the others are written, the exit status is 4 (partly done)."""
    folder = full_xrays["folder"]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    answers = iter([_lie((1, 128, 128, 20), fill=float("nan")), _lie((1, 5, 5, 3)), None, None])
    server.faults.grpc_reply = lambda request: next(answers)
    out = tmp_path / "out"
    rc = main(["client", "--server", server.grpc_target, str(folder / "a.png"), str(folder / "b.npy"),
               str(tmp_path / "broken.png"), str(folder / "c_left.dcm"), str(folder / "d_right.dcm"), "--out",
               str(out), "--names", "id"])
    err = capsys.readouterr().err
    assert rc == 4
    assert sorted(p.name for p in out.iterdir()) == [".kneetf-outputs.json", "c_left.nii.gz", "d_right.nii.gz"]
    assert "3 of 5 X-ray(s) failed" in err
    assert re.search(r"a\.png: .*NaN", err) and re.search(r"b\.npy: .*\(1, 5, 5, 3\)", err)
    assert "broken.png" in err


def test_cli_client_stops_when_the_server_is_gone(full_xrays, tmp_path, capsys):
    folder = full_xrays["folder"]
    rc = main(["client", "--server", f"127.0.0.1:{_free_port()}", "--retries", "0", "--timeout", "5",
               str(folder / "a.png"), str(folder / "b.npy"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and "2 of 2 X-ray(s) failed" in err
    assert "cannot reach TF Serving" in err and "b.npy: not sent" in err


def test_cli_client_gives_its_folder_lock_back_when_it_stops_on_an_error(tmp_path, capsys):
    """An error after the folder was locked (here: --out holds an input) releases the lock in
    the calling process too, so that a script may run another kneetf into that folder."""
    import fcntl
    import os

    out = tmp_path / "out"
    out.mkdir()
    np.save(out / "a.npy", _raw(1, 128, 128)[0])
    rc = main(["client", "--server", f"127.0.0.1:{_free_port()}", str(out / "a.npy"), "--out", str(out),
               "--cropped"])
    assert rc == 1 and "holds the input" in capsys.readouterr().err
    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while kneetf still held it
    finally:
        os.close(fd)


# === serving/ configuration ===

def _proto_classes():
    """BatchingParameters and MonitoringConfig (not shipped in tensorflow-serving-api),
    declared here field for field from TF Serving's session_bundle_config.proto and
    monitoring_config.proto."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    f = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="kneetf_serving_test.proto", package="tensorflow.serving",
                                            dependency=["google/protobuf/wrappers.proto"], syntax="proto3")

    def message(name, fields):
        m = fd.message_type.add(name=name)
        for number, (field_name, kind, type_name, label) in enumerate(fields, 1):
            m.field.add(name=field_name, number=number, type=kind, type_name=type_name, label=label)

    opt, rep = f.LABEL_OPTIONAL, f.LABEL_REPEATED
    i64 = (f.TYPE_MESSAGE, ".google.protobuf.Int64Value", opt)
    message("BatchingParameters", [
        ("max_batch_size", *i64), ("batch_timeout_micros", *i64), ("max_enqueued_batches", *i64),
        ("num_batch_threads", *i64), ("thread_pool_name", f.TYPE_MESSAGE, ".google.protobuf.StringValue", opt),
        ("allowed_batch_sizes", f.TYPE_INT64, None, rep), ("pad_variable_length_inputs", f.TYPE_BOOL, None, opt)])
    message("PrometheusConfig", [("enable", f.TYPE_BOOL, None, opt), ("path", f.TYPE_STRING, None, opt)])
    message("MonitoringConfig", [("prometheus_config", f.TYPE_MESSAGE, ".tensorflow.serving.PrometheusConfig", opt)])
    for m in fd.message_type:
        for field in m.field:
            if not field.type_name:
                field.ClearField("type_name")
    pool.Add(fd)
    get = message_factory.GetMessageClass
    return (get(pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters")),
            get(pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig")))


def test_serving_configs(repo):
    """The serving/ files parse as the protos TF Serving reads, and agree with each other."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    serving = repo / "serving"
    config = text_format.Parse((serving / "models.config").read_text(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert model.name == "kneetf" and model.base_path == "/models/kneetf" and model.model_platform == "tensorflow"
    assert model.model_version_policy.latest.num_versions == 2

    batching_cls, monitoring_cls = _proto_classes()
    batching = text_format.Parse((serving / "batching.config").read_text(), batching_cls())
    sizes = list(batching.allowed_batch_sizes)
    assert sizes == sorted(sizes) and sizes[-1] == batching.max_batch_size.value  # TF Serving's rule
    assert not batching.pad_variable_length_inputs
    assert ServingClient("localhost:1").max_batch <= batching.max_batch_size.value
    monitoring = text_format.Parse((serving / "monitoring.config").read_text(), monitoring_cls())
    assert monitoring.prometheus_config.enable
    assert monitoring.prometheus_config.path == "/monitoring/prometheus/metrics"

    assert tuple(sizes) == SERVING_BATCH_SIZES  # what the export warms up
    assert ServingClient("localhost:1").max_batch == max(SERVING_BATCH_SIZES)

    compose = (serving / "docker-compose.yml").read_text()
    run_sh = (serving / "run.sh").read_text()
    assert "image: tensorflow/serving:2.21.0" in compose and "tensorflow/serving:2.21.0" in run_sh
    # published on the loopback interface unless KNEETF_SERVING_HOST says otherwise
    for port in ("8500", "8501"):
        assert f'"${{KNEETF_SERVING_HOST:-127.0.0.1}}:{port}:{port}"' in compose
        assert f'-p "$HOST:{port}:{port}"' in run_sh
    assert re.search(r'^HOST="\$\{KNEETF_SERVING_HOST:-127\.0\.0\.1\}"$', run_sh, re.M)
    assert not re.search(r"^\s*-\s*\"?\d+:\d+", compose, re.M)  # no port on every interface
    flags_compose = re.findall(r"^\s+- (--\w+=\S+)", compose, re.M)
    flags_run = re.findall(r"^\s+(--\w+=\S+)(?: \\)?$", run_sh, re.M)
    assert flags_compose == flags_run
    names = {flag.split("=")[0] for flag in flags_compose}
    assert {"--model_config_file", "--enable_batching", "--batching_parameters_file", "--monitoring_config_file",
            "--enable_model_warmup"} <= names
    for flag in flags_compose:  # every referenced config file exists here
        value = flag.split("=", 1)[1]
        if value.startswith("/config/"):
            assert (serving / value.removeprefix("/config/")).is_file(), flag


def test_cli_modules_import_no_tensorflow():
    """`kneetf client/export --help` stay fast, and the REST client works without TensorFlow:
    no TF, Keras or grpc at import time."""
    code = ("import sys, kneetf.cli.client, kneetf.cli.export, kneetf.export, kneetf.client, kneetf.client.rest, "
            "kneetf.client.xray, kneetf.protocol, kneetf.inference, kneetf.inference.trust; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'grpc') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://host:21", "localhost:85o1", "http://:8501",
                                 "http://localhost:99999"])
def test_rest_address_must_be_http(url):
    """urllib would read a local file for file://; a serving address is http(s) only, with a host
    and a port that is a number (a bad port was reported as a server that does not speak HTTP)."""
    from kneetf.client.rest import RestClient
    from kneetf.errors import ConfigError

    with pytest.raises(ConfigError, match="http://HOST:PORT or https://HOST:PORT"):
        RestClient(url)


def test_cli_client_writes_the_documented_range_whatever_the_server_says(server, tmp_path):
    """A server answering -7 and 9 (a linear head, or a lying server): the NIfTI holds [0, 1]."""
    nib = pytest.importorskip("nibabel")
    np.save(tmp_path / "a.npy", _raw(1, 128, 128, seed=2)[0])
    answers = iter([_lie((1, 128, 128, 20), fill=-7.0), _lie((1, 128, 128, 20), fill=9.0)])
    server.faults.grpc_reply = lambda request: next(answers)
    for name in ("low", "high"):
        out = tmp_path / f"{name}.nii.gz"
        assert main(["client", "--server", server.grpc_target, str(tmp_path / "a.npy"), "--out", str(out),
                     "--cropped"]) == 0
        data = np.asarray(nib.load(out).dataobj)
        assert data.shape == (20, 128, 128) and np.all(data == (0.0 if name == "low" else 1.0))


def test_rest_at_a_port_that_does_not_speak_http_is_named(tmp_path):
    """--rest pointed at the gRPC port: http.client's BadStatusLine was a crash (exit 3) with the
    port's raw bytes as the message."""
    import socket
    import threading

    from kneetf.client.rest import RestClient
    from kneetf.errors import ServerUnavailableError

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def answer_binary() -> None:
        for _ in range(4):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00binary frames")
            conn.close()

    threading.Thread(target=answer_binary, daemon=True).start()
    try:
        with pytest.raises(ServerUnavailableError, match="is not a TF Serving REST endpoint"):
            RestClient(f"http://127.0.0.1:{listener.getsockname()[1]}", retries=0, timeout=5).status()
    finally:
        listener.close()
