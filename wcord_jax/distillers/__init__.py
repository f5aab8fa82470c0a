"""The distillers: one file per method family, each registering its method names here.

    from wcord_jax import distillers
    distillers.get("crd")         # the CRD distiller (a `Distiller`)
    distillers.names()            # every method name, e.g. for --config distill.py:METHOD,...

Every module of this package whose name does not start with an underscore (and is not `base`) is imported on first
use, and registers its distillers with `register(name, distiller)`: adding a method is adding one file here (see
docs/adding-a-distiller.md). Combinations are declared, not special-cased: `crdkd` is the CRD distiller registered
with KD's weight switched on.
"""
from __future__ import annotations

import importlib
import pkgutil

from wcord_jax.distillers.base import Distiller, StepInputs, Term, zero_term

_REGISTRY: dict[str, Distiller] = {}
_LOADED = False
# The order `names()` lists the library's methods in (the contrastive ones, then RepDistiller's baselines in its
# paper's order, then DKD); any other module of the package (a user's method) is loaded after these, by name.
_ORDER = ("crd", "wcord", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "dkd")


def register(name: str, distiller: Distiller) -> Distiller:
    """Registers `distiller` under the method name `name` (which it takes as its `name`); returns it."""
    if not name or not name.replace("_", "").isalnum():
        raise ValueError(f"a method name is letters, digits and underscores, got {name!r}")
    if name in _REGISTRY and type(_REGISTRY[name]) is not type(distiller):
        raise ValueError(f"method {name!r} is already registered by {type(_REGISTRY[name]).__name__}")
    distiller.name = name
    _REGISTRY[name] = distiller
    return distiller


def _load() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    found = sorted(i.name for i in pkgutil.iter_modules(__path__) if not i.name.startswith("_") and i.name != "base")
    for module in sorted(found, key=lambda m: (_ORDER.index(m) if m in _ORDER else len(_ORDER), m)):
        importlib.import_module(f"{__name__}.{module}")


def names() -> tuple[str, ...]:
    """Every registered method name: none, kd, crd, crdkd, wcord, wcordkd, the baselines, then any others."""
    _load()
    return tuple(_REGISTRY)


def get(name: str) -> Distiller:
    """The distiller of method `name`; ValueError naming the valid methods otherwise."""
    _load()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def sections() -> dict:
    """{config section: its defaults} over all registered distillers, in registration order."""
    _load()
    out = {}
    for d in _REGISTRY.values():
        if d.config_section and d.config_section not in out:
            out[d.config_section] = d.defaults()
    return out


def sections_of(name: str) -> dict:
    """{config section: its defaults} of the sections method `name` reads: its own and those it shares
    (`Distiller.shared_sections`: WCoRD's memory bank reads `crd.*`)."""
    distiller = get(name)
    wanted = ((distiller.config_section,) if distiller.config_section else ()) + tuple(distiller.shared_sections)
    every = sections()
    return {s: every[s] for s in wanted}


# `none` (no term of its own: the student trained alone, with the engine's cross-entropy) and `kd` (Hinton's KD,
# which the engine computes for every method and weights by alpha) need nothing beyond the base class.
register("none", Distiller(description="the student trained alone (cross-entropy)", weights=(1.0, 0.0, 0.0),
                           ensemble="logits", uses_teacher=False))
register("kd", Distiller(description="Hinton et al.'s KD: KL divergence of temperature-softened logits",
                         weights=(0.1, 0.9, 0.0), ensemble="logits"))

__all__ = ["Distiller", "StepInputs", "Term", "get", "names", "register", "sections", "zero_term"]
