"""Distilling an ensemble of teachers with one set of modules and state per teacher (`PerTeacher`).

A distiller whose `ensemble` is 'per_teacher' (CRD, WCoRD) distils M teachers by running its own term once per
teacher, each with its own modules (a head pair per teacher: `embed_s_t0`, `embed_t_t0`, `embed_s_t1`, ...), its
own state (memories, queues, momentum key heads, spectral vectors: the ensemble's state is a tuple of the inner
distiller's states, one per teacher, each sharded as for one teacher); the term is the mean of the per-teacher
terms. `PerTeacher` presents that to the engine as one distiller, so the engine's state, optimizer and step code is
the same for one teacher and for M.
"""
from __future__ import annotations

import dataclasses

import jax

from wcord_jax.distillers.base import Distiller, StepInputs, Term


def member_name(name: str, i: int) -> str:
    """The name of teacher i's copy of module `name`."""
    return f"{name}_t{i}"


class PerTeacher(Distiller):
    """`inner` applied to each of `num_teachers` teachers with its own modules and state; the mean of the terms."""

    def __init__(self, inner: Distiller, num_teachers: int):
        super().__init__(inner.name)
        self.inner, self.num_teachers = inner, num_teachers
        for key in ("description", "weights", "config_section", "shared_sections", "preact", "ensemble",
                    "uses_teacher_logits"):
            setattr(self, key, getattr(inner, key))
        self.frozen_in_main = tuple(member_name(n, i) for n in inner.frozen_in_main for i in range(num_teachers))
        self._base_names: tuple = ()

    def defaults(self):
        return self.inner.defaults()

    def validate(self, config, num_devices):
        self.inner.validate(config, num_devices)

    def modules(self, config, s_shapes, t_shapes):
        """`t_shapes` is the list of the teachers' feature shapes."""
        out = {}
        for i, shapes in enumerate(t_shapes):
            own = self.inner.modules(config, s_shapes, shapes)
            self._base_names = tuple(own)
            out.update({member_name(n, i): m for n, m in own.items()})
        return out

    def method_state(self, config, key, n_data, variables):
        return tuple(self.inner.method_state(config, jax.random.fold_in(key, i), n_data, self._own(variables, i))
                     for i in range(self.num_teachers))

    def method_state_spec(self, config, axis_name):
        return tuple(self.inner.method_state_spec(config, axis_name) for _ in range(self.num_teachers))

    def after_update(self, config, method_state, params):
        return tuple(self.inner.after_update(config, own, {"student": params["student"], **self._own(params, i)})
                     for i, own in enumerate(method_state))

    def needs_all_labels(self, config):
        return self.inner.needs_all_labels(config)

    def check_data(self, config, class_index):
        self.inner.check_data(config, class_index)

    def _own(self, tree: dict, i: int) -> dict:
        """Teacher i's entries of a {module name: ...} dict, under the inner distiller's names."""
        return {n: tree[member_name(n, i)] for n in self._base_names if member_name(n, i) in tree}

    def term(self, inputs: StepInputs) -> Term:
        values, logged, metrics, states = [], [], {}, []
        for i, (t_logits, t_feats) in enumerate(inputs.teachers):
            params = {"student": inputs.params["student"], **self._own(inputs.params, i)}
            own_state = inputs.method_state[i]
            out = self.inner.term(dataclasses.replace(
                inputs, params=params, method_state=own_state, modules=self._own(inputs.modules, i),
                t_logits=t_logits, t_feats=t_feats, key=jax.random.fold_in(inputs.key, i), teachers=()))
            values.append(out.value)
            logged.append(out.logged)
            for k, v in out.metrics.items():
                metrics[f"{k}_t{i}"] = v
            states.append(own_state if out.state is None else out.state)
        m = len(values)
        logged_mean = {k: sum(d[k] for d in logged) / m for k in logged[0]}
        for k in {k.rsplit("_t", 1)[0] for k in metrics}:  # the mean over teachers under the usual name, too
            metrics[k] = sum(metrics[f"{k}_t{i}"] for i in range(m)) / m
        return Term(sum(values) / m, logged_mean, metrics, tuple(states))
