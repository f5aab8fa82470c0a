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
    c.lr_decay_epochs = (150, 180, 210)
    c.lr_decay_rate = 0.1
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.dtype = "float32"  # activation dtype: float32 or bfloat16 (parameters stay float32)
    c.steps_per_dispatch = 1  # train steps run per host call (lax.scan) for in-memory data sets
    c.checkpoint_every_steps = 0  # extra checkpoints inside an epoch (0: only at epoch ends)
    c.keep_checkpoints = 3
    c.num_devices = 0  # use the first N devices of the data mesh (0: all)
    c.progress_bar = True  # a tqdm bar per epoch when stderr is a terminal
    return c
