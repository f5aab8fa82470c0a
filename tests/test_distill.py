"""The distillation engine: teacher loading, the step on 1 and 4 devices, every method end to end, resume."""
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import shrink
from wcord_jax import checkpoint, configs, core, data, distill, feeds, losses, metrics, parallel, train

SMALL = dict(num_train=128, num_test=32, image_size=16, num_classes=4)


def _small(config, **overrides):
    return shrink(config, **{**SMALL, "log_every_steps": 4, **overrides})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    config = _small(configs.teacher_config("resnet8"), num_epochs=2)
    train.train_and_evaluate(config, workdir)
    return workdir


def _distill_config(method, teacher_dir, **overrides):
    config = _small(configs.distill_config(method, "resnet8", "resnet8"), **overrides)
    config.teacher.checkpoint = teacher_dir
    return config


def _setup(config, num_devices):
    """The pieces of `distill_and_evaluate`, to drive the (main-stage) step by hand."""
    mesh = parallel.make_mesh(num_devices)
    ds = data.load(config.dataset, config.seed)
    feed = feeds.InMemoryFeed(ds, mesh, config.batch_size, config.eval_batch_size)
    eng = distill.build_engine(config, ds, feed.steps_per_epoch, jnp.float32)
    runner = feed.make_runner(eng.main_step, jnp.float32, num_extra=2, state_spec=eng.spec)
    class_index = parallel.replicate(eng.class_index, mesh)
    teacher_vars = parallel.replicate(eng.teacher_vars, mesh)
    state = parallel.place(jax.tree.map(jnp.copy, eng.state), mesh, eng.spec)
    return mesh, feed, state, lambda st, idx: runner(st, teacher_vars, class_index, feed.images, feed.labels, idx)


def test_kd_loss_matches_numpy():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 7)), rng.normal(size=(5, 7)) * 3
    T = 4.0

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p_t = np.exp(log_softmax(t / T))
    expected = (p_t * (np.log(p_t) - log_softmax(s / T))).sum(-1).mean() * T * T
    np.testing.assert_allclose(losses.kd_loss(jnp.asarray(s), jnp.asarray(t), T), expected, rtol=1e-5)


@pytest.mark.parametrize("method, terms", [
    pytest.param("crdkd", ("ce", "kd", "crd"), marks=pytest.mark.slow),  # CRD's sharded memory: test_losses_sharded
    ("wcordkd", ("ce", "kd", "wcord_global", "wcord_local")),
])
def test_four_devices_give_the_same_losses_as_one(teacher_dir, method, terms):
    config = _distill_config(method, teacher_dir)
    order = feeds.epoch_order(jax.random.PRNGKey(1), 0, SMALL["num_train"], 3, config.batch_size)
    results = []
    for n in (1, 4):
        mesh, _, state, run = _setup(config, n)
        metrics = []
        for i in range(3):  # three separate dispatches: memory / queue state carried between steps
            prev = jax.device_get(state)
            state, m = run(state, parallel.shard_batch(order[i:i + 1], mesh, P(None, "data")))
            metrics.append(jax.device_get(m))
        results.append((metrics, state, prev))
    (m1, s1, prev1), (m4, s4, _) = results
    for a, b in zip(m1, m4):
        for term in terms + ("loss",):
            np.testing.assert_allclose(a[term], b[term], rtol=2e-4, atol=1e-5, err_msg=term)
    if method == "crdkd":
        # Every replica holds the same, complete memory, equal to the one-device memory.
        shards = [np.asarray(s.data) for s in s4.method["own"].memory_s.addressable_shards]
        assert len(shards) == 4 and all(np.array_equal(shards[0], x) for x in shards[1:])
        np.testing.assert_allclose(shards[0], np.asarray(s1.method["own"].memory_s), rtol=1e-4, atol=1e-6)
        assert float(s4.method["own"].z_s) > 0  # Z estimated on the first batch, then kept
    else:
        # The queue is really split: each device holds K/4 rows, which together equal the one-device queue.
        shards = s4.method["own"].queue_t.addressable_shards
        assert {s.data.shape for s in shards} == {(16, 128)}
        np.testing.assert_allclose(np.asarray(s4.method["own"].queue_t), np.asarray(s1.method["own"].queue_t),
                                   rtol=1e-4, atol=1e-5)
        assert int(s4.method["own"].ptr) == int(s1.method["own"].ptr) == 48
        # The momentum key heads are replicated, equal to the one-device ones, and have left the trained heads.
        assert set(s4.method["key_heads"]) == {"embed_s", "embed_t"}
        close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6)
        jax.tree.map(lambda a, b: close(np.asarray(a), np.asarray(b)), s4.method["key_heads"],
                     s1.method["key_heads"])
        m = config.wcord.key_momentum  # key <- m * key + (1 - m) * trained head after the step
        for name in ("embed_s", "embed_t"):
            jax.tree.map(lambda k, k0, p: close(np.asarray(k), m * np.asarray(k0) + (1 - m) * np.asarray(p)),
                         s1.method["key_heads"][name], prev1.method["key_heads"][name], s1.params[name])
        assert not np.allclose(np.asarray(s1.method["key_heads"]["embed_s"]["linear"]["kernel"]),
                               np.asarray(s1.params["embed_s"]["linear"]["kernel"]), rtol=0, atol=1e-7)


def test_a_step_leaves_the_teacher_unchanged(teacher_dir):
    config = _distill_config("crdkd", teacher_dir)
    before = jax.tree.leaves(checkpoint.load_variables(teacher_dir))
    mesh, feed, state, run = _setup(config, 1)
    student_before = jax.tree.map(np.asarray, state.params["student"])
    order = feeds.epoch_order(jax.random.PRNGKey(1), 0, SMALL["num_train"], 2, config.batch_size)
    state, _ = run(state, parallel.shard_batch(order[:1], mesh, P(None, "data")))
    assert set(state.params) == {"student", "embed_s", "embed_t"}  # the optimizer sees no teacher parameter
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), student_before, state.params["student"])
    assert any(jax.tree.leaves(changed))
    for a, b in zip(before, jax.tree.leaves(checkpoint.load_variables(teacher_dir))):
        np.testing.assert_array_equal(a, b)


def test_missing_or_mismatched_teacher_checkpoint_is_a_clear_error(teacher_dir, tmp_path):
    config = _distill_config("kd", str(tmp_path / "nowhere"))
    with pytest.raises(core.ConfigError, match="teacher checkpoint not found"):
        distill.distill_and_evaluate(config, str(tmp_path / "w1"))
    config = _distill_config("kd", teacher_dir)
    config.teacher.model = "resnet14"
    with pytest.raises(core.ConfigError, match="holds a resnet8 checkpoint"):
        distill.distill_and_evaluate(config, str(tmp_path / "w2"))
    config = _distill_config("kd", teacher_dir)
    config.dataset.num_classes = 7  # a teacher of 4 classes: another label space, KD refused
    with pytest.raises(core.ConfigError, match="trained on another task .*alpha=0.9 weights KD"):
        distill.distill_and_evaluate(config, str(tmp_path / "w3"))
    config = _distill_config("kd", teacher_dir)
    config.dataset.num_channels = 1  # the teacher was trained on 3-channel images
    with pytest.raises(core.ConfigError, match="does not hold a resnet8 for 4 classes and 1-channel images"):
        distill.distill_and_evaluate(config, str(tmp_path / "w4"))


ENGINE_METHODS = ("none", "kd", "crd", "crdkd", "wcord", "wcordkd")  # the baselines: test_baselines_engine.py


def _tiered(methods, fast):
    """The fast tier (-m "not slow") runs the methods in `fast`, the whole suite every one."""
    return [m if m in fast else pytest.param(m, marks=pytest.mark.slow) for m in methods]


@pytest.mark.parametrize("method", _tiered(ENGINE_METHODS, ("crdkd",)))  # wcord: the resume test
def test_every_method_runs_and_logs_its_terms(teacher_dir, tmp_path, method):
    config = _distill_config(method, teacher_dir, num_devices=2)
    result = distill.distill_and_evaluate(config, str(tmp_path))
    assert 0.0 <= result["eval/top1"] <= 1.0
    events = metrics.read_metrics(str(tmp_path))
    assert "teacher/top1" in events[0]
    keys = set().union(*[e for e in events if "train/loss" in e])
    expected = {"none": set(), "kd": set(), "crd": {"train/crd"}, "crdkd": {"train/crd"},
                "wcord": {"train/wcord_global", "train/wcord_local", "train/sinkhorn_converged"},
                "wcordkd": {"train/wcord_global", "train/wcord_local"}}[method]
    assert {"train/ce", "train/loss", "train/lr"} | expected <= keys
    assert ("train/kd" in keys) == (method != "none")  # the student alone runs no teacher pass
    assert all(np.isfinite(e["train/loss"]) for e in events if "train/loss" in e)


def test_distillation_resumes_with_the_same_weights_and_queue(teacher_dir, tmp_path):
    config = _distill_config("wcord", teacher_dir, num_devices=2, num_epochs=2, checkpoint_every_steps=4,
                             keep_checkpoints=10)
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    distill.distill_and_evaluate(config, straight)
    distill.distill_and_evaluate(config, resumed)
    last = os.path.join(resumed, "checkpoints", "last")
    for name in os.listdir(last):  # lose everything after step 12 (epoch 2, step 4 of 8)
        if name.isdigit() and int(name) > 12:
            shutil.rmtree(os.path.join(last, name))
    distill.distill_and_evaluate(config, resumed)
    a, b = checkpoint.load_variables(straight), checkpoint.load_variables(resumed)
    assert set(a["params"]) == {"student", "embed_s", "embed_t"}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # The momentum key heads are checkpointed and resume too.
    key_a, key_b = (checkpoint.load_state(w)["method"]["key_heads"] for w in (straight, resumed))
    assert set(key_a) == {"embed_s", "embed_t"}
    for x, y in zip(jax.tree.leaves(key_a), jax.tree.leaves(key_b)):
        np.testing.assert_array_equal(x, y)


METHOD_TERMS = {"none": ("ce",), "kd": ("ce", "kd"), "crd": ("ce", "crd"), "crdkd": ("ce", "kd", "crd"),
                "wcord": ("ce", "wcord_global", "wcord_local"), "wcordkd": ("ce", "kd", "wcord_global", "wcord_local")}


@pytest.mark.parametrize("method", _tiered(ENGINE_METHODS, ("crd", "wcord", "wcordkd")))  # every term between them
def test_a_few_steps_lower_each_term_of_the_method(teacher_dir, method):
    """Training on one batch lowers every loss term on that batch, against fixed negatives: the memories / queue of
    a reference state (fresh momentum) are used in every step, and the terms are read from a step on the probe batch before and after
    training, both with the reference state's step counter (so the same augmentation and CRD draws)."""
    config = _distill_config(method, teacher_dir, learning_rate=0.02)
    mesh, _, state, run = _setup(config, 1)
    order = feeds.epoch_order(jax.random.PRNGKey(1), 0, SMALL["num_train"], 8, config.batch_size)
    batch = functools.partial(parallel.shard_batch, mesh=mesh, spec=P(None, "data"))
    for i in range(3):  # fill the queue / set CRD's Z from other batches
        state, _ = run(state, batch(order[i:i + 1]))
    # Fresh momentum: the warm-up's momentum, built against other batches and an evolving queue, is not the
    # probe objective's.
    reference = state.replace(opt_state=jax.tree.map(jnp.zeros_like, state.opt_state))
    state = jax.tree.map(jnp.copy, reference)
    probe = batch(order[3:4])
    _, before = run(jax.tree.map(jnp.copy, reference), probe)
    for _ in range(8):  # against the reference negatives (else the probe's own past embeddings become negatives)
        state, _ = run(state.replace(method={**state.method, "own": jax.tree.map(jnp.copy, reference.method["own"])}),
                       probe)
    _, after = run(jax.tree.map(jnp.copy, state.replace(step=reference.step,
                                                        method={**state.method, "own": reference.method["own"]})),
                   probe)
    before, after = jax.device_get(before), jax.device_get(after)
    for term in METHOD_TERMS[method]:
        assert after[term][0] < before[term][0], (term, before[term], after[term])


@pytest.mark.parametrize("key, value, message", [
    ("negatives", "bank", "unknown wcord.negatives 'bank'; valid: queue, batch, memory"),
    ("key_heads", "frozen", "unknown wcord.key_heads 'frozen'; valid: ema, trained"),
    ("directions", "teacher", "unknown wcord.directions 'teacher'; valid: both, student"),
    ("key_momentum", 1.0, r"wcord.key_momentum must be in \[0, 1\), got 1.0"),
    ("student_queue_fraction", 0.0, r"wcord.student_queue_fraction must be in \(0, 1\], got 0.0"),
])
def test_bad_wcord_settings_are_one_clear_error(key, value, message):
    config = _distill_config("wcord", "/nonexistent")
    config.wcord[key] = value
    with pytest.raises(core.ConfigError, match=f"^{message}$"):
        distill.validate(config, 1)


@pytest.mark.parametrize("key, value", [("key_heads", "trained"), ("queue_init", "random")])
def test_ablation_only_settings_need_the_ablation_flag(key, value):
    config = _distill_config("wcord", "/nonexistent")
    config.wcord[key] = value
    with pytest.raises(core.ConfigError, match=rf"^wcord.{key}={value} is kept only as an ablation \(.+\); add "
                                                r"--config.wcord.ablation=True to run it anyway$"):
        distill.validate(config, 1)
    config.wcord.ablation = True
    distill.validate(config, 1)


def test_a_config_holds_only_its_method_s_sections():
    from wcord_jax import distillers

    every = set(distillers.sections())
    assert {"crd", "wcord", "fitnet", "dkd", "lskd"} <= every
    for method, own in (("none", set()), ("kd", set()), ("crd", {"crd"}), ("crdkd", {"crd"}),
                        ("wcord", {"wcord", "crd"}), ("cc", {"crd"}), ("fitnet", {"fitnet"}), ("dkd", {"dkd"})):
        config = configs.distill_config(method, "resnet8", "resnet8")
        assert every & set(config) == own, (method, sorted(every & set(config)))


def test_crd_with_more_negatives_than_a_pool_draws_with_replacement_and_says_so_once(teacher_dir, caplog):
    from conftest import first_steps

    config = _distill_config("crd", teacher_dir)
    config.crd.nce_k = 100  # the other-class pools of the 128-example, 4-class set hold about 96
    with caplog.at_level("WARNING", logger="wcord_jax"):
        metrics = first_steps(config, 2)
    warnings = [r.getMessage() for r in caplog.records if "crd.nce_k=100" in r.getMessage()]
    assert len(warnings) == 1 and "with replacement, as RepDistiller does" in warnings[0]
    assert all(np.isfinite(m["crd"]) for m in metrics)
