"""A student distilled from a trained teacher: configs/distill.py:METHOD,TEACHER,STUDENT.

METHOD is one of none, kd, crd, crdkd, wcord, wcordkd; TEACHER and STUDENT are model names. Example:

  python -m wcord_jax.main --config configs/distill.py:wcord,resnet32x4,resnet8x4 --workdir runs/s \\
      --config.teacher.checkpoint=runs/resnet32x4
"""
from wcord_jax import configs as base


def get_config(arg: str = "crd,resnet32x4,resnet8x4"):
    parts = [p.strip() for p in (arg or "crd,resnet32x4,resnet8x4").split(",")]
    if len(parts) != 3:
        raise ValueError(f"expected METHOD,TEACHER,STUDENT after the colon, got {arg!r}")
    return base.distill_config(*parts)
