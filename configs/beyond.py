"""Beyond compression on Fashion-MNIST: python -m wcord_jax.tools.beyond --config configs/beyond.py[:PRESET].

Privileged information (student on downsample:4 / mask:0.5), cross-modal transfer (teacher on edges), ensembles of
1, 2 and 4 resnet8 teachers and a teacher of classes 0-4, each with the student alone, KD, CRD and WCoRD over 3
seeds, on the study's protocol (configs/study.py). PRESET is main (default) or quick (a smoke run on synthetic data).

  python -m wcord_jax.tools.beyond --config configs/beyond.py --workdir runs/study
"""
from wcord_jax.tools.beyond import beyond_config


def get_config(preset: str = "main"):
    return beyond_config(preset or "main")
