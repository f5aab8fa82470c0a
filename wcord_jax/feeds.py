"""Getting batches to the train step: resident on the device (small data sets) or streamed (ImageNet).

A feed knows how many steps an epoch has, yields what each dispatch of the train step needs, compiles a per-device step
function into that dispatch (`make_runner`) and evaluates a model on the test split (`make_evaluator`). Both kinds of
feed key every random draw by the run's key, the epoch and the example's position, so one device and many devices
see the same batches, and a resumed run sees the batches it would have seen.
"""
from __future__ import annotations

from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

from wcord_jax import parallel
from wcord_jax.data import DataSet
from wcord_jax.data import augment as aug

AXIS = parallel.AXIS
# Streams folded from the run's key (stream 0 initialises parameters).
ORDER_STREAM, AUGMENT_STREAM = 1, 2


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the k highest logits (k capped at the number of classes)."""
    _, top = lax.top_k(logits, min(k, logits.shape[-1]))
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def eval_sums(logits, labels, mask) -> jax.Array:
    """[loss sum, top-1 hits, top-5 hits] over the rows where mask is 1."""
    return jnp.stack([jnp.sum(cross_entropy(logits, labels) * mask), jnp.sum(topk_correct(logits, labels, 1) * mask),
                      jnp.sum(topk_correct(logits, labels, 5) * mask)])


def epoch_order(rng: jax.Array, epoch: int, num_examples: int, steps: int, batch: int) -> np.ndarray:
    """The epoch's shuffled example indices as [steps, batch] (the last partial batch is dropped)."""
    key = jax.random.fold_in(jax.random.fold_in(rng, ORDER_STREAM), epoch)
    perm = np.asarray(jax.random.permutation(key, num_examples)).astype(np.int32)
    return perm[: steps * batch].reshape(steps, batch)


def eval_indices(num: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices 0..num-1 padded to whole batches, shaped [S, batch], and the matching 0/1 mask."""
    chunks = -(-num // batch)
    idx = np.zeros(chunks * batch, np.int32)
    idx[:num] = np.arange(num)
    mask = np.zeros(chunks * batch, np.float32)
    mask[:num] = 1.0
    return idx.reshape(chunks, batch), mask.reshape(chunks, batch)


def device_batch(state_rng, step, images, labels, idx, *, mean, std, dtype, augment: bool) -> dict:
    """Gathers this device's examples `idx` from the resident data set and augments them on the device.

    Each example's crop and flip are keyed by (run key, step, its position in the global batch), so the batch is the
    same whatever the number of devices. Call inside shard_map over `data`.
    """
    local = idx.shape[0]
    x = images[idx]
    if augment:
        step_key = jax.random.fold_in(jax.random.fold_in(state_rng, AUGMENT_STREAM), step)
        first = lax.axis_index(AXIS) * local
        x = aug.augment_batch(aug.example_keys(step_key, first, local), x)
    return {"image": aug.normalize(x, mean, std, dtype), "label": labels[idx], "index": idx}


class InMemoryFeed:
    """The whole data set lives on every device; a dispatch runs `steps_per_dispatch` steps in a `lax.scan`.

    With several processes every process loads the whole (small) data set, since each of its devices holds it, and
    draws the same epoch order from the run's key; of each batch of indices it puts only its own devices' columns
    on the mesh (`parallel.shard_batch`).
    """

    def __init__(self, dataset: DataSet, mesh, batch_size: int, eval_batch_size: int, steps_per_dispatch: int = 1):
        self.dataset, self.mesh = dataset, mesh
        self.batch_size, self.steps_per_dispatch = batch_size, steps_per_dispatch
        self.steps_per_epoch = dataset.num_train // batch_size
        self.images = parallel.replicate(dataset.train.images, mesh)
        self.labels = parallel.replicate(dataset.train.labels, mesh)
        self.test_images = parallel.replicate(dataset.test.images, mesh)
        self.test_labels = parallel.replicate(dataset.test.labels, mesh)
        idx, mask = eval_indices(dataset.num_test, eval_batch_size)
        self.test_idx = parallel.shard_batch(idx, mesh, P(None, AXIS))
        self.test_mask = parallel.shard_batch(mask, mesh, P(None, AXIS))
        self._mean, self._std = jnp.asarray(dataset.mean), jnp.asarray(dataset.std)

    def dispatches(self, rng: jax.Array, epoch: int, start: int) -> Iterator[tuple[int, tuple]]:
        """(steps, extra runner arguments) for the rest of `epoch` from step `start` within it.

        Dispatch boundaries are multiples of `steps_per_dispatch` from the epoch start, whatever `start` is.
        """
        order = epoch_order(rng, epoch, self.dataset.num_train, self.steps_per_epoch, self.batch_size)
        pos, spd = start, self.steps_per_dispatch
        while pos < self.steps_per_epoch:
            end = min(self.steps_per_epoch, (pos // spd + 1) * spd)
            idx = parallel.shard_batch(order[pos:end], self.mesh, P(None, AXIS))
            yield end - pos, (self.images, self.labels, idx)
            pos = end

    def make_runner(self, step_fn: Callable, dtype, augment: bool = True, num_extra: int = 0, state_spec=P()):
        """Compiles per-device `step_fn(state, batch, *extra) -> (state, metrics)` into one dispatch.

        The result is `run(state, *extra, images, labels, idx)`: `extra` are replicated inputs the step reads but
        does not update (a frozen teacher's variables, say); the state is donated. `state_spec` is a PartitionSpec
        (or a pytree prefix of them) for the state: replicated by default, `P('data')` for leaves split over the
        devices (a sharded negative queue).
        """
        mean, std = self._mean, self._std

        def per_device(state, *args):
            extra, (images, labels, idx) = args[:num_extra], args[num_extra:]

            def body(st, step_idx):
                batch = device_batch(st.rng, st.step, images, labels, step_idx, mean=mean, std=std, dtype=dtype,
                                     augment=augment)
                return step_fn(st, batch, *extra)

            if idx.shape[0] == 1:
                # No loop for a single step: XLA:CPU runs convolution gradients inside a while loop ~20x slower.
                state, metrics = body(state, idx[0])
                return state, jax.tree.map(lambda m: m[None], metrics)
            return lax.scan(body, state, idx)

        in_specs = (state_spec,) + (P(),) * num_extra + (P(), P(), P(None, AXIS))
        mapped = jax.shard_map(per_device, mesh=self.mesh, in_specs=in_specs, out_specs=(state_spec, P()))
        return jax.jit(mapped, donate_argnums=(0,))

    def make_evaluator(self, apply_fn: Callable, dtype) -> Callable[[dict], dict]:
        """`evaluate(variables) -> {eval/loss, eval/top1, eval/top5}` over the whole test split in one dispatch.

        `apply_fn(variables, images)` returns logits in eval mode.
        """
        mean, std = self._mean, self._std

        def per_device(variables, images, labels, idx, mask):
            def body(_, chunk):
                i, m = chunk
                logits = apply_fn(variables, aug.normalize(images[i], mean, std, dtype))
                return None, eval_sums(logits, labels[i], m)

            _, sums = lax.scan(body, None, (idx, mask))
            return lax.psum(jnp.sum(sums, axis=0), AXIS)

        mapped = jax.jit(jax.shard_map(per_device, mesh=self.mesh,
                                       in_specs=(P(), P(), P(), P(None, AXIS), P(None, AXIS)), out_specs=P()))
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
    batch_size / process_count, which `jax.make_array_from_process_local_data` joins into the global batch.
    """

    def __init__(self, dataset: DataSet, mesh, batch_size: int, eval_batch_size: int, seed: int):
        from wcord_jax.data import imagenet

        self._imagenet = imagenet
        self.dataset, self.mesh, self.seed = dataset, mesh, seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.steps_per_epoch = dataset.num_train // batch_size
        self._sharding = NamedSharding(mesh, P(AXIS))
        self._mean, self._std = jnp.asarray(dataset.mean), jnp.asarray(dataset.std)

    def _global(self, local_batch: dict):
        return {k: jax.make_array_from_process_local_data(self._sharding, v) for k, v in local_batch.items()}

    def dispatches(self, rng: jax.Array, epoch: int, start: int) -> Iterator[tuple[int, tuple]]:
        del rng  # tf.data is seeded by (seed, epoch) and the example index
        ds = self._imagenet.make_dataset(
            "train", train=True, global_batch_size=self.batch_size, seed=self.seed, epoch=epoch,
            data_dir=self.dataset.data_dir, num=self.dataset.num_train, process_index=jax.process_index(),
            process_count=jax.process_count(), skip_batches=start)
        for i, batch in enumerate(self._imagenet.iterate(ds)):
            if start + i >= self.steps_per_epoch:
                break
            yield 1, (self._global(batch),)

    def make_runner(self, step_fn: Callable, dtype, augment: bool = True, num_extra: int = 0, state_spec=P()):
        """As `InMemoryFeed.make_runner`, for `run(state, *extra, batch)` on one host batch."""
        del augment  # done by tf.data
        mean, std = self._mean, self._std

        def per_device(state, *args):
            extra, batch = args[:num_extra], args[num_extra]
            return step_fn(state, dict(batch, image=aug.normalize(batch["image"], mean, std, dtype)), *extra)

        in_specs = (state_spec,) + (P(),) * num_extra + (P(AXIS),)
        mapped = jax.shard_map(per_device, mesh=self.mesh, in_specs=in_specs, out_specs=(state_spec, P()))
        return jax.jit(mapped, donate_argnums=(0,))

    def make_evaluator(self, apply_fn: Callable, dtype) -> Callable[[dict], dict]:
        mean, std = self._mean, self._std

        def per_device(variables, batch):
            logits = apply_fn(variables, aug.normalize(batch["image"], mean, std, dtype))
            return lax.psum(eval_sums(logits, batch["label"], batch["mask"]), AXIS)

        mapped = jax.jit(jax.shard_map(per_device, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P()))
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


def make_feed(dataset: DataSet, mesh, config):
    if dataset.in_memory:
        return InMemoryFeed(dataset, mesh, config.batch_size, config.eval_batch_size, config.steps_per_dispatch)
    return StreamFeed(dataset, mesh, config.batch_size, config.eval_batch_size, config.seed)
