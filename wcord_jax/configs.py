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
    c.dtype = "float32"  # activation dtype: float32 or bfloat16 (parameters stay float32)
    c.steps_per_dispatch = 1  # train steps run per host call (lax.scan) for in-memory data sets
    c.checkpoint_every_steps = 0  # extra checkpoints inside an epoch (0: only at epoch ends)
    c.keep_checkpoints = 3
    c.num_devices = 0  # use the first N devices of the data mesh (0: all)
    c.progress_bar = True  # a tqdm bar per epoch when stderr is a terminal
    return c


# Loss weights (gamma for cross-entropy, alpha for KD, beta for the method's own term), RepDistiller's defaults.
METHOD_WEIGHTS = {
    "none": (1.0, 0.0, 0.0),
    "kd": (0.1, 0.9, 0.0),
    "crd": (1.0, 0.0, 0.8),
    "crdkd": (1.0, 1.0, 0.8),
    "wcord": (1.0, 0.0, 0.8),
    "wcordkd": (1.0, 1.0, 0.8),
    # RepDistiller's baselines (scripts/run_cifar_distill.sh) and DKD (mdistiller).
    "fitnet": (1.0, 0.0, 100.0),
    "at": (1.0, 0.0, 1000.0),
    "sp": (1.0, 0.0, 3000.0),
    "cc": (1.0, 0.0, 0.02),
    "vid": (1.0, 0.0, 1.0),
    "rkd": (1.0, 0.0, 1.0),
    "pkt": (1.0, 0.0, 30000.0),
    "ab": (1.0, 0.0, 1.0),
    "ft": (1.0, 0.0, 200.0),
    "fsp": (1.0, 0.0, 50.0),
    "nst": (1.0, 0.0, 50.0),
    "dkd": (1.0, 0.0, 1.0),
}
# Methods with RepDistiller's 30-epoch init stage before the main stage.
STAGED_METHODS = ("ab", "ft", "fsp")


def distill_config(method: str, teacher: str, student: str) -> ml_collections.ConfigDict:
    """A student distilled from a frozen teacher with `method`, on the teacher's recipe (RepDistiller)."""
    if method not in METHOD_WEIGHTS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHOD_WEIGHTS)}")
    c = teacher_config(student)
    c.task = "distill"
    c.method = method
    c.teacher = ml_collections.ConfigDict()
    c.teacher.model = teacher
    c.teacher.checkpoint = ml_collections.FieldReference(None, field_type=str)  # a teacher run's workdir
    c.gamma, c.alpha, c.beta = METHOD_WEIGHTS[method]
    c.kd_temperature = 4.0
    # Init stage of AB / FT / FSP (RepDistiller --init_epochs 30): these epochs run before num_epochs, at a constant
    # init_learning_rate (None: learning_rate; FT with a resnet / wrn student: 0.01, as RepDistiller).
    c.init_epochs = 30 if method in STAGED_METHODS else 0
    c.init_learning_rate = ml_collections.FieldReference(None, field_type=float)
    c.fitnet = ml_collections.ConfigDict()
    c.fitnet.hint_layer = 2  # the feature whose map the regressor matches (RepDistiller --hint_layer)
    c.rkd = ml_collections.ConfigDict()
    c.rkd.distance_weight = 25.0
    c.rkd.angle_weight = 50.0
    c.dkd = ml_collections.ConfigDict()
    c.dkd.alpha = 1.0  # weight of the target-class term (TCKD)
    c.dkd.beta = 8.0  # weight of the non-target term (NCKD)
    c.dkd.temperature = 4.0
    c.dkd.warmup_epochs = 20.0  # linear warm-up of the DKD term, in main-stage epochs (absolute, as mdistiller)
    c.heads_lr_scale = 1.0  # learning rate of the embedding heads / the student's (SGD: scales their updates)

    c.crd = ml_collections.ConfigDict()
    c.crd.feat_dim = 128  # embedding size of both heads
    c.crd.nce_k = 16384  # negatives per anchor
    c.crd.nce_t = 0.07  # temperature
    c.crd.nce_m = 0.5  # memory momentum
    c.crd.sample_with_replacement = False  # RepDistiller draws negatives without replacement (slower)

    c.wcord = ml_collections.ConfigDict()
    c.wcord.feat_dim = 128
    c.wcord.tau = 0.07  # critic temperature: f(t, s) = <g_t(t), g_s(s)> / tau
    c.wcord.num_negatives = 16384  # queue length K (split over the devices)
    # Where the global term's negatives come from: queue (a FIFO of past keys, K = num_negatives) | batch (the other
    # examples of the global batch, CLIP's symmetric InfoNCE) | memory (CRD's memory bank with crd.* settings; the
    # positive is the bank row too, as in CRD).
    c.wcord.negatives = "queue"
    # Keys (the positive of each anchor and what is written to the queue / memory): ema (momentum copies of both
    # heads, as MoCo) | trained (the trained heads themselves: the first design, kept as an ablation; it collapses).
    c.wcord.key_heads = "ema"
    c.wcord.key_momentum = 0.999  # key head <- m * key head + (1 - m) * trained head, after every step
    c.wcord.directions = "both"  # both (student and teacher anchors) | student (student anchors only)
    # Teacher anchors score only the newest fraction of the student queue (its keys come from the live student
    # backbone, so old rows are stale); 1.0: all K rows.
    c.wcord.student_queue_fraction = 0.125
    c.wcord.queue_init = "empty"  # empty (only written rows are negatives) | random (MoCo: random unit vectors)
    c.wcord.lipschitz = "spectral"  # spectral | gradient_penalty | none
    c.wcord.power_iterations = 1  # spectral-norm power-iteration steps per train step
    c.wcord.gp_weight = 1.0  # weight of the gradient penalty (lipschitz=gradient_penalty)
    c.wcord.lambda_global = 1.0  # method term = lambda_global * global + lambda_local * local
    c.wcord.lambda_local = 1.0
    c.wcord.epsilon = 0.05  # entropic regularisation of the local OT (absolute)
    c.wcord.sinkhorn_iterations = 100
    c.wcord.sinkhorn_threshold = 1e-3
    c.wcord.local_gradient = "implicit"  # implicit | unrolled | stop_plan
    c.wcord.local_scope = "global"  # global (OT over the all-gathered batch) | device (per-device batch)
    return c
