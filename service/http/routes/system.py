"""The model and the service: `/classes` and `/info` (what is served), `/healthz` and
`/readyz` (the probes), `/metrics` (Prometheus). None of them wants the API key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.http.deps import BackendDep, ClientDep, GatewayDep, SettingsDep

router = APIRouter()


@router.get("/classes")
async def classes(gateway: GatewayDep) -> dict[str, Any]:
    """The served model's classes: id, display name and every synonym `class_name` takes."""
    info, names = await gateway.info(), await gateway.classes()
    return {"model": info["model"], "classes": [
        {"id": c.id, "name": c.name, "synonyms": list(c.synonyms)} for c in names]}  # fmt: skip


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up (liveness)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "not ready (the reason is given)"}})
async def readyz(client: ClientDep) -> JSONResponse:
    """Model loaded, warmed up (a probe generation ran) and the engine loop alive."""
    ok, reason = await client.readiness()
    return JSONResponse({"ready": ok, "reason": reason}, 200 if ok else 503)


@router.get("/info")
async def info(client: ClientDep, settings: SettingsDep) -> dict[str, Any]:
    """The model, device, defaults, MARché and batching settings, queue state, and
    whether generation routes want an API key."""
    return {**await client.info(), "api_key_required": bool(settings.keys())}


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics_endpoint(backend: BackendDep) -> Response:
    """Prometheus metrics (under Ray Serve: Ray's exporter, port 8080, `ray_` prefix)."""
    if backend is None:
        return PlainTextResponse(
            "# metrics are exported by Ray's metrics exporter (ray_marche_*)\n"
        )
    return Response(backend.render(), media_type="text/plain; version=0.0.4")
