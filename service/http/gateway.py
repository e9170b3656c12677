"""What every generation route shares (`/generate`, its stream, `/v1/images/generations`): the
model's facts, a request's class and parameters, running its job, and the answer to a failure.
Each route only translates its own request and response shapes."""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from engine.labels import ClassNameError, ClassNames
from engine.model.config import SamplingParams
from engine.pipeline import MODELS
from service.core.client import EngineRequest
from service.core.jobs import EngineError, JobCancelled, JobResult, QueueFull, TenantBusy
from service.http.auth import request_tenant
from service.http.guards import invalid
from service.http.schemas import GenerateRequest
from service.metrics import Metrics
from service.settings import ServiceSettings

TIMEOUT_HEADER = "x-request-timeout-seconds"
CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never sent
log = logging.getLogger("marche.app")


class Gateway:
    """The app's link to the engine client (`app.state.client`, set at start-up)."""

    def __init__(self, state: Any, settings: ServiceSettings, metrics: Metrics) -> None:
        self.state, self.settings, self.metrics = state, settings, metrics
        self._info: dict[str, Any] | None = None
        self._classes: ClassNames | None = None

    async def info(self) -> dict[str, Any]:
        """The model's static facts, fetched from the engine once."""
        if self._info is None:
            self._info = await self.state.client.info()
        return self._info

    async def classes(self) -> ClassNames:
        if self._classes is None:
            info = await self.info()
            spec = MODELS.get(info["model"])
            self._classes = spec.classes if spec else ClassNames.from_labels(info["labels"])
        return self._classes

    async def class_id(
        self, class_id: int | None, class_name: str | None, field: str, id_field: str = "class_id"
    ) -> int:
        """The class a request means; a 422 naming the field (`field` for the name, `id_field`
        for the id) when it means none or several."""
        classes = await self.classes()
        if class_id is None and class_name is None:
            raise invalid("class_id", "Field required: give class_id or class_name", None)
        if class_id is not None and class_name is not None:
            raise invalid("class_name", "give class_id or class_name, not both", class_name)
        if class_id is not None:
            if not 0 <= class_id < len(classes):
                model = (await self.info())["model"]
                raise invalid(
                    id_field, f"class id must be in 0..{len(classes) - 1} for model {model}",
                    class_id,
                )  # fmt: skip
            return class_id
        try:
            return classes.resolve(class_name)
        except ClassNameError as exc:
            key = "candidates" if exc.ambiguous else "suggestions"
            error = {"type": "value_error", "loc": ("body", field), "msg": str(exc),
                     "input": class_name, key: [c.brief() for c in exc.candidates]}  # fmt: skip
            raise RequestValidationError([error]) from None

    async def engine_request(
        self, body: GenerateRequest, class_id: int, request: Request
    ) -> EngineRequest:
        """The engine's request: defaults filled in, a seed drawn if none, the deadline."""
        settings, defaults = self.settings, (await self.info())["defaults"]
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        timeout = settings.request_timeout_s
        if (header := request.headers.get(TIMEOUT_HEADER)) is not None:
            try:
                requested = float(header)
            except ValueError:
                requested = float("nan")
            if not requested > 0:  # also NaN
                raise invalid(TIMEOUT_HEADER, "must be a positive number of seconds", header,
                              where="header")  # fmt: skip
            timeout = min(timeout, requested)
        params = SamplingParams(
            num_iter=body.steps or defaults["steps"],
            cfg=defaults["cfg"] if body.cfg is None else body.cfg,
            cfg_schedule=body.cfg_schedule or defaults["cfg_schedule"],
            temperature=defaults["temperature"] if body.temperature is None else body.temperature,
        )
        return EngineRequest(
            class_id=class_id,
            seeds=[seed + i for i in range(body.num_images)],
            params=params,
            mode=body.mode or settings.default_mode,
            timeout_s=timeout,
            request_id=request.headers.get("x-request-id") or secrets.token_hex(16),
            tenant=request_tenant(request, body.user),
            priority=body.priority,
        )

    async def run(self, req: EngineRequest, request: Request) -> JobResult | None:
        """The job's result; None when the client went away first (its job is dropped).
        Refusals and failures raise (`failure` answers them)."""
        task = asyncio.ensure_future(self.state.client.generate(req))
        try:
            while not task.done():  # notice a client that goes away, and drop its job
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await request.is_disconnected():
                    return None
            return task.result()
        finally:
            task.cancel()

    def failure(
        self, exc: Exception, req: EngineRequest, route: str
    ) -> tuple[int, str, dict[str, str]]:
        """Status, message and headers for an engine-side failure; its request metric."""
        headers: dict[str, str] = {}
        if isinstance(exc, QueueFull):  # the queue's (503) or its tenant's share (429)
            status, message = (429 if isinstance(exc, TenantBusy) else 503), str(exc)
            retry = max(self.settings.retry_after_s, int(getattr(exc, "retry_after", 1)))
            headers["Retry-After"] = str(retry)
        elif isinstance(exc, JobCancelled):
            status = 504 if exc.reason == "deadline" else CLIENT_CLOSED
            message = f"deadline of {req.timeout_s:g} s passed"
        else:  # a failed step, a dead replica, or a bug: JSON all the same, and counted
            status, message = 500, str(exc)
            if not isinstance(exc, EngineError):
                log.error("request %s failed", req.request_id, exc_info=exc)
                message = f"internal error ({type(exc).__name__})"
        self.metrics.request_finished(req.mode, status, route=route)
        return status, message, headers
