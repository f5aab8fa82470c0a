"""What a distiller declares to the engine: the `Distiller` base class, `StepInputs` and `Term`.

A distiller is one object in one file (`wcord_jax/distillers/<method>.py`) registered under one or more method names
(`wcord_jax.distillers.register`). The engine (`wcord_jax.distill`) asks it for everything that depends on the
method and for nothing else:

* `weights`: (gamma, alpha, beta), RepDistiller's defaults of the run's total loss
  gamma * CE + alpha * KD + beta * term (KD is Hinton's, computed by the engine for every method);
* `config_section` / `defaults()`: its own config section (`config.<section>.*`); a run's config holds that section
  and the `shared_sections` it reads, no other method's;
* `preact`: whether it taps the networks' pre-activation features;
* `validate(config, num_devices)` and `check_pair(config, s_shapes, t_shapes)` (the second through `modules`):
  its checks, raising `ConfigError` with one line;
* `modules(config, s_shapes, t_shapes)`: its trainable flax modules by name, with example inputs for their
  initialisation, from the student's and teacher's feature shapes;
* `init_state(config, key, n_data)` / `state_spec(config, axis)`: its own memories or queues and their
  PartitionSpecs over the `data` mesh;
* `key_heads(config)` / `key_momentum(config)`: modules of which it keeps momentum (EMA) copies;
* `term(inputs)`: its loss term on one device's shard, a pure function of `StepInputs`, returning a `Term` (with
  its state after the step);
* `init_parts`, `init_term(inputs)`, `init_learning_rate(config)`: its init stage, if any (RepDistiller's AB, FT,
  FSP): what that stage trains and its loss;
* `frozen_in_main`: modules the main stage does not train;
* `needs_all_labels(config)` / `check_data(config, class_index)`: whether it samples negatives from the whole
  training set's labels (an in-memory data set), and its checks against them;
* `ensemble` / `uses_teacher_logits`: how it distils several teachers (`--config.teacher.checkpoint=a,b,c`), and
  whether its term reads the teacher's logits (then a teacher trained on other classes is refused).

Everything has a default, so a method that only adds a loss term defines `name`, `weights` and `term`.

**Its state is its own.** The engine keeps one opaque `method state` per run (`DistillState.method`), made by
`method_state` and read back by the distiller alone (`StepInputs.method_state`); a term returns the state after the
step (`Term.state`), and `after_update` runs after every optimizer step of the main stage. The base class lays it
out as a dict: `own` (what `init_state` makes: memories, queues), `module_stats` and `spectral` (its modules'
BatchNorm statistics and spectral-norm vectors, from their initial variables) and `key_heads` (momentum copies of
the `key_heads` modules, moved towards the trained ones by `after_update`). A method with other needs overrides
these three and the engine does not change.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from wcord_jax.heads import SPECTRAL_COLLECTION


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What a distiller's term sees in one step, on this device's shard of the global batch (inside shard_map).

    Attributes:
      config: the run's config.
      params: the trainable parameters being differentiated: {'student': ..., <module name>: ...}.
      state: the `DistillState` before the step (its `step`, say).
      method_state: the distiller's own state before the step (`Distiller.method_state`).
      modules: the distiller's flax modules by name (`Distiller.modules`, without the example inputs).
      s_logits, s_feats: the student's logits and feature list (compute dtype; differentiable).
      t_logits, t_feats: the frozen teacher's logits and feature list (float32, gradients stopped).
      batch: this device's shard: 'image', 'label', 'index' (positions in the training set).
      class_index: the training set's labels by class (`losses.ClassIndex`), or {} for a streamed data set.
      key: a PRNG key of this step (the same on every device).
      axis_name: the mesh axis of the data-parallel batch.
      steps_per_epoch: steps of one epoch.
      first_main_step: the first step of the main stage (after an init stage).
      teachers: for an ensemble of teachers, each teacher's (logits, feature list); t_logits are then the
        ensemble's (log of the averaged probabilities) and t_feats the first teacher's. () for one teacher.
    """

    config: Any
    params: Any
    state: Any
    modules: dict
    s_logits: jax.Array
    s_feats: list
    t_logits: jax.Array
    t_feats: list
    batch: dict
    class_index: Any
    key: jax.Array
    axis_name: str
    steps_per_epoch: int
    first_main_step: int
    teachers: tuple = ()
    method_state: Any = None


class Term(NamedTuple):
    """A distiller's loss term: `value` (weighted by beta in the total), the named terms to log (`train/<name>`),
    other metrics to log (not in the loss), and the distiller's state after the step (None: unchanged)."""

    value: jax.Array
    logged: dict = {}
    metrics: dict = {}
    state: Any = None


def zero_term() -> Term:
    return Term(jnp.zeros((), jnp.float32))


class Distiller:
    """The base of every distiller; see the module docstring. Subclasses override what their method needs."""

    name: str = ""  # the registered method name; set per instance by the registry
    description: str = ""  # one line, for the README's table and `--help`
    weights: tuple = (1.0, 0.0, 1.0)  # (gamma, alpha, beta)
    config_section: Optional[str] = None  # config.<section>.* holds this distiller's settings
    shared_sections: tuple = ()  # other distillers' sections it reads too (a run's config holds only these)
    preact: bool = False  # tap pre-activation features
    init_parts: tuple = ()  # what the init stage trains ('student_features' and module names); () no init stage
    init_trains_student: bool = True  # the init stage runs the student in training mode (its BatchNorm statistics)
    frozen_in_main: tuple = ()  # modules the main stage does not train
    # How it distils an ensemble of teachers: 'logits' (it reads the teachers' logits only: it gets the ensemble's),
    # 'per_teacher' (its modules and state once per teacher, the mean of the per-teacher terms) or '' (it cannot).
    ensemble: str = ""
    uses_teacher_logits: bool = False  # its term reads the teacher's logits (refused for a teacher of other classes)
    # Its term reads the teacher's outputs at all. False (`none`): with alpha = 0 the step runs no teacher pass and
    # logs no KD term.
    uses_teacher: bool = True

    def __init__(self, name: str = "", **attributes):
        if name:
            self.name = name
        for key, value in attributes.items():
            if not hasattr(type(self), key):
                raise TypeError(f"{type(self).__name__} has no attribute {key!r}")
            setattr(self, key, value)

    def __repr__(self) -> str:
        return f"<distiller {self.name} ({type(self).__name__})>"

    # Configuration ---------------------------------------------------------------------------------------------------

    def defaults(self) -> Optional[ml_collections.ConfigDict]:
        """The default settings of `config.<config_section>` (None: no section)."""
        return None

    def validate(self, config, num_devices: int) -> None:
        """Checks of this distiller's settings that need no network (raise `ConfigError`)."""

    # Modules and state -----------------------------------------------------------------------------------------------

    def modules(self, config, s_shapes, t_shapes) -> dict:
        """{name: (flax module, example inputs of its `init`)} from the feature shapes (NHWC, batch 1). Raise
        `ConfigError` when this method cannot pair the two networks."""
        return {}

    def init_state(self, config, key: jax.Array, n_data: int) -> Any:
        """This distiller's memories or queues (the `own` part of its state); {} if none."""
        return {}

    def state_spec(self, config, axis_name: str) -> Any:
        """PartitionSpecs of `init_state`'s state (a prefix tree): replicated unless overridden."""
        return P()

    def key_heads(self, config) -> tuple:
        """Names of modules whose momentum copies its state keeps (`key_heads`, moved after every optimizer step as
        m * copy + (1 - m) * module, m = `key_momentum(config)`)."""
        return ()

    def key_momentum(self, config) -> float:
        return 0.0

    def method_state(self, config, key: jax.Array, n_data: int, variables: dict) -> Any:
        """The whole state of this distiller at the start of a run; `variables` are its modules' initial variables
        ({name: {'params': ..., 'batch_stats': ..., ...}})."""
        module_stats = {n: v["batch_stats"] for n, v in sorted(variables.items()) if "batch_stats" in v}
        spectral = {n: v[SPECTRAL_COLLECTION] for n, v in sorted(variables.items()) if SPECTRAL_COLLECTION in v}
        key_heads = {n: jax.tree.map(jnp.copy, variables[n].get("params", {})) for n in self.key_heads(config)}
        return {"own": self.init_state(config, key, n_data), "module_stats": module_stats, "spectral": spectral,
                "key_heads": key_heads}

    def method_state_spec(self, config, axis_name: str) -> Any:
        """PartitionSpecs of `method_state` (a prefix tree)."""
        return {"own": self.state_spec(config, axis_name), "module_stats": P(), "spectral": P(), "key_heads": P()}

    def after_update(self, config, method_state: Any, params: dict) -> Any:
        """The state after a main-stage optimizer step has made `params` ({'student': ..., module name: ...}):
        the key heads move towards the trained modules."""
        if not method_state.get("key_heads"):
            return method_state
        m = self.key_momentum(config)
        moved = {k: jax.tree.map(lambda e, p: m * e + (1.0 - m) * p, v, params[k])
                 for k, v in method_state["key_heads"].items()}
        return {**method_state, "key_heads": moved}

    # The data --------------------------------------------------------------------------------------------------------

    def needs_all_labels(self, config) -> bool:
        """Whether the term samples from the labels of the whole training set (an in-memory data set only)."""
        return False

    def check_data(self, config, class_index) -> None:
        """Checks against the training set's class index (in-memory data sets), raising `ConfigError`."""

    # The loss --------------------------------------------------------------------------------------------------------

    def term(self, inputs: StepInputs) -> Term:
        """This method's main-stage term (beta-weighted in the total)."""
        return zero_term()

    def init_term(self, inputs: StepInputs) -> Term:
        """The init stage's loss (the whole loss of that stage); only for distillers with `init_parts`."""
        raise NotImplementedError(f"{self.name} has no init stage")

    def init_learning_rate(self, config) -> float:
        """The init stage's (constant) learning rate: `init_learning_rate` if set, else the run's."""
        if config.get("init_learning_rate") is not None:
            return float(config.init_learning_rate)
        return float(config.learning_rate)


def apply_with_batch_stats(module, params, stats, *args, train: bool):
    """Applies a module with BatchNorm (its `train` argument last); returns (output, new statistics)."""
    variables = {"params": params, "batch_stats": stats}
    if train:
        out, new = module.apply(variables, *args, True, mutable=["batch_stats"])
        return out, new.get("batch_stats", stats)
    return module.apply(variables, *args, False), stats


def f32(features) -> list:
    """A feature list in float32."""
    return [f.astype(jnp.float32) for f in features]
