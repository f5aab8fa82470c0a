"""Tests for the model zoo (wcord_jax.models).

Cheap by design: parameter counts and feature shapes use ``jax.eval_shape``; the real forward and
backward passes use numpy-filled variables (a real ``init`` costs a compile per model) on a batch of
two 32x32 images; real ``init`` is only run for a few models to check the initialisers.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from wcord_jax.models import get_model, list_models
from wcord_jax.models.common import channel_shuffle

# Trainable parameters (everything in ``params``), 100 classes (resnet18/34: 1000 classes),
# counted analytically from the PyTorch definitions of RepDistiller / torchvision.
PARAM_COUNTS = {
    "resnet8": 83_892,
    "resnet14": 181_108,
    "resnet20": 278_324,
    "resnet32": 472_756,
    "resnet44": 667_188,
    "resnet56": 861_620,
    "resnet110": 1_736_564,
    "resnet8x4": 1_233_540,
    "resnet32x4": 7_433_860,
    "ResNet50": 23_705_252,
    "wrn_16_1": 180_916,
    "wrn_16_2": 703_284,
    "wrn_40_1": 569_780,
    "wrn_40_2": 2_255_156,
    "vgg8": 3_965_028,
    "vgg11": 9_277_284,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "vgg19": 20_086_692,
    "MobileNetV2": 812_836,
    "ShuffleV1": 949_258,
    "ShuffleV2": 1_355_528,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
}

_R = [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (64,)]
_R4 = [(32, 32, 32), (32, 32, 64), (16, 16, 128), (8, 8, 256), (256,)]
_VGG = [(32, 32, 64), (16, 16, 128), (8, 8, 256), (4, 4, 512), (4, 4, 512), (512,)]
_IMNET = [(112, 112, 64), (56, 56, 64), (28, 28, 128), (14, 14, 256), (7, 7, 512), (512,)]


def _wrn(w):
    return [(32, 32, 16), (32, 32, 16 * w), (16, 16, 32 * w), (8, 8, 64 * w), (64 * w,)]


# Per-sample feature shapes (NHWC) for a 32x32 input (224x224 for resnet18/34).
FEATURE_SHAPES = {
    **{f"resnet{d}": _R for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _R4,
    "resnet32x4": _R4,
    "ResNet50": [(32, 32, 64), (32, 32, 256), (16, 16, 512), (8, 8, 1024), (4, 4, 2048), (2048,)],
    "wrn_16_1": _wrn(1),
    "wrn_16_2": _wrn(2),
    "wrn_40_1": _wrn(1),
    "wrn_40_2": _wrn(2),
    **{f"vgg{d}": _VGG for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": [(16, 16, 16), (16, 16, 12), (8, 8, 16), (4, 4, 48), (2, 2, 160), (1280,)],
    "ShuffleV1": [(32, 32, 24), (16, 16, 240), (8, 8, 480), (4, 4, 960), (960,)],
    "ShuffleV2": [(32, 32, 24), (16, 16, 116), (8, 8, 232), (4, 4, 464), (1024,)],
    "resnet18": _IMNET,
    "resnet34": _IMNET,
}

IMAGENET = ("resnet18", "resnet34")
# The fast tier (-m "not slow") takes the forward pass of one network per family (each a module of wcord_jax.models;
# the CIFAR ResNets also at width x4) and the backward pass of the small ones; the whole suite takes every network.
FAST_FORWARD = ("resnet8", "resnet8x4", "ResNet50", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2",
                "resnet18")
FAST_BACKWARD = ("resnet8", "resnet8x4", "wrn_16_2", "vgg8", "resnet18")


def _tiered(names, fast):
    return [n if fast(n) else pytest.param(n, marks=pytest.mark.slow) for n in names]


def _num_classes(name):
    return 1000 if name in IMAGENET else 100


@functools.lru_cache(maxsize=None)
def abstract_variables(name, num_classes, channels=3):
    """Shapes/dtypes of the variables, without running anything."""
    model = get_model(name, num_classes)
    x = jax.ShapeDtypeStruct((2, 32, 32, channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


def synth_variables(name, num_classes=10, channels=3, seed=0):
    """numpy-filled variables: LeCun-normal kernels, zero biases, BN (1, 0), stats (0, 1)."""
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = path[-1].key
        if key == "kernel":
            fan_in = math.prod(leaf.shape[:-1])
            return jnp.asarray(rng.normal(size=leaf.shape) / math.sqrt(fan_in), jnp.float32)
        if key in ("scale", "var"):
            return jnp.ones(leaf.shape, jnp.float32)
        return jnp.zeros(leaf.shape, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract_variables(name, num_classes, channels))


def _images(n=2, size=32, channels=3, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, size, size, channels)) + 0.5


def test_list_models_has_all_names():
    assert sorted(list_models()) == sorted(PARAM_COUNTS)
    assert len(list_models()) == 24


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_model("resnet9000", 100)
    for name in ("resnet8x4", "wrn_40_2", "MobileNetV2", "ShuffleV2", "resnet34"):
        assert name in str(info.value)


@pytest.mark.parametrize("name", list(PARAM_COUNTS))
def test_param_count_and_collections(name):
    variables = abstract_variables(name, _num_classes(name))
    assert set(variables) == {"params", "batch_stats"}
    count = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
    assert count == PARAM_COUNTS[name]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


@pytest.mark.parametrize("name", list(FEATURE_SHAPES))
@pytest.mark.parametrize("preact", [False, True])
def test_feature_shapes(name, preact):
    num_classes = _num_classes(name)
    size = 224 if name in IMAGENET else 32
    model = get_model(name, num_classes)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = abstract_variables(name, num_classes)
    (logits, feats), _ = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, preact=preact, mutable=["batch_stats"]),
        variables, x)
    assert logits.shape == (2, num_classes) and logits.dtype == jnp.float32
    assert isinstance(feats, list)
    assert [tuple(f.shape[1:]) for f in feats] == FEATURE_SHAPES[name]


def test_vgg_pool3_only_for_64x64_inputs():
    model = get_model("vgg8", 100)
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    _, feats = jax.eval_shape(lambda v, x: model.apply(v, x), abstract_variables("vgg8", 100), x)
    assert [tuple(f.shape[1:]) for f in feats] == [
        (64, 64, 64), (32, 32, 128), (16, 16, 256), (8, 8, 512), (4, 4, 512), (512,)]


def _preact_relation_holds(name, feats, pre):
    """RepDistiller's preact features against the ordinary ones, per family."""
    np.testing.assert_allclose(pre[0], feats[0])
    np.testing.assert_allclose(pre[-1], feats[-1])
    inner = range(1, len(feats) - 1)
    if name == "MobileNetV2":  # preact is ignored
        for i in inner:
            np.testing.assert_allclose(pre[i], feats[i])
    elif name == "ShuffleV2":  # output = shuffle(relu(unshuffled preact))
        for i in inner:
            np.testing.assert_allclose(channel_shuffle(jax.nn.relu(pre[i]), 2), feats[i])
    elif name.startswith("wrn"):  # f1..f3 pass through the following BN: ~zero mean per channel
        for i in inner:
            assert not np.allclose(pre[i], feats[i])
            assert np.abs(np.mean(pre[i], axis=(0, 1, 2))).max() < 1e-3
    else:  # stage outputs are relu(preact)
        for i in inner:
            np.testing.assert_allclose(jax.nn.relu(pre[i]), feats[i])
            assert np.min(pre[i]) < 0


@pytest.mark.parametrize("name", _tiered(list_models(), lambda n: n in FAST_FORWARD))
def test_jit_forward_train_mode(name):
    model = get_model(name, 10)
    variables = synth_variables(name)

    @jax.jit
    def forward(v, x):
        out, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
        out_pre, _ = model.apply(v, x, train=True, preact=True, mutable=["batch_stats"])
        return out, out_pre, upd

    (logits, feats), (logits_pre, pre), updates = forward(variables, _images())
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    np.testing.assert_allclose(logits_pre, logits, rtol=1e-5, atol=1e-5)
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"])
    _preact_relation_holds(name, feats, pre)


@pytest.mark.parametrize("name", _tiered(list_models(), lambda n: n in FAST_BACKWARD))
def test_jit_backward(name):
    model = get_model(name, 10)
    variables = synth_variables(name)
    labels = jnp.array([1, 7])

    @jax.jit
    def grads(params, batch_stats, x):
        def loss_fn(p):
            (logits, feats), upd = model.apply({"params": p, "batch_stats": batch_stats}, x,
                                               train=True, mutable=["batch_stats"])
            logp = jax.nn.log_softmax(logits)
            ce = -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
            return ce + 1e-3 * jnp.mean(feats[-2].astype(jnp.float32) ** 2), upd
        return jax.grad(loss_fn, has_aux=True)(params)

    g, _ = grads(variables["params"], variables["batch_stats"], _images())
    leaves = jax.tree.leaves(g)
    assert jax.tree.structure(g) == jax.tree.structure(variables["params"])
    assert all(np.all(np.isfinite(leaf)) for leaf in leaves)
    assert sum(float(jnp.sum(jnp.abs(leaf))) for leaf in leaves) > 0


def test_batch_norm_train_vs_eval():
    model = get_model("resnet8", 10)
    variables = synth_variables("resnet8")
    x = _images(n=4) * 3.0
    (train_logits, _), updates = jax.jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    eval_logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert not np.allclose(train_logits, eval_logits, atol=1e-3)
    stem_old = variables["batch_stats"]["bn1"]
    stem_new = updates["batch_stats"]["bn1"]
    assert not np.allclose(stem_new["mean"], stem_old["mean"])
    assert not np.allclose(stem_new["var"], stem_old["var"])
    # PyTorch momentum 0.1: new = 0.9 * old + 0.1 * batch statistic (old mean is 0)
    conv1 = variables["params"]["conv1"]["kernel"]
    h = jax.lax.conv_general_dilated(x, conv1, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(stem_new["mean"], 0.1 * np.mean(h, axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-5)
    # eval mode must not touch the statistics and must be deterministic per sample
    first, _ = model.apply(variables, x[:1], train=False)
    np.testing.assert_allclose(first, eval_logits[:1], rtol=1e-5, atol=1e-5)


def test_wrn_preact_reapplies_bn_like_reference():
    """RepDistiller's WRN forward(preact=True) runs block2[0].bn1 a second time (double update)."""
    model = get_model("wrn_16_1", 10)
    variables = synth_variables("wrn_16_1")
    x = _images()
    run = jax.jit(lambda v, x, p: model.apply(v, x, train=True, preact=p,
                                              mutable=["batch_stats"]), static_argnums=2)
    _, plain = run(variables, x, False)
    _, twice = run(variables, x, True)
    for path in (("block2_0", "bn1"), ("block3_0", "bn1"), ("bn1",)):
        once_mean = functools.reduce(lambda d, k: d[k], path, plain["batch_stats"])["mean"]
        twice_mean = functools.reduce(lambda d, k: d[k], path, twice["batch_stats"])["mean"]
        # from 0: once -> 0.1 m, twice -> 0.9 * 0.1 m + 0.1 m = 0.19 m
        np.testing.assert_allclose(twice_mean, 1.9 * once_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(twice["batch_stats"]["block1_0"]["bn1"]["mean"],
                               plain["batch_stats"]["block1_0"]["bn1"]["mean"])


@pytest.mark.parametrize("name", list_models())
def test_bfloat16_dtypes(name):
    """Activations/features follow ``dtype``; logits and all variables stay float32."""
    model = get_model(name, 10, dtype=jnp.bfloat16)
    variables = abstract_variables(name, 10)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    (logits, feats), upd = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, x)
    assert logits.dtype == jnp.float32
    assert all(f.dtype == jnp.bfloat16 for f in feats)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(upd))


def test_bfloat16_close_to_float32():
    variables = synth_variables("resnet8")
    x = _images()
    model32 = get_model("resnet8", 10)
    model16 = get_model("resnet8", 10, dtype=jnp.bfloat16)
    for train in (False, True):
        run = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=train,
                                                     mutable=["batch_stats"] if train else False))
        out32, out16 = run(model32)(variables, x), run(model16)(variables, x)
        logits32 = (out32[0] if train else out32)[0]
        logits16 = (out16[0] if train else out16)[0]
        assert logits16.dtype == jnp.float32
        scale = float(jnp.max(jnp.abs(logits32)))
        assert float(jnp.max(jnp.abs(logits16 - logits32))) < 0.05 * scale + 1e-3


def test_input_channels_come_from_input():
    variables = abstract_variables("resnet8", 10, channels=1)
    assert variables["params"]["conv1"]["kernel"].shape == (3, 3, 1, 16)
    model = get_model("resnet8", 10)
    params = synth_variables("resnet8", channels=1)
    logits, feats = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        params, _images(channels=1))
    assert logits.shape == (2, 10) and feats[0].shape == (2, 32, 32, 16)


def test_sync_batch_norm_under_shard_map():
    assert jax.device_count() >= 4
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    synced = get_model("resnet8", 10, axis_name="data")
    plain = get_model("resnet8", 10)
    variables = synth_variables("resnet8")
    x = _images(n=8) * 2.0

    def per_device(v, x):
        (logits, feats), upd = synced.apply(v, x, train=True, mutable=["batch_stats"])
        return logits, feats[-1], upd

    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")),
                                    out_specs=(P("data"), P("data"), P())))
    logits, pooled, upd = sharded(variables, x)
    (ref_logits, ref_feats), ref_upd = jax.jit(
        lambda v, x: plain.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pooled, ref_feats[-1], rtol=1e-4, atol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 upd, ref_upd)
    # without sync BN the per-device statistics differ from the global ones
    local = get_model("resnet8", 10)
    unsynced = jax.jit(jax.shard_map(
        lambda v, x: local.apply(v, x, train=True, mutable=["batch_stats"])[0][0],
        mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data")))
    assert not np.allclose(unsynced(variables, x), ref_logits, atol=1e-3)


def _std(a):
    return float(np.std(np.asarray(a)))


def test_initialisers_match_reference():
    x = jnp.zeros((1, 32, 32, 3))
    # an "rbg" key compiles several times faster than threefry; the laws checked are the same
    key = jax.random.key(0, impl="rbg")
    init = lambda name: jax.jit(get_model(name, 100).init)(key, x)

    # resnet: kaiming-normal fan_out convs, BN (1, 0), PyTorch-default Linear
    v = init("resnet8")["params"]
    k = v["layer3_0"]["conv2"]["kernel"]  # 3x3x64x64
    assert abs(_std(k) - math.sqrt(2 / (9 * 64))) < 0.05 * math.sqrt(2 / (9 * 64))
    np.testing.assert_array_equal(v["bn1"]["scale"], 1.0)
    np.testing.assert_array_equal(v["bn1"]["bias"], 0.0)
    bound = 1 / math.sqrt(64)
    fc = v["fc"]
    assert np.abs(fc["kernel"]).max() <= bound and np.abs(fc["bias"]).max() <= bound
    assert abs(_std(fc["kernel"]) - bound / math.sqrt(3)) < 0.05 * bound
    assert np.abs(fc["bias"]).max() > 0.5 * bound

    # vgg: conv bias 0, classifier N(0, 0.01) with zero bias
    v = init("vgg8")["params"]
    np.testing.assert_array_equal(v["block3_conv0"]["bias"], 0.0)
    assert abs(_std(v["block3_conv0"]["kernel"]) - math.sqrt(2 / (9 * 512))) < 1e-3
    assert abs(_std(v["classifier"]["kernel"]) - 0.01) < 5e-4
    np.testing.assert_array_equal(v["classifier"]["bias"], 0.0)

    # wrn: Linear keeps the default weight but has zero bias
    v = init("wrn_16_1")["params"]
    np.testing.assert_array_equal(v["fc"]["bias"], 0.0)
    assert np.abs(v["fc"]["kernel"]).max() <= 1 / math.sqrt(64)

    # ShuffleV2: PyTorch default uniform(+-1/sqrt(fan_in)) for convs (depthwise fan_in = 9)
    v = init("ShuffleV2")["params"]
    dw = v["layer3_0"]["conv2"]["kernel"]
    assert dw.shape == (3, 3, 1, 232)
    assert np.abs(dw).max() <= 1 / 3 and np.abs(dw).max() > 0.9 / 3
    pw = v["layer3_0"]["conv1"]["kernel"]
    assert np.abs(pw).max() <= 1 / math.sqrt(232)
    assert "bias" not in v["layer3_0"]["conv1"]
