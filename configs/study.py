"""The Fashion-MNIST distillation study: python -m wcord_jax.tools.study --config configs/study.py[:PRESET].

A scaled-down copy of the CIFAR-100 protocol for 2 CPU cores: a resnet32 teacher trained on all 60,000 training
images, resnet8 students distilled for 30 epochs on a 2,000-image subset over 3 seeds. PRESET (default main) is
main (none, kd, crd, crdkd, wcord, wcordkd), ablation (the WCoRD variants), baselines (RepDistiller's baselines and
DKD), accelerator (none, kd, crd, wcord on all 60,000 images for 8 epochs, seed 0: benchmarks/accelerator.sh) or
quick (a smoke run); `--config.preset=PRESET` does the same as the colon form. The step decays keep the
recipe's shape (62.5%, 75%, 87.5% of training).
"""
from wcord_jax.tools.study import study_config


def get_config(preset: str = "main"):
    return study_config(preset or "main")
