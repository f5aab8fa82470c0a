"""What every layer of wcord_jax shares, and nothing more: the error for a configuration that cannot work, the name
of the mesh axis the data is split over, and the streams of the run's PRNG key. It imports nothing (not even JAX), so
that any module, a distiller included, can use it without pulling in the run loop.
"""

AXIS = "data"  # the mesh axis a batch (and a sharded negative queue) is split over


# How a trained network's BatchNorm gets its statistics across the devices (config key `bn_sync`): 'global' (every
# layer all-reduces them: D devices compute exactly the one-device step) or 'local' (each device normalises with its
# shard's statistics, as flax's ImageNet example; the running averages are averaged over the devices after every
# step, one all-reduce, so evaluation and checkpoints see the same synced statistics on every device).
BN_SYNC = ("global", "local")


def bn_axis(config):
    """The BatchNorm axis of the trained network: AXIS for bn_sync='global', None (per device) for 'local'."""
    return AXIS if config.get("bn_sync", "global") == "global" else None


class ConfigError(ValueError):
    """The configuration asks for something that does not exist or cannot work; the message names the choices."""


# The streams of the run's key: every random draw of a run is folded from `PRNGKey(seed)` with one of these ids.
INIT_STREAM = 0  # the trained network's parameters
ORDER_STREAM = 1  # the order of the training examples
AUGMENT_STREAM = 2  # crops, flips and random views
METHOD_STREAM = 3  # a distiller's own draws (CRD's negatives)
HEADS_STREAM = 4  # a distiller's heads and modules
STATE_STREAM = 5  # a distiller's state (queues, memories)
