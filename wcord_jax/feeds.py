"""Getting batches to the train step: resident on the device (small data sets) or streamed (ImageNet).

A feed knows how many steps an epoch has, yields what each dispatch of the train step needs, builds each step's batch
on the device around a per-device step function (`make_runner`, compiled by `wcord_jax.step`) and evaluates a model
on the test split (`make_evaluator`). Both kinds of
feed key every random draw by the run's key, the epoch and the example's position, so one device and many devices
see the same batches, and a resumed run sees the batches it would have seen.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from wcord_jax import backend, parallel
from wcord_jax import step as step_lib
from wcord_jax import views as views_lib
from wcord_jax.core import AUGMENT_STREAM, AXIS, ORDER_STREAM  # noqa: F401 (feeds.AUGMENT_STREAM: the tests use it)
from wcord_jax.data import DataSet
from wcord_jax.data import augment as aug
from wcord_jax.losses.ce import eval_sums

# The random views' keys: folded from each example's augmentation key (training) or from this key and the test
# example's index (evaluation), and then from the view's slot (0 the trained network's, 1 the teacher's).
EVAL_VIEW_SEED = 20_201
STUDENT, TEACHER = "student", "teacher"
_SLOTS = {STUDENT: 0, TEACHER: 1}


@dataclasses.dataclass(frozen=True)
class ViewInput:
    """A view (`wcord_jax.views`) with the per-channel mean and std (pixel-like units) that normalise it."""

    view: views_lib.View
    mean: np.ndarray
    std: np.ndarray

    @property
    def source(self) -> str:
        return self.view.feature or "image"

    def same_as(self, other: "ViewInput") -> bool:
        """Whether the two inputs are always equal (a deterministic view with the same normalisation)."""
        return (self.view.spec == other.view.spec and not self.view.random and np.array_equal(self.mean, other.mean)
                and np.array_equal(self.std, other.std))

    def meta(self) -> dict:
        return {"view": self.view.spec, "view_mean": [float(v) for v in self.mean],
                "view_std": [float(v) for v in self.std]}


def view_input(view: views_lib.View, dataset: DataSet, mean=None, std=None) -> ViewInput:
    """`view` of `dataset` with its normalisation: `mean`/`std` if given (a teacher's, from its checkpoint), the data
    set's constants for the views that keep the image's statistics, else measured on the training split."""
    view.check(dataset.image_shape, dataset.feature_shapes)
    if mean is None:
        if view.keeps_image_stats:
            mean, std = dataset.mean, dataset.std
        else:
            source = dataset.train.features[view.feature] if view.feature else dataset.train.images
            mean, std = views_lib.measure_stats(view, source)
    return ViewInput(view, np.asarray(mean, np.float32), np.asarray(std, np.float32))


def identity_input(dataset: DataSet) -> ViewInput:
    """The plain image normalised by the data set's constants: what a network sees without a view."""
    return ViewInput(views_lib.parse("identity"), np.asarray(dataset.mean, np.float32),
                     np.asarray(dataset.std, np.float32))


def view_channels(view: views_lib.View, dataset: DataSet) -> int:
    feature = dataset.feature_shapes.get(view.feature, (0, 0, 0))[-1] if view.feature else None
    return view.channels(dataset.image_shape[-1], feature)


def epoch_order(rng: jax.Array, epoch: int, num_examples: int, steps: int, batch: int) -> np.ndarray:
    """The epoch's shuffled example indices as [steps, batch] (the last partial batch is dropped)."""
    key = jax.random.fold_in(jax.random.fold_in(rng, ORDER_STREAM), epoch)
    perm = jax.device_get(jax.random.permutation(key, num_examples)).astype(np.int32)
    return perm[: steps * batch].reshape(steps, batch)


def eval_indices(num: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices 0..num-1 padded to whole batches, shaped [S, batch], and the matching 0/1 mask."""
    chunks = -(-num // batch)
    idx = np.zeros(chunks * batch, np.int32)
    idx[:num] = np.arange(num)
    mask = np.zeros(chunks * batch, np.float32)
    mask[:num] = 1.0
    return idx.reshape(chunks, batch), mask.reshape(chunks, batch)


def _view_keys(example_keys: jax.Array, slot: str) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, _SLOTS[slot]))(example_keys)


def render(inp: ViewInput, sources: dict, keys, slot: str, dtype) -> jax.Array:
    """The normalised view `inp` of a batch: `sources` {'image': ..., feature: ...} of (augmented) pixels, `keys`
    the examples' keys. The identity view of uint8 images is normalised as the pixels are, bit for bit."""
    x = sources[inp.source]
    if not inp.view.is_identity:
        x = inp.view.apply(x.astype(jnp.float32), _view_keys(keys, slot) if inp.view.random else None)
    return aug.normalize(x, jnp.asarray(inp.mean), jnp.asarray(inp.std), dtype)


def device_batch(state_rng, step, images, labels, idx, *, mean, std, dtype, augment: bool,
                 views: Optional[dict] = None) -> dict:
    """Gathers this device's examples `idx` from the resident data set and augments them on the device.

    Each example's crop and flip are keyed by (run key, step, its position in the global batch), so the batch is the
    same whatever the number of devices. Call inside shard_map over `data`.

    `images` is the uint8 image array, or {'image': ..., feature: ...} with further features that views read;
    `views` ({'student': ViewInput, 'teacher': ViewInput}; None: the image normalised by `mean`/`std`) gives what
    the networks see: 'image' is the student's view (the trained network's) and 'teacher_image' the teacher's when
    it differs. Every source of an example gets the same crop and flip.
    """
    local = idx.shape[0]
    sources = {k: v[idx] for k, v in images.items()} if isinstance(images, dict) else {"image": images[idx]}
    step_key = jax.random.fold_in(jax.random.fold_in(state_rng, AUGMENT_STREAM), step)
    keys = aug.example_keys(step_key, lax.axis_index(AXIS) * local, local)
    if augment:
        if len(sources) == 1:
            sources = {k: aug.augment_batch(keys, v) for k, v in sources.items()}
        else:  # one crop and flip for all sources of an example: augment their concatenation
            names = list(sources)
            splits = np.cumsum([sources[k].shape[-1] for k in names])[:-1]
            joined = aug.augment_batch(keys, jnp.concatenate([sources[k].astype(jnp.float32) for k in names], -1))
            sources = dict(zip(names, jnp.split(joined, splits, axis=-1)))
    batch = {"label": labels[idx], "index": idx}
    if views is None:
        batch["image"] = aug.normalize(sources["image"], mean, std, dtype)
        return batch
    batch["image"] = render(views[STUDENT], sources, keys, STUDENT, dtype)
    teacher = views.get(TEACHER)
    if teacher is not None and not teacher.same_as(views[STUDENT]):
        batch["teacher_image"] = render(teacher, sources, keys, TEACHER, dtype)
    return batch


class InMemoryFeed:
    """The whole data set lives on every device; a dispatch runs `steps_per_dispatch` steps in a `lax.scan`.

    With several processes every process loads the whole (small) data set, since each of its devices holds it, and
    draws the same epoch order from the run's key; of each batch of indices it puts only its own devices' columns
    on the mesh (`parallel.shard_batch`).
    """

    def __init__(self, dataset: DataSet, mesh, batch_size: int, eval_batch_size: int, steps_per_dispatch: int = 1,
                 view: Optional[ViewInput] = None):
        self.dataset, self.mesh = dataset, mesh
        self.batch_size, self.steps_per_dispatch = batch_size, steps_per_dispatch
        self.steps_per_epoch = dataset.num_train // batch_size
        self.labels = parallel.replicate(dataset.train.labels, mesh)
        self.test_labels = parallel.replicate(dataset.test.labels, mesh)
        idx, mask = eval_indices(dataset.num_test, eval_batch_size)
        self.test_idx = parallel.shard_batch(idx, mesh, P(None, AXIS))
        self.test_mask = parallel.shard_batch(mask, mesh, P(None, AXIS))
        self._mean, self._std = jnp.asarray(dataset.mean), jnp.asarray(dataset.std)
        self.views = None
        if view is not None and not view.same_as(identity_input(dataset)):
            self.views = {STUDENT: view}
        self._place_sources()

    def set_teacher_view(self, view: ViewInput) -> None:
        """What a distillation run's teacher sees (`batch['teacher_image']` where it differs from the student's)."""
        student = (self.views or {}).get(STUDENT) or identity_input(self.dataset)
        if self.views is None and view.same_as(student):
            return
        self.views = {STUDENT: student, TEACHER: view}
        self._place_sources()

    def view_meta(self) -> dict:
        """The trained network's view and its normalisation, for the checkpoint's metadata."""
        return ((self.views or {}).get(STUDENT) or identity_input(self.dataset)).meta()

    def _place_sources(self) -> None:
        """The resident arrays the views read: the images alone, or {'image': ..., feature: ...}."""
        features = sorted({v.view.feature for v in (self.views or {}).values() if v.view.feature})
        if not features:
            self.images = parallel.replicate(self.dataset.train.images, self.mesh)
            self.test_images = parallel.replicate(self.dataset.test.images, self.mesh)
            return
        self.images = {"image": parallel.replicate(self.dataset.train.images, self.mesh)}
        self.test_images = {"image": parallel.replicate(self.dataset.test.images, self.mesh)}
        for name in features:
            self.images[name] = parallel.replicate(self.dataset.train.features[name], self.mesh)
            self.test_images[name] = parallel.replicate(self.dataset.test.features[name], self.mesh)

    def dispatches(self, rng: jax.Array, epoch: int, start: int) -> Iterator[tuple[int, tuple]]:
        """(steps, extra runner arguments) for the rest of `epoch` from step `start` within it.

        Dispatch boundaries are multiples of `steps_per_dispatch` from the epoch start, whatever `start` is. The
        epoch's order is drawn when this is called; the iterator then only transfers each dispatch's indices.
        """
        order = epoch_order(rng, epoch, self.dataset.num_train, self.steps_per_epoch, self.batch_size)

        def each():
            pos, spd = start, self.steps_per_dispatch
            while pos < self.steps_per_epoch:
                end = min(self.steps_per_epoch, (pos // spd + 1) * spd)
                idx = parallel.shard_batch(order[pos:end], self.mesh, P(None, AXIS))
                yield end - pos, (self.images, self.labels, idx)
                pos = end

        return each()

    def make_runner(self, step_fn: Callable, dtype, augment: bool = True, num_extra: int = 0, state_spec=P(),
                    nonfinite: Optional[str] = None):
        """Compiles per-device `step_fn(state, batch, *extra) -> (state, metrics)` into one dispatch.

        The result is `run(state, *extra, images, labels, idx)`: `extra` are replicated inputs the step reads but
        does not update (a frozen teacher's variables, say); the state is donated. `state_spec` is a PartitionSpec
        (or a pytree prefix of them) for the state: replicated by default, `P('data')` for leaves split over the
        devices (a sharded negative queue). `nonfinite` ('stop' or 'skip', see `guard_nonfinite`) adds the
        finiteness flag to every step's metrics; None leaves the step as it is.
        """
        mean, std, views = self._mean, self._std, self.views
        if nonfinite is not None:
            step_fn = step_lib.guard_nonfinite(step_fn, nonfinite)

        def per_device(state, *args):
            extra, (images, labels, idx) = args[:num_extra], args[num_extra:]

            def body(st, step_idx):
                batch = device_batch(st.rng, st.step, images, labels, step_idx, mean=mean, std=std, dtype=dtype,
                                     augment=augment, views=views)
                return step_fn(st, batch, *extra)

            return step_lib.scan_steps(body, state, idx)

        return step_lib.compile_dispatch(per_device, self.mesh, state_spec, num_extra, (P(), P(), P(None, AXIS)))

    def make_evaluator(self, apply_fn: Callable, dtype, slot: str = STUDENT) -> Callable[[dict], dict]:
        """`evaluate(variables) -> {eval/loss, eval/top1, eval/top5}` over the whole test split in one dispatch.

        `apply_fn(variables, images)` returns logits in eval mode; the images are the view of `slot` ('student': the
        trained network's, 'teacher': a distillation run's teacher's).
        """
        mean, std = self._mean, self._std
        view = None
        if self.views is not None:
            view = self.views.get(slot, self.views[STUDENT])

        def per_device(variables, images, labels, idx, mask):
            def body(_, chunk):
                i, m = chunk
                if view is None:
                    x = aug.normalize(images[i], mean, std, dtype)
                else:
                    sources = {k: v[i] for k, v in images.items()} if isinstance(images, dict) else {"image": images[i]}
                    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.PRNGKey(EVAL_VIEW_SEED), j))(i)
                    x = render(view, sources, keys, slot, dtype)
                logits = apply_fn(variables, x)
                return None, eval_sums(logits, labels[i], m)

            _, sums = lax.scan(body, None, (idx, mask))
            return lax.psum(jnp.sum(sums, axis=0), AXIS)

        mapped = step_lib.compile_evaluator(per_device, self.mesh, (P(), P(), P(), P(None, AXIS), P(None, AXIS)))
        n = self.dataset.num_test

        def evaluate(variables):
            sums = np.asarray(mapped(variables, self.test_images, self.test_labels, self.test_idx, self.test_mask))
            return _averages(sums, n)

        return evaluate


def _averages(sums: np.ndarray, n: int) -> dict:
    return {"eval/loss": float(sums[0] / n), "eval/top1": float(sums[1] / n), "eval/top5": float(sums[2] / n)}


class StreamFeed:
    """Batches streamed from tf.data (ImageNet), one step per dispatch.

    Each process reads its own share of the split (tf.data `shard(process_count, process_index)`) in batches of
    batch_size / process_count, which `jax.make_array_from_process_local_data` joins into the global batch. The
    transfers to the devices run `prefetch` batches ahead of the step that takes them (0: each batch when its step
    is dispatched), so that a batch's copy overlaps the steps before it.
    """

    def __init__(self, dataset: DataSet, mesh, batch_size: int, eval_batch_size: int, seed: int, prefetch: int = 2):
        from wcord_jax.data import imagenet

        if prefetch < 0:
            raise ValueError(f"prefetch must be at least 0, got {prefetch}")
        self._imagenet = imagenet
        self.prefetch = prefetch
        self.dataset, self.mesh, self.seed = dataset, mesh, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.steps_per_epoch = dataset.num_train // batch_size
        self._sharding = NamedSharding(mesh, P(AXIS))
        self._mean, self._std = jnp.asarray(dataset.mean), jnp.asarray(dataset.std)
        self.views = None  # views other than the image need an in-memory data set

    def set_teacher_view(self, view: ViewInput) -> None:
        if not view.view.is_identity:
            raise ValueError(f"view {view.view.spec}: views other than identity need an in-memory data set")

    def view_meta(self) -> dict:
        return identity_input(self.dataset).meta()

    def _global(self, local_batch: dict):
        return {k: jax.make_array_from_process_local_data(self._sharding, v) for k, v in local_batch.items()}

    def dispatches(self, rng: jax.Array, epoch: int, start: int) -> Iterator[tuple[int, tuple]]:
        del rng  # tf.data is seeded by (seed, epoch) and the example index
        ds = self._imagenet.make_dataset(
            "train", train=True, global_batch_size=self.batch_size, seed=self.seed, epoch=epoch,
            data_dir=self.dataset.data_dir, num=self.dataset.num_train, process_index=jax.process_index(),
            process_count=jax.process_count(), skip_batches=start)
        host = itertools.islice(self._imagenet.iterate(ds), max(0, self.steps_per_epoch - start))
        ahead: collections.deque = collections.deque()
        for batch in host:
            ahead.append(self._global(batch))  # an asynchronous copy to the devices
            if len(ahead) > self.prefetch:
                yield 1, (ahead.popleft(),)
        while ahead:
            yield 1, (ahead.popleft(),)

    def make_runner(self, step_fn: Callable, dtype, augment: bool = True, num_extra: int = 0, state_spec=P(),
                    nonfinite: Optional[str] = None):
        """As `InMemoryFeed.make_runner`, for `run(state, *extra, batch)` on one host batch."""
        del augment  # done by tf.data
        mean, std = self._mean, self._std
        if nonfinite is not None:
            step_fn = step_lib.guard_nonfinite(step_fn, nonfinite)

        def per_device(state, *args):
            extra, batch = args[:num_extra], args[num_extra]
            return step_fn(state, dict(batch, image=aug.normalize(batch["image"], mean, std, dtype)), *extra)

        return step_lib.compile_dispatch(per_device, self.mesh, state_spec, num_extra, (P(AXIS),))

    def make_evaluator(self, apply_fn: Callable, dtype, slot: str = STUDENT) -> Callable[[dict], dict]:
        del slot  # both networks see the image
        mean, std = self._mean, self._std

        def per_device(variables, batch):
            logits = apply_fn(variables, aug.normalize(batch["image"], mean, std, dtype))
            return lax.psum(eval_sums(logits, batch["label"], batch["mask"]), AXIS)

        mapped = step_lib.compile_evaluator(per_device, self.mesh, (P(), P(AXIS)))
        local = self.eval_batch_size // jax.process_count()
        # tf.data's shard gives each process ceil or floor of num_test / process_count examples.
        per_process = -(-self.dataset.num_test // jax.process_count())
        num_batches = -(-per_process // local)
        empty = {"image": np.zeros((0, *self.dataset.image_shape), np.uint8), "label": np.zeros((0,), np.int32),
                 "index": np.zeros((0,), np.int32)}

        def evaluate(variables):
            ds = self._imagenet.make_dataset(
                "validation", train=False, global_batch_size=self.eval_batch_size, seed=self.seed, epoch=0,
                data_dir=self.dataset.data_dir, num=self.dataset.num_test, process_index=jax.process_index(),
                process_count=jax.process_count())
            totals = np.zeros(3)
            batches = self._imagenet.iterate(ds)
            # Every process runs the same number of dispatches (each one is a collective): a process whose share of
            # the split has run out feeds batches of padding, masked out.
            for _ in range(num_batches):
                batch = _pad(next(batches, empty), local)
                totals += np.asarray(mapped(variables, self._global(batch)))
            return _averages(totals, self.dataset.num_test)

        return evaluate


def _pad(batch: dict, size: int) -> dict:
    """Pads a host batch to `size` rows with a 0/1 `mask` (1 for real rows)."""
    n = batch["label"].shape[0]
    out = {k: np.concatenate([v, np.zeros((size - n, *v.shape[1:]), v.dtype)]) for k, v in batch.items()}
    out["mask"] = (np.arange(size) < n).astype(np.float32)
    return out


def make_feed(dataset: DataSet, mesh, config, view: Optional[ViewInput] = None):
    """The feed of `dataset`; `view` is what the trained network sees (None: the image). Its steps per dispatch are
    `config.steps_per_dispatch`, or the backend's default where that is 0 (`wcord_jax.backend`)."""
    spd, _ = backend.steps_per_dispatch(config.steps_per_dispatch, backend.current(), dataset.in_memory)
    if dataset.in_memory:
        return InMemoryFeed(dataset, mesh, config.batch_size, config.eval_batch_size, spd, view=view)
    return StreamFeed(dataset, mesh, config.batch_size, config.eval_batch_size, config.seed,
                      prefetch=config.get("stream_prefetch", 2))
