"""The service: every model served (crossrank.core.served), the names a request may call each by,
and their common life: start, readiness, drain.

The catalog is read when the service is made, before anything starts, and a bad one stops the
server with a message naming the culprit: a model directory that does not load, two models
under one name or alias, more than one default, a models file that does not parse. Nothing is
served from a subset.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from crossrank.core.errors import ErrorType, ServiceError
from crossrank.core.served import CatalogEntry, ServedModel
from crossrank.model.engine import OnnxEngine
from crossrank.model.model_dir import ModelDirError, load_model_dir
from crossrank.model.variant_choice import EngineFactory
from crossrank.ops.metrics import Metrics
from crossrank.ops.settings import Settings


class ModelConfigError(ValueError):
    """The models to serve are misconfigured: the message names the culprit."""


def catalog(settings: Settings) -> list[CatalogEntry]:
    """The models to serve, each loaded (its directory read and checked) and named."""
    try:
        specs = settings.model_specs()
    except ValueError as exc:
        raise ModelConfigError(str(exc)) from None
    if not specs:
        raise ModelConfigError(
            "no model to serve: pass --model DIR (or NAME=DIR), set CROSSRANK_MODEL, or give "
            "models_file. A model directory is what `crossrank export` writes (an ONNX "
            "cross-encoder, tokenizer.json, crossrank.json); see README.md, 'Models'."
        )
    entries = []
    for spec in specs:
        try:
            model = load_model_dir(spec.path)
        except ModelDirError as exc:
            raise ModelConfigError(f"model {spec.name or spec.path}: {exc}") from None
        name = spec.name or model.metadata.name
        own = settings.for_model(spec)
        if own.max_passages > own.max_queued_pairs:
            raise ModelConfigError(
                f"model {name}: max_passages ({own.max_passages}) exceeds its max_queued_pairs "
                f"({own.max_queued_pairs}): such a request could never be admitted"
            )
        entries.append(CatalogEntry(name, tuple(spec.aliases), spec.default, model, own))
    _check_names(entries)
    return entries


def _check_names(entries: list[CatalogEntry]) -> None:
    owner: dict[str, str] = {}
    for entry in entries:
        for name in (entry.name, *entry.aliases):
            if name in owner:
                raise ModelConfigError(
                    f"the name {name!r} is given to two models ({owner[name]} and "
                    f"{entry.name}): give each a name of its own"
                )
            owner[name] = entry.name
    defaults = [e.name for e in entries if e.default]
    if len(defaults) > 1:
        raise ModelConfigError(f"more than one default model: {', '.join(defaults)}")


class Service:
    def __init__(
        self, settings: Settings, metrics: Metrics, engine_factory: EngineFactory = OnnxEngine
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        entries = catalog(settings)
        metrics.unattributed()
        # All engines at once, or one at a time (docs/models-served.md measures both).
        turns = asyncio.Lock() if settings.engine_sharing == "turns" else None
        self.models = [
            ServedModel(entry, metrics.for_model(entry.name), engine_factory, turns)
            for entry in entries
        ]
        self._by_name = {
            name: model
            for entry, model in zip(entries, self.models, strict=True)
            for name in (entry.name, *entry.aliases)
        }
        marked = [m for e, m in zip(entries, self.models, strict=True) if e.default]
        self.default = marked[0] if marked else self.models[0]
        # Set by the first SIGTERM: when admitted requests stop being waited for. Whether the
        # service drains is the models' admissions' state, which refuses the new requests.
        self._drain_deadline: float | None = None

    @property
    def draining(self) -> bool:
        return any(model.admission.draining for model in self.models)

    def resolve(self, name: str | None) -> ServedModel:
        """The model a request names. With one model served, every name is it (clients that
        insist on a vendor's model name keep working); with several, no name is the default
        and an unknown name is a 404 listing the names."""
        if len(self.models) == 1 or name is None:
            return self.default
        model = self._by_name.get(name)
        if model is None:
            served = ", ".join(sorted(self._by_name))
            raise ServiceError(
                ErrorType.MODEL_NOT_FOUND,
                f"no model {name!r} is served here; the names served: {served}",
                field="model",
            )
        return model

    def admission_refusal(self) -> ServiceError | None:
        """Why a request not yet read would be refused whatever model it names: draining, or
        no model with room left."""
        refusals = [m.admission.refusal() for m in self.models]
        if all(refusals):
            return refusals[0]
        return None

    async def start(self) -> None:
        """Build every model's parts (errors here stop the server), then warm them up in the
        background: after all are built, so that no warm-up skews another model's start-up
        timing of its variants."""
        for model in self.models:
            await model.start()
        for model in self.models:
            model.warm()

    def begin_drain(self) -> float:
        """SIGTERM: refuse new requests from now on; admitted ones are still answered, within
        ``drain_grace_s`` of the first call: that deadline (monotonic) is returned."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.settings.drain_grace_s
        for model in self.models:
            model.admission.drain()
        return self._drain_deadline

    async def stop(self) -> None:
        deadline = self.begin_drain()
        await asyncio.gather(*(m.stop(deadline) for m in self.models))

    def readiness(self) -> str | None:
        """Why the service is not ready (naming any model that is not), or None when it is."""
        if self.draining:
            return "shutting down"
        reasons = [(m.name, m.readiness()) for m in self.models]
        waiting = [f"{name}: {reason}" for name, reason in reasons if reason is not None]
        if not waiting:
            return None
        return waiting[0].split(": ", 1)[1] if len(self.models) == 1 else "; ".join(waiting)

    def liveness(self) -> str | None:
        """Why the process should be restarted, or None while it is fine."""
        for model in self.models:
            reason = model.liveness()
            if reason is not None:
                return reason if len(self.models) == 1 else f"{model.name}: {reason}"
        return None

    def describe(self) -> dict[str, Any]:
        """The default model's description, and every model's (GET /info)."""
        return {**self.default.describe(), "models": [m.describe() for m in self.models]}

    def listing(self) -> dict[str, Any]:
        """The models as OpenAI's, vLLM's and Infinity's /v1/models list them."""
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "crossrank"}
            for model in self.models
            for name in (model.name, *model.aliases)
        ]
        return {"object": "list", "data": data}
