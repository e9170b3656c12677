"""Options and helpers shared by the `marche` commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)
out = Console()

ModelOpt = Annotated[str, typer.Option(help="digits (shipped), mar_base, mar_large, mar_huge")]
CheckpointOpt = Annotated[
    Path | None, typer.Option(help="official checkpoint-last.pth or .safetensors (MAR models)")
]
VaeOpt = Annotated[Path | None, typer.Option(help="KL-16 VAE kl16.ckpt or .safetensors")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on CUDA, fp32 on CPU), fp32, bf16, fp16")]


BudgetOpt = Annotated[int, typer.Option(help="MARché: active tokens per image per step")]
SelectionOpt = Annotated[int, typer.Option(help="MARché: scoring decoder layer (1-based)")]
PeriodOpt = Annotated[int, typer.Option(help="MARché: full refresh every R steps")]
EncoderOpt = Annotated[str, typer.Option(help="MARché encoder: cache or full")]
RefreshOpt = Annotated[str, typer.Option(help="MARché refresh: attention, random, low_attention")]
CachingOpt = Annotated[bool, typer.Option(help="MARché: include last step's tokens")]
ModeOpt = Annotated[
    str, typer.Option(help="decoding: mar (exact), marche (cache-aware), turbo (every cache)")
]


def marche_config(budget, selection_layer, refresh_period, encoder, refresh, caching_tokens):
    from engine.decode.marche import MarcheConfig

    return MarcheConfig(
        budget=budget,
        selection_layer=selection_layer,
        refresh_period=refresh_period,
        encoder=encoder,
        caching_tokens=caching_tokens,
        refresh=refresh,
    )


def fail(message: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def step_progress(total: int) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
