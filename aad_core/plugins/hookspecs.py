"""Every hook a plugin can implement: the contract between aad and its plugins.

docs/hooks.md describes dispatch order, wrappers and the guards. Plugins are modules (or objects)
exposed under the ``aad`` entry-point group::

    [project.entry-points.aad]
    my_scorer = "my_package.my_module"

and implement hooks with the :data:`aad_core.hookimpl` marker::

    from aad_core.plugins import hookimpl

    @hookimpl
    def aad_register_scorers(register):
        register("length", LengthScorer, description="Longer answers first")

The hooks come in two lifecycle groups:

1. **Registration** (called once per plugin, when the plugin manager starts or the plugin is added):
   ``aad_register_<kind>`` hooks receive a ``register(name, factory, **capabilities)`` callable.
   ``factory`` is a class or a callable that returns the component when called with its configured
   parameters; it is only called when the component is used (lazy: no model is loaded at
   registration). ``capabilities`` are free-form facts shown by ``aad plugins`` (``description=`` is
   conventional). The component's main method is guarded: raising, or returning the wrong shape,
   gives a :class:`aad_core.errors.PluginError` that names the plugin, its distribution and this hook.
2. **Observers** (called while aad works): ``aad_trace_captured``, ``aad_specialist_trained``,
   ``aad_request_routed``. pluggy dispatches them, so ``tryfirst``, ``trylast``, ``wrapper=True`` and
   ``hookwrapper=True`` behave as pluggy documents. They must return quickly; an observer that raises
   is logged with its plugin's name and the other observers still run.

All signatures are batch-shaped where data flows (lists of traces, not one trace).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from aad_core.schema import RoutingDecision, Specialist, Trace

PROJECT_NAME = "aad"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)

#: Marker for plugin hook implementations: ``@hookimpl def aad_register_scorers(register): ...``
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class Register(Protocol):
    """The callable passed to every ``aad_register_*`` hook."""

    def __call__(self, name: str, factory: Any, /, **capabilities: Any) -> None: ...


# --------------------------------------------------------------------------------------------
# 1. Registration: components by kind
# --------------------------------------------------------------------------------------------


@hookspec
def aad_register_redactors(register: Register) -> None:
    """Register PII redactors (S2), kind ``"redactor"``.

    A redactor is a :class:`aad_core.plugins.components.Redactor`: ``redact(traces) -> traces`` returns
    copies with personal data replaced by placeholders, consistently within a trace.
    Called once at plugin-manager start-up. Returns nothing.
    """


@hookspec
def aad_register_embedders(register: Register) -> None:
    """Register text embedders (S3), kind ``"embedder"``.

    An embedder is a :class:`aad_core.plugins.components.Embedder`: ``embed(texts) -> ndarray`` of shape
    ``(len(texts), dim)``, L2-normalised rows.
    Called once at plugin-manager start-up. Returns nothing.
    """


@hookspec
def aad_register_clusterers(register: Register) -> None:
    """Register clusterers (S3), kind ``"clusterer"``.

    A clusterer is a :class:`aad_core.plugins.components.Clusterer`: ``fit(embeddings)`` sets
    ``labels_`` and ``centroids_``.
    Called once at plugin-manager start-up. Returns nothing.
    """


@hookspec
def aad_register_scorers(register: Register) -> None:
    """Register divergence scorers (S5), kind ``"scorer"``.

    A scorer is a :class:`aad_core.plugins.components.Scorer`: ``score(samples) -> list[dict]``, one dict
    per sample with at least ``"score"`` (higher = more worth training on) and its components.
    Called once at plugin-manager start-up. Returns nothing.
    """


@hookspec
def aad_register_selectors(register: Register) -> None:
    """Register data selectors (S5), kind ``"selector"``.

    A selector is a :class:`aad_core.plugins.components.Selector`: ``select(ids, scores, fraction, ...)``
    returns the ids to train on for one cluster.
    Called once at plugin-manager start-up. Returns nothing.
    """


@hookspec
def aad_register_trainers(register: Register) -> None:
    """Register specialist trainers (S5), kind ``"trainer"``: each one is a specialist kind.

    A trainer is a :class:`aad_core.plugins.components.Trainer`: ``train(train, eval, output_dir)``
    fits one specialist and returns its metrics. Its ``kind`` names what it trains (``"lora"``, the
    default: a PEFT adapter served on the shared base student; ``"classifier"``; ...),
    ``applies_to(train) -> (bool, why)`` says whether the kind fits a task (default: always), and
    ``load_predictor(specialist_dir)`` returns the :class:`aad_core.plugins.components.Predictor` that
    serves what it trained (required for every kind but ``"lora"``). ``[train] trainer`` lists the
    trainers tried per task, in order; the first whose kind fits is trained.
    Called once at plugin-manager start-up. Returns nothing.
    """


@hookspec
def aad_register_evaluators(register: Register) -> None:
    """Register task evaluators (eval), kind ``"evaluator"``.

    An evaluator is a :class:`aad_core.plugins.components.Evaluator`: ``evaluate(predictions,
    references) -> dict`` with a ``"score"`` in [0, 1] and any other metrics.
    Called once at plugin-manager start-up. Returns nothing.
    """


@hookspec
def aad_register_routers(register: Register) -> None:
    """Register routers (S6), kind ``"router"``.

    A router is a :class:`aad_core.plugins.components.Router`: ``route(requests) -> list[RoutingDecision]``.
    Called once at plugin-manager start-up. Returns nothing.
    """


# --------------------------------------------------------------------------------------------
# 2. Observers
# --------------------------------------------------------------------------------------------


@hookspec
def aad_trace_captured(traces: list[Trace]) -> None:
    """Called after ``traces`` were written to the trace store (after redaction).

    Called from the capture writer's background thread, once per written batch. Returns nothing.
    """


@hookspec
def aad_specialist_trained(specialist: Specialist) -> None:
    """Called after a specialist adapter and its manifest were saved. Returns nothing."""


@hookspec
def aad_request_routed(decisions: list[RoutingDecision]) -> None:
    """Called after the router decided where ``decisions``' requests go. Returns nothing."""
