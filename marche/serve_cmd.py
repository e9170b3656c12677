"""`marche serve`: the HTTP service, under uvicorn (default) or Ray Serve (`--ray`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_SERVE_CONFIG = Path("deploy/serve_config.yaml")


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
    max_batch_size: Annotated[int | None, typer.Option(help="images per batch")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="batch fill wait")] = None,
    queue_size: Annotated[int | None, typer.Option(help="waiting requests before 503")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="run under Ray Serve")] = False,
    config: Annotated[
        Path, typer.Option(help="Ray Serve config file (with --ray)")
    ] = DEFAULT_SERVE_CONFIG,
) -> None:
    """Serve POST /generate; options override the MARCHE_* environment variables."""
    overrides = {
        "model": model,
        "checkpoint": checkpoint and str(checkpoint),
        "vae": vae and str(vae),
        "device": device,
        "dtype": dtype,
        "scheduler": scheduler,
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "queue_size": queue_size,
    }
    # the environment is how settings reach Ray replicas too, so set it for both runtimes
    for name, value in overrides.items():
        if value is not None:
            os.environ[f"MARCHE_{name.upper()}"] = str(value)
    if ray:
        from service.ray_app import run_from_config

        run_from_config(config, host=host, port=port)
        return
    import uvicorn

    from service.app import build_app
    from service.settings import ServiceSettings

    uvicorn.run(build_app(ServiceSettings()), host=host, port=port, log_level="info")
