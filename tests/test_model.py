"""KneeNet: the paper preset against the paper, presets, two learning rates, save/load."""
from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from kneetf.config import ModelConfig, TrainConfig, config_hash, from_dict, to_dict
from kneetf.errors import ConfigError
from kneetf.models.kneenet import KneeNet, build_model
from kneetf.presets import get_preset, preset_names


def _layers(model: keras.Model, cls: type) -> list:
    return [layer for layer in model.layers if isinstance(layer, cls)]


@pytest.fixture(scope="module")
def paper() -> KneeNet:
    return KneeNet.from_preset("paper")


def test_paper_encoder_matches_paper(paper: KneeNet) -> None:
    convs = _layers(paper.encoder, keras.layers.Conv2D)
    assert [c.filters for c in convs] == [32, 64, 128, 256, 512, 1024]
    assert all(c.kernel_size == (3, 3) and c.strides == (2, 2) for c in convs)
    assert len(_layers(paper.encoder, keras.layers.BatchNormalization)) == 6
    lrelu = _layers(paper.encoder, keras.layers.LeakyReLU)
    assert len(lrelu) == 6 and all(abs(a.negative_slope - 0.2) < 1e-9 for a in lrelu)
    assert tuple(paper.encoder.output.shape[1:]) == (2, 2, 1024)


def test_paper_decoder_matches_paper(paper: KneeNet) -> None:
    deconvs = _layers(paper.decoder, keras.layers.Conv2DTranspose)
    assert [d.filters for d in deconvs] == [1024, 512, 256, 128, 64, 32, 1]
    assert all(d.kernel_size == (4, 4) for d in deconvs)
    assert [d.strides[0] for d in deconvs] == [1, 2, 2, 2, 2, 2, 2]
    # the paper's reading keeps BN + LeakyReLU(0.2) after every block, the 1-channel one too
    assert len(_layers(paper.decoder, keras.layers.BatchNormalization)) == 7
    assert len(_layers(paper.decoder, keras.layers.LeakyReLU)) == 7


def test_paper_generator_matches_paper(paper: KneeNet) -> None:
    g = paper.generator
    deconvs = _layers(g, keras.layers.Conv3DTranspose)
    assert [d.filters for d in deconvs] == [1024, 512, 256, 128, 64, 32, 1]
    assert all(d.kernel_size == (4, 4, 4) for d in deconvs)
    assert [d.strides for d in deconvs] == [(1, 1, 1)] + [(2, 2, 2)] * 6
    relus = _layers(g, keras.layers.ReLU)
    assert len(relus) == 8  # 7 x 3-D blocks + the first 1x1 block
    convs = _layers(g, keras.layers.Conv2D)
    assert [(c.filters, c.kernel_size) for c in convs] == [(8, (1, 1)), (20, (1, 1))]
    # BN3D after every Conv3DTranspose, BN after the 8-channel 1x1 conv, none after the output
    assert len(_layers(g, keras.layers.BatchNormalization)) == 8
    assert tuple(g.get_layer("generator_depth_to_channels").output.shape[1:]) == (128, 128, 128)


def test_paper_shapes_and_size(paper: KneeNet) -> None:
    assert paper.input_shape == (None, 128, 128, 1)
    assert tuple(paper.output["xray_recon"].shape) == (None, 128, 128, 1)
    assert tuple(paper.output["mri"].shape) == (None, 128, 128, 20)
    assert 110e6 < paper.count_params() < 115e6  # "about 112M parameters"


@pytest.mark.parametrize("name", ["tiny", "compact"])
def test_presets_build_by_name_and_config(name: str) -> None:
    by_name = build_model(name, compile=False)
    by_config = build_model(get_preset(name), compile=False)
    assert by_name.count_params() == by_config.count_params()
    out = by_name.predict(np.random.rand(2, 128, 128, 1).astype("float32"), verbose=0)
    assert out["mri"].shape == (2, 128, 128, 20) and out["xray_recon"].shape == (2, 128, 128, 1)
    assert 0.0 <= out["mri"].min() and out["mri"].max() <= 1.0  # sigmoid outputs


def test_config_json_round_trip() -> None:
    for name in preset_names():
        cfg = get_preset(name)
        again = from_dict(ModelConfig, json.loads(json.dumps(to_dict(cfg))))
        assert again == cfg and config_hash(again) == config_hash(cfg)


def test_bad_configs_are_named() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'paper'"):
        get_preset("papr")
    with pytest.raises(ConfigError, match="unknown ModelConfig field"):
        from_dict(ModelConfig, {"filtres": 3})
    with pytest.raises(ConfigError, match="decoder ends at"):
        ModelConfig(decoder_strides=(1, 1, 2, 2, 2, 2, 2))
    with pytest.raises(ConfigError, match="loss_weights"):
        TrainConfig(loss_weights=(0.0, 0.0))


def test_two_learning_rates_first_adam_step() -> None:
    """On Adam's first step each weight moves by lr * g / (|g| + eps) ~ lr: measure both groups.

    Weights with tiny gradients move a little less (eps), so take the 90th percentile of
    the step sizes of each kernel; no weight may move by more than its own rate."""
    keras.utils.set_random_seed(1)
    model = build_model("tiny", TrainConfig(lr_encdec=1e-3, lr_generator=1e-4))
    x = np.random.rand(4, 128, 128, 1).astype("float32")
    y = {"xray_recon": x, "mri": np.random.rand(4, 128, 128, 20).astype("float32")}
    opt = model.optimizer
    kernels = [v for v in model.trainable_variables if v.path.endswith("kernel")]
    before = [v.numpy().copy() for v in kernels]
    model.train_on_batch(x, y)
    gen_steps, encdec_steps = [], []
    for v, b in zip(kernels, before):
        step = np.abs(v.numpy() - b)
        step = step[step > 0]  # weights with a zero gradient do not move
        lr = 1e-4 if opt.is_generator_variable(v) else 1e-3
        assert step.max() <= lr * 1.001, v.path
        (gen_steps if lr == 1e-4 else encdec_steps).append(np.percentile(step, 90))
    assert len(gen_steps) == 7 + 2 and len(encdec_steps) == 6 + 7
    np.testing.assert_allclose(gen_steps, 1e-4, rtol=0.05)
    np.testing.assert_allclose(encdec_steps, 1e-3, rtol=0.05)


def test_fit_on_tf_data_with_weighted_losses() -> None:
    model = build_model("tiny", TrainConfig(loss_weights=(0.5, 2.0)))
    x = np.random.rand(4, 128, 128, 1).astype("float32")
    mri = np.random.rand(4, 128, 128, 20).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, {"xray_recon": x, "mri": mri})).batch(2)
    traces = []
    step = model.train_step
    model.train_step = lambda data: traces.append(1) or step(data)
    hist = model.fit(ds, epochs=2, verbose=0).history
    # the optimizer and metric state are built before the step is traced: one trace, not two
    assert len(traces) == 1 and model.optimizer.built
    assert {"loss", "xray_recon_loss", "mri_loss"} <= set(hist)
    # the total is the weighted sum of the two MSE terms
    total = model.evaluate(ds, verbose=0, return_dict=True)
    assert total["loss"] == pytest.approx(0.5 * total["xray_recon_loss"] + 2.0 * total["mri_loss"], rel=1e-4)


def test_training_state_is_left_to_keras_for_data_without_static_shapes() -> None:
    from kneetf.models.training_state import build_training_state

    model = build_model("tiny")
    unknown_rank = tf.data.Dataset.from_generator(
        lambda: iter(()), output_signature=(tf.TensorSpec(None, tf.float32), tf.TensorSpec(None, tf.float32)))
    assert not build_training_state(model, unknown_rank)
    assert not build_training_state(model, np.array(["not", "pixels"]))
    assert not build_training_state(model, (np.zeros((2, 128, 128, 1), "float32") for _ in range(1)))
    assert not model.optimizer.built
    x = np.zeros((2, 128, 128, 1), "float32")
    assert build_training_state(model, x, {"xray_recon": x, "mri": np.zeros((2, 128, 128, 20), "float32")})
    assert model.optimizer.built


@pytest.mark.slow
@pytest.mark.parametrize("data", ["arrays", "dataset"])
def test_building_the_training_state_first_changes_no_result(data) -> None:
    """KneeNet.fit builds the optimizer and metric state before tracing; the weights and logs
    after two epochs are Keras' own lazy build's, to the bit (with dropout)."""
    x = np.random.default_rng(0).random((4, 128, 128, 1), dtype=np.float32)
    y = {"xray_recon": x, "mri": np.random.default_rng(1).random((4, 128, 128, 20), dtype=np.float32)}
    runs = []
    for fit in (KneeNet.fit, keras.Model.fit):
        keras.utils.set_random_seed(3)
        model = build_model(KneeNet.from_preset("tiny", latent_dropout=0.3).model_config)
        if data == "arrays":
            hist = fit(model, x, y, batch_size=2, epochs=2, shuffle=False, verbose=0)
        else:
            ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(2)
            hist = fit(model, ds, epochs=2, shuffle=False, verbose=0)
        runs.append((hist.history, [v.numpy() for v in model.weights + model.optimizer.variables]))
    (logs, weights), (keras_logs, keras_weights) = runs
    assert logs == keras_logs
    assert len(weights) == len(keras_weights)
    for a, b in zip(weights, keras_weights):
        np.testing.assert_array_equal(a, b)


def test_save_load_round_trip_safe_mode(tmp_path) -> None:
    model = build_model("tiny")
    x = np.random.rand(3, 128, 128, 1).astype("float32")
    model.fit(x, {"xray_recon": x, "mri": np.random.rand(3, 128, 128, 20).astype("float32")}, epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, KneeNet) and loaded.model_config == model.model_config
    a, b = model.predict(x, verbose=0), loaded.predict(x, verbose=0)
    for k in ("mri", "xray_recon"):
        np.testing.assert_array_equal(a[k], b[k])
    assert loaded.optimizer.generator_learning_rate == pytest.approx(1e-4)


def test_loading_a_saved_model_draws_no_random_initial_weights(tmp_path, monkeypatch) -> None:
    """kneetf's loaders build the model with zero initial weights, which the file's replace:
    the Glorot initializer is never called, and the loaded model is the saved one to the bit.
    A model built outside the loader draws its initial weights as before."""
    from keras.src.initializers.random_initializers import GlorotUniform

    from kneetf.inference.loading import load_model
    from kneetf.models.blocks import weights_to_be_loaded

    model = build_model("tiny")
    path = tmp_path / "m.keras"
    model.save(path)
    x = np.random.default_rng(0).random((2, 128, 128, 1), dtype=np.float32)

    def refuse(self, shape, dtype=None):
        raise AssertionError(f"initial weights of shape {shape} drawn for a model about to be loaded")

    with monkeypatch.context() as m:
        m.setattr(GlorotUniform, "__call__", refuse)
        loaded = load_model(path, compile=False)
        with pytest.raises(AssertionError, match="initial weights"):
            KneeNet.from_preset("tiny")  # not a load: random initial weights, as always
    for a, b in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(model.predict(x, verbose=0)["mri"], loaded.predict(x, verbose=0)["mri"])
    with pytest.raises(RuntimeError), weights_to_be_loaded():
        raise RuntimeError("the context is left")
    fresh = KneeNet.from_preset("tiny")
    assert all(np.any(w.numpy()) for w in fresh.weights if w.path.endswith("conv/kernel"))


def test_residual_template_is_saved(tmp_path) -> None:
    model = KneeNet.from_preset("tiny", residual_template=True)
    template = np.random.rand(128, 128, 20).astype("float32") * 0.8 + 0.1
    model.set_template(template)
    x = np.random.rand(2, 128, 128, 1).astype("float32")
    # the residual head starts at zero: an untrained model predicts the template, in both modes
    np.testing.assert_allclose(model.predict(x, verbose=0)["mri"][0], template, atol=1e-5)
    np.testing.assert_allclose(model(x, training=True)["mri"].numpy()[1], template, atol=1e-5)
    path = tmp_path / "r.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.generator.get_layer("generator_template").template.numpy(), template)



def test_small_residual_init_starts_near_the_template_and_passes_gradients_upstream() -> None:
    import tensorflow as tf

    template = np.full((128, 128, 20), 0.4, "float32")
    x = np.random.default_rng(0).random((2, 128, 128, 1), dtype=np.float32)
    grads = {}
    for std in (0.0, 0.01):
        model = KneeNet.from_preset("tiny", residual_template=True, residual_init_std=std)
        model.set_template(template)
        with tf.GradientTape() as tape:
            mri = model(x, training=True)["mri"]
            loss = tf.reduce_mean(tf.square(mri - 0.5))
        head1 = model.generator.get_layer("generator_head1_conv").kernel
        grads[std] = float(tf.reduce_max(tf.abs(tape.gradient(loss, head1))))
        gap = float(tf.reduce_mean(tf.abs(mri - template)))
        assert (gap < 1e-6) if std == 0 else (1e-5 < gap < 0.03), (std, gap)
    # zeros: layers before the head get no gradient at the first step; a small init does
    assert grads[0.0] == 0.0 and grads[0.01] > 0.0

@pytest.mark.slow
def test_paper_preset_trains_one_step_saves_and_loads(paper: KneeNet, tmp_path) -> None:
    paper.compile_for_training(TrainConfig(batch_size=1))
    x = np.random.rand(1, 128, 128, 1).astype("float32")
    y = {"xray_recon": x, "mri": np.random.rand(1, 128, 128, 20).astype("float32")}
    before = paper.generator.trainable_variables[0].numpy().copy()
    logs = paper.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
    assert not np.array_equal(before, paper.generator.trainable_variables[0].numpy())
    path = tmp_path / "paper.keras"
    paper.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0)["mri"], paper.predict(x, verbose=0)["mri"], atol=1e-6)
