"""The CRD paper's thirteen CIFAR-100 teacher / student pairs: every method builds for every pair on which
RepDistiller's README reports it, and FSP is refused with one clear line on the pairs it marks N/A (different channel
counts), as in its tables. Some pairs also trace a whole distillation step (shapes only)."""
import functools

import jax
import jax.numpy as jnp
import pytest
from conftest import shrink

from wcord_jax import configs, data, distill, distillers, feeds, models, parallel
from wcord_jax.core import ConfigError

pytestmark = pytest.mark.slow  # whole steps of the large CIFAR pairs

# RepDistiller's README, CIFAR-100 tables: same-family pairs, then different families (no FSP row there).
SAME_FAMILY = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
               ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")]
CROSS_FAMILY = [("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"),
                ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"), ("wrn_40_2", "ShuffleV1")]
FSP_NOT_APPLICABLE = {("wrn_40_2", "wrn_40_1")} | set(CROSS_FAMILY)
IMAGE = (32, 32, 3)


@functools.lru_cache(maxsize=None)
def _shapes(model: str, preact: bool):
    return distill.feature_shapes(models.get_model(model, 100), IMAGE, preact)


@pytest.mark.parametrize("teacher,student", SAME_FAMILY + CROSS_FAMILY)
def test_every_method_pairs_where_repdistiller_reports_it(teacher, student):
    for method in distillers.names():
        config = configs.distill_config(method, teacher, student)
        d = distillers.get(method)
        args = (config, _shapes(student, d.preact), _shapes(teacher, d.preact))
        if method == "fsp" and (teacher, student) in FSP_NOT_APPLICABLE:
            with pytest.raises(ConfigError, match=f"fsp cannot pair {teacher} with {student}") as e:
                distill.make_modules(*args)
            assert "\n" not in str(e.value)
            continue
        modules = distill.make_modules(*args)
        for name, (module, inputs) in modules.items():  # every extra module initialises on these shapes
            jax.eval_shape(lambda m=module, a=inputs: m.init(jax.random.PRNGKey(0), *a))


def _trace_steps(method, teacher, student):
    """The metrics' shapes of a whole main (and init) step of `method` on the pair, traced, not run."""
    config = shrink(configs.distill_config(method, teacher, student), num_train=128, image_size=32,
                    num_classes=100, batch_size=16)
    config.dataset.num_channels = 3
    config.teacher.checkpoint = "unused: the teacher's variables are given"
    if config.init_epochs:
        config.init_epochs = 1
    mesh = parallel.make_mesh(1)
    ds = data.load(config.dataset, 0)
    feed = feeds.InMemoryFeed(ds, mesh, config.batch_size, config.eval_batch_size)
    t_module = models.get_model(teacher, 100)
    t_vars = jax.eval_shape(functools.partial(t_module.init, train=False), jax.random.PRNGKey(0),
                            jnp.zeros((1, *IMAGE)))
    t_vars = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), t_vars)
    eng = distill.build_engine(config, ds, feed.steps_per_epoch, jnp.float32, teacher_vars=t_vars)
    idx = jnp.zeros((1, config.batch_size), jnp.int32)
    out = []
    for step in filter(None, (eng.main_step, eng.init_step)):
        runner = feed.make_runner(step, jnp.float32, num_extra=2, state_spec=eng.spec)
        state, metrics = jax.eval_shape(runner, eng.state, t_vars, eng.class_index, feed.images, feed.labels, idx)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), state) == \
            jax.tree.map(lambda a: (a.shape, a.dtype), eng.state)
        out.append(metrics)
    return out


@pytest.mark.parametrize("method,teacher,student", [("crd", "ResNet50", "MobileNetV2"),
                                                    ("wcord", "wrn_40_2", "ShuffleV1"),
                                                    ("ab", "vgg13", "MobileNetV2")])
def test_whole_step_traces_across_families(method, teacher, student):
    metrics = _trace_steps(method, teacher, student)
    assert {"loss", "ce", "top1"} <= set(metrics[0]) and all(m.shape == (1,) for m in metrics[0].values())
    if method == "ab":  # the init stage traces too
        assert len(metrics) == 2 and "init_ab" in metrics[1]
