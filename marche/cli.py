"""`marche`: generate images, inspect models, and measure quality from the command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from marche.eval_cmd import ablations, bench, quality, speculative
from marche.options import (
    BudgetOpt,
    CheckpointOpt,
    DeviceOpt,
    DtypeOpt,
    EncoderOpt,
    ModelOpt,
    ModeOpt,
    PeriodOpt,
    SelectionOpt,
    VaeOpt,
    fail,
    marche_config,
    out,
    step_progress,
)
from marche.serve_cmd import serve
from marche.weights_cmd import app as weights_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.command()
def generate(
    class_id: Annotated[
        list[int] | None, typer.Option(help="class to generate; repeat for one grid row each")
    ] = None,
    class_name: Annotated[
        list[str] | None,
        typer.Option("--class", help="class by name ('seven', 'golden retriever'); repeatable"),
    ] = None,
    num: Annotated[int, typer.Option(min=1, help="images to generate per class")] = 8,
    seed: Annotated[int, typer.Option(help="seed of the first image; image i uses seed+i")] = 0,
    cfg: Annotated[
        float | None, typer.Option(help="guidance scale (model default if unset)")
    ] = None,
    cfg_schedule: Annotated[str | None, typer.Option(help="linear or constant")] = None,
    steps: Annotated[int | None, typer.Option(help="autoregressive steps (num_iter)")] = None,
    temperature: Annotated[float | None, typer.Option(help="diffusion noise temperature")] = None,
    mode: ModeOpt = "mar",
    model: ModelOpt = "digits",
    checkpoint: CheckpointOpt = None,
    vae: VaeOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    out_path: Annotated[Path, typer.Option("--out", help="PNG grid to write")] = Path("grid.png"),
    out_dir: Annotated[
        Path | None, typer.Option(help="write one PNG per image here instead of a grid")
    ] = None,
    scale: Annotated[int, typer.Option(min=1, max=16, help="enlarge pixels by this factor")] = 1,
    budget: BudgetOpt = 64,
    selection_layer: SelectionOpt = 2,
    refresh_period: PeriodOpt = 3,
    encoder: EncoderOpt = "cache",
) -> None:
    """Generate class-conditional images with a progress bar over the decoding steps."""
    from dataclasses import replace

    from engine.decode.policy import make_policy
    from engine.images import encode_image, images_to_uint8, make_grid
    from engine.model.checkpoint import CheckpointError
    from engine.pipeline import Pipeline

    try:
        pipe = Pipeline.load(model, checkpoint=checkpoint, vae=vae, device=device, dtype=dtype)
        class_ids = [*(class_id or []), *map(pipe.spec.classes.resolve, class_name or [])]
        class_ids = class_ids or [0]
        pipe.check_class_ids(class_ids)
        overrides = {
            "num_iter": steps,
            "cfg": cfg,
            "cfg_schedule": cfg_schedule,
            "temperature": temperature,
        }
        params = replace(
            pipe.spec.defaults, **{k: v for k, v in overrides.items() if v is not None}
        )
        knobs = marche_config(budget, selection_layer, refresh_period, encoder, "attention", True)
        policy = make_policy(mode, knobs)
    except (ValueError, CheckpointError) as exc:
        raise fail(str(exc)) from None

    # every class gets seeds seed .. seed+num-1: one row per class, one column per seed
    jobs = [(c, seed + i) for c in class_ids for i in range(num)]
    names = ", ".join(f"{c} ({pipe.spec.labels[c]})" for c in class_ids)
    steps = policy.config.num_steps(params.num_iter)  # GtR's modes run fewer steps
    with step_progress(steps) as progress:
        task = progress.add_task(f"{model} class {names} x{num}", total=steps)
        tokens = pipe.generate_tokens(
            [c for c, _ in jobs],
            [s for _, s in jobs],
            params,
            policy,
            on_step=lambda info: progress.update(task, completed=info.step + 1),
        )
    images = images_to_uint8(pipe.decode(tokens))
    lines = [
        f"image {i}: class {c} ({pipe.spec.labels[c]}) seed {s}" for i, (c, s) in enumerate(jobs)
    ]
    if out_dir is None:
        nrow = num if len(class_ids) > 1 else None  # several classes: one row each
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_bytes(encode_image(make_grid(images, nrow), "png", scale))
        for line in lines:
            out.print(line, highlight=False)
        out.print(f"wrote {out_path} ({len(jobs)} images, {params})", highlight=False)
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    for line, image, (c, s) in zip(lines, images, jobs, strict=True):
        path = out_dir / f"class{c}_seed{s}.png"
        path.write_bytes(encode_image(image, "png", scale))
        out.print(f"{line} -> {path}", highlight=False)


@app.command()
def info(
    model: Annotated[str | None, typer.Option(help="only this model")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
) -> None:
    """Models known, device, dtype and parameter counts."""
    import torch

    from engine.model.mar import MAR
    from engine.pipeline import MODELS, resolve_device, resolve_dtype

    dev = resolve_device(device)
    out.print(
        f"torch {torch.__version__}, device {dev}"
        + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
        + f", dtype {resolve_dtype(dtype, dev)}",
        highlight=False,
    )
    table = Table(
        "model",
        "params",
        "diffloss",
        "enc/dec depth x width",
        "tokens",
        "classes",
        "defaults",
        "weights",
    )
    for name, spec in MODELS.items():
        if model and name != model:
            continue
        config = spec.config
        with torch.device("meta"):
            net = MAR(config)
        total = sum(p.numel() for p in net.parameters())
        head = sum(p.numel() for p in net.diffloss.parameters())
        d = spec.defaults
        weights = "shipped" if spec.weights and spec.weights.is_file() else "--checkpoint"
        table.add_row(
            name,
            f"{total:,}",
            f"{head:,} ({config.diffloss_d}x{config.diffloss_w})",
            f"{config.encoder_depth}/{config.decoder_depth} x {config.encoder_embed_dim}",
            f"{config.seq_len} x {config.token_embed_dim}",
            str(config.class_num),
            f"steps {d.num_iter}, cfg {d.cfg} {d.cfg_schedule}, T {d.temperature}",
            weights,
        )
    Console(width=160).print(table)


for command in (quality, ablations, bench, speculative, serve):
    app.command()(command)
app.add_typer(weights_app, name="weights")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
