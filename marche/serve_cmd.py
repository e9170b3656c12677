"""`marche serve`: the HTTP service, under uvicorn (default) or Ray Serve (`--ray`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer


def serve(
    host: Annotated[str, typer.Option(help="interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    model: Annotated[str | None, typer.Option(help="digits (default), mar_base, ...")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="official checkpoint")] = None,
    vae: Annotated[Path | None, typer.Option(help="KL-16 VAE checkpoint")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda ...")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, bf16, fp16, fp32")] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="continuous (step-level batching) or static")
    ] = None,
    scheduling_policy: Annotated[
        str | None, typer.Option(help="continuous: fair (default), fifo or deadline")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="images per batch")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="batch fill wait")] = None,
    queue_size: Annotated[int | None, typer.Option(help="waiting requests before 503")] = None,
    units: Annotated[
        str | None,
        typer.Option(
            help="head and transformer passes as units per bucket: auto (CUDA graphs where "
            "faster), off, cuda-graphs, compile (inductor), static"
        ),
    ] = None,
    ray: Annotated[bool, typer.Option("--ray", help="run under Ray Serve")] = False,
    config: Annotated[
        Path | None,
        typer.Option(help="with --ray: Serve config file (default: the packaged one)"),
    ] = None,
    replicas: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="with --ray: exactly N engine replicas (default: autoscale "
            "up to the visible GPUs; CPU: 1)",
        ),
    ] = None,
    router: Annotated[
        str | None, typer.Option(help="with --ray: work (least outstanding work) or default")
    ] = None,
    metrics_port: Annotated[
        int, typer.Option(help="with --ray: port of Ray's metrics exporter (ray_marche_*)")
    ] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="generation routes want `Authorization: Bearer KEY` (default: "
            "$MARCHE_API_KEY; unset: open)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve the web page, POST /generate and /v1; options override MARCHE_* variables."""
    overrides = {
        "model": model,
        "checkpoint": checkpoint and str(checkpoint),
        "vae": vae and str(vae),
        "device": device,
        "dtype": dtype,
        "scheduler": scheduler,
        "scheduling_policy": scheduling_policy,
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "queue_size": queue_size,
        "router": router,
        "api_key": api_key,
        "units": units,
    }
    # the environment is how settings reach Ray replicas too, so set it for both runtimes
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"MARCHE_{name.upper()}"] = str(value)
    _check_weights()
    if ray:
        from service.ray_serve.run import run

        run(config, host=host, port=port, metrics_port=metrics_port, replicas=replicas)
        return
    import uvicorn

    from service.http.app import build_app

    _log_to_stderr("engine", "service", "marche")  # start-up facts: units built, the warm-up
    from service.settings import ServiceSettings

    settings = ServiceSettings()
    app = build_app(settings)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="info",
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )  # fmt: skip
    server = draining_server(config, drain=lambda: _drain(app))
    if host in ("0.0.0.0", "::"):
        typer.echo(f"marche serve: listening on every interface ({host}:{port})", err=True)
    server.run()


def _log_to_stderr(*names: str) -> None:
    """INFO lines of our own loggers on stderr, as uvicorn prints its own (under Ray, Serve
    collects them)."""
    import logging

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    for name in names:
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)


def _check_weights() -> None:
    """Missing official weights: one line naming the command that fetches them, before a
    runtime starts (and would bury it in a start-up traceback)."""
    from engine.hub import WeightsMissing
    from engine.pipeline import MODELS, weight_paths
    from marche.options import fail
    from service.settings import ServiceSettings

    settings = ServiceSettings()
    if settings.model not in MODELS:
        raise fail(f"unknown model {settings.model!r}; choose one of {sorted(MODELS)}")
    if settings.random_weights:
        return
    try:
        weight_paths(settings.model, settings.checkpoint, settings.vae)
    except WeightsMissing as exc:
        raise fail(str(exc)) from None


def _drain(app) -> None:
    client = getattr(app.state, "client", None)
    if client is not None and hasattr(client, "drain"):
        client.drain()


def draining_server(config, drain: Callable[[], None]):
    """uvicorn's Server, draining the engine as soon as a shutdown signal arrives: queued
    requests are answered 503 at once (uvicorn alone would wait for every one of them),
    running ones get `MARCHE_SHUTDOWN_GRACE_S` (uvicorn's graceful-shutdown timeout)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            drain()
            super().handle_exit(sig, frame)

    return DrainingServer(config)
