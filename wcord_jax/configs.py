"""The default run configuration (RepDistiller's CIFAR-100 recipe) as an ml_collections.ConfigDict.

The files in `configs/` call these builders; keeping the defaults in the package lets tests build configs without
parsing flags.
"""
from __future__ import annotations

import ml_collections

# RepDistiller lowers the base learning rate for these architectures (train_teacher.py / train_student.py).
LOW_LR_MODELS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")


def dataset_config() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.name = "cifar100"
    # TFDS data directory; for fashion_mnist also a folder of the four idx files. None: TFDS's default
    # (~/tensorflow_datasets), and for fashion_mnist /usr/share/datasets/fashion-mnist when TFDS has no copy.
    d.data_dir = ml_collections.FieldReference(None, field_type=str)
    d.download = True  # let TFDS fetch a missing data set (needs the internet)
    # Size of the synthetic set, or a cap on the examples taken from a real one (None: all).
    d.num_train = ml_collections.FieldReference(None, field_type=int)
    d.num_test = ml_collections.FieldReference(None, field_type=int)
    # Keep only these class ids, relabelled 0..n-1 in this order (None: all), e.g. --config.dataset.classes=0,1,2,3,4.
    d.classes = ml_collections.FieldReference(None, field_type=tuple)
    # Shape of the synthetic source only.
    d.image_size = 32
    d.num_channels = 3
    d.num_classes = 10
    return d


def teacher_config(model: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.task = "teacher"
    c.model = model
    c.dataset = dataset_config()
    c.num_epochs = 240
    c.batch_size = 64
    c.eval_batch_size = 256
    c.seed = 0
    c.log_every_steps = 100
    c.learning_rate = 0.01 if model in LOW_LR_MODELS else 0.05
    # The learning rate is multiplied by lr_decay_rate after each of lr_decay_epochs, which are epochs of a
    # lr_schedule_epochs-long run (RepDistiller: 150, 180, 210 of 240). A run of another length moves them in
    # proportion (num_epochs=24 decays after epochs 15, 18, 21); lr_schedule_epochs=0 makes them absolute.
    c.lr_decay_epochs = (150, 180, 210)
    c.lr_schedule_epochs = 240
    c.lr_decay_rate = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    # Activation dtype: float32, bfloat16 (parameters stay float32) or auto (wcord_jax.backend: float32 on the CPU,
    # bfloat16 on a GPU or TPU).
    c.dtype = "auto"
    # Train steps per host call (a lax.scan) for in-memory data sets; 0: the backend's default (wcord_jax.backend:
    # 1 on the CPU, 8 on a GPU or TPU).
    c.steps_per_dispatch = 0
    c.stream_prefetch = 2  # streamed data sets: batches copied to the devices ahead of their step
    c.checkpoint_every_steps = 0  # extra checkpoints inside an epoch (0: only at epoch ends)
    # ... and one whenever this many minutes have passed since the last checkpoint (0: none), so that a crash inside
    # a long epoch loses at most that much training; the rerun resumes from it.
    c.checkpoint_every_minutes = 10.0
    c.keep_checkpoints = 3
    # A step whose loss, a logged term or new weights are not finite: stop (end the run, nothing saved from that
    # state) or skip (drop its update; nonfinite_skip_limit such steps in a row end the run).
    c.nonfinite = "stop"
    c.nonfinite_skip_limit = 10
    c.num_devices = 0  # use the first N devices of the data mesh (0: all)
    # BatchNorm statistics of the trained network across devices: global (all-reduced in every layer; D devices give
    # the one-device step) or local (each device's own, flax's ImageNet example; running averages averaged after
    # every step). wcord_jax.core.BN_SYNC.
    c.bn_sync = "global"
    # XLA:CPU at start-up (wcord_jax.host): the host CPU split into this many devices (0: one per usable core that
    # divides the batch sizes; 1: one device), and its oneDNN kernels (auto: on where the CPU is an Intel one).
    c.cpu_devices = 0
    c.cpu_onednn = "auto"
    # JAX's persistent compilation cache (wcord_jax.compile_cache): auto (JAX_COMPILATION_CACHE_DIR, else
    # ~/.cache/wcord_jax/jax), a directory or gs:// URI, or none (off). A resumed run starts without recompiling.
    c.compilation_cache = "auto"
    c.progress_bar = True  # a tqdm bar per epoch when stderr is a terminal
    # What the trained network sees of each example (wcord_jax.views): identity, gray, lab_l, lab_ab,
    # downsample:K, mask:FRACTION, edges, noise:STD or feature:NAME; applied on the device after augmentation.
    c.view = "identity"
    return c


def distill_config(method: str, teacher: str, student: str) -> ml_collections.ConfigDict:
    """A student distilled from a frozen teacher with `method`, on the teacher's recipe (RepDistiller).

    The loss weights gamma (cross-entropy), alpha (KD) and beta (the method's own term) are the method's defaults
    (`Distiller.weights`, RepDistiller's); the config holds the method's own settings section (`crd`, `wcord`,
    `fitnet`, ...) and the ones it shares (WCoRD's memory bank reads `crd.*`), no other method's."""
    from wcord_jax import distillers

    distiller = distillers.get(method)  # ValueError naming the valid methods
    c = teacher_config(student)
    c.task = "distill"
    c.method = method
    c.teacher = ml_collections.ConfigDict()
    c.teacher.model = teacher
    # A teacher run's workdir, or several comma-separated (an ensemble: --config.teacher.checkpoint=a,b,c).
    c.teacher.checkpoint = ml_collections.FieldReference(None, field_type=str)
    # What the teacher sees (a view, as `view` for the student); None: the view it was trained on (its checkpoint).
    c.teacher.view = ml_collections.FieldReference(None, field_type=str)
    c.gamma, c.alpha, c.beta = distiller.weights
    c.kd_temperature = 4.0
    # The init stage of a distiller that has one (RepDistiller's AB / FT / FSP, --init_epochs 30): these epochs run
    # before num_epochs, at a constant init_learning_rate (None: the distiller's default, the run's learning_rate
    # unless it says otherwise: FT with a resnet / wrn student uses 0.01, as RepDistiller).
    c.init_epochs = 30 if distiller.init_parts else 0
    c.init_learning_rate = ml_collections.FieldReference(None, field_type=float)
    c.heads_lr_scale = 1.0  # learning rate of the embedding heads / the student's (SGD: scales their updates)
    for section, defaults in distillers.sections_of(method).items():
        c[section] = defaults
    return c
