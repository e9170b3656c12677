"""`marche quality`, `marche ablations` and `marche bench`: measure quality and speed."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from marche.options import (
    BudgetOpt,
    CachingOpt,
    DeviceOpt,
    DtypeOpt,
    EncoderOpt,
    ModeOpt,
    PeriodOpt,
    RefreshOpt,
    SelectionOpt,
    fail,
    marche_config,
    out,
    step_progress,
)


def quality(
    mode: ModeOpt = "mar",
    num: Annotated[int, typer.Option(min=10, help="images to generate (class-balanced)")] = 500,
    seed: Annotated[int, typer.Option(help="seed of the first image")] = 0,
    steps: Annotated[int | None, typer.Option(help="autoregressive steps")] = None,
    cfg: Annotated[float | None, typer.Option(help="guidance scale")] = None,
    temperature: Annotated[float | None, typer.Option(help="diffusion temperature")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 50,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
    psnr_vs_mar: Annotated[
        bool, typer.Option(help="also run exact MAR on the same seeds; report mean PSNR")
    ] = False,
    budget: BudgetOpt = 64,
    selection_layer: SelectionOpt = 2,
    refresh_period: PeriodOpt = 3,
    encoder: EncoderOpt = "cache",
    refresh: RefreshOpt = "attention",
    caching_tokens: CachingOpt = True,
    checkpoint: Annotated[
        Path | None, typer.Option(help="digits weights to score (default: the shipped ones)")
    ] = None,
) -> None:
    """Quality of the shipped digits model against held-out real digits."""
    from dataclasses import asdict, replace

    from engine.decode.policy import make_policy, preset
    from engine.eval.quality import evaluate
    from engine.model.checkpoint import CheckpointError
    from engine.pipeline import Pipeline

    try:
        pipe = Pipeline.load("digits", checkpoint=checkpoint, device="cpu")
        knobs = marche_config(
            budget, selection_layer, refresh_period, encoder, refresh, caching_tokens
        )
        policy = make_policy(mode, knobs)
        overrides = {"num_iter": steps, "cfg": cfg, "temperature": temperature}
        params = replace(
            pipe.spec.defaults, **{k: v for k, v in overrides.items() if v is not None}
        )
    except (ValueError, CheckpointError) as exc:
        raise fail(str(exc)) from None
    psnrs: list[float] = []

    def gen(labels, seeds):
        images = pipe.generate(labels.tolist(), seeds, params=params, policy=policy)
        if psnr_vs_mar:
            from engine.eval.quality import psnr

            baseline = pipe.generate(labels.tolist(), seeds, params=params)
            psnrs.extend(psnr(images, baseline).tolist())
        return images

    with step_progress(num) as progress:
        task = progress.add_task(f"digits quality ({mode}, {params})", total=num)
        report = evaluate(
            gen,
            num=num,
            seed=seed,
            batch_size=batch_size,
            progress=lambda done, total: progress.update(task, completed=done),
        )
    weights = str(checkpoint) if checkpoint is not None else "shipped"
    result = {"mode": mode, "weights": weights, "params": params.__dict__, **report.to_dict()}
    result["decoding"] = asdict(preset(mode, knobs))
    if psnrs:
        result["psnr_vs_mar_db"] = sum(psnrs) / len(psnrs)
    out.print_json(json.dumps(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")


def ablations(
    num: Annotated[int, typer.Option(min=10, help="images per row (class-balanced)")] = 200,
    seed: Annotated[int, typer.Option(help="seed of the first image")] = 0,
    steps: Annotated[int | None, typer.Option(help="autoregressive steps")] = None,
    budget: BudgetOpt = 64,
    selection_layer: SelectionOpt = 2,
    refresh_period: PeriodOpt = 3,
    variant_set: Annotated[
        str,
        typer.Option(
            "--set",
            help=(
                "marche: the paper's ablations; turbo: each turbo knob and the presets; "
                "gtr: GtR on turbo, the quality / fast candidates"
            ),
        ),
    ] = "marche",
    only: Annotated[
        list[str] | None,
        typer.Option(help="run only the variants whose name contains this (repeatable)"),
    ] = None,
    reference: Annotated[
        Path | None,
        typer.Option(help="keep MAR's images and row here, and reuse them on a later run"),
    ] = None,
    json_path: Annotated[
        Path | None,
        typer.Option("--json", help="write the rows here (merged with its rows of the same run)"),
    ] = None,
) -> None:
    """Exact MAR vs each decoding variant on the digits model, same seeds, PSNR vs MAR."""
    from dataclasses import replace

    from engine.eval.ablations import merge_rows, run_ablations
    from engine.eval.ablations import variant_set as variants_of
    from engine.pipeline import Pipeline

    try:
        base = marche_config(budget, selection_layer, refresh_period, "cache", "attention", True)
        variants = variants_of(variant_set, base)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if only:
        variants = {n: c for n, c in variants.items() if any(o in n for o in only)}
        if not variants:
            raise fail(f"--only {only} matches no variant of the {variant_set!r} set")
    pipe = Pipeline.load("digits", device="cpu")
    params = pipe.spec.defaults if steps is None else replace(pipe.spec.defaults, num_iter=steps)
    with step_progress(num) as progress:
        tasks = {n: progress.add_task(n, total=num) for n in ["MAR (exact)", *variants]}
        rows = run_ablations(
            pipe,
            params,
            num,
            seed,
            variants=variants,
            progress=lambda name, done, total: progress.update(tasks[name], completed=done),
            reference_path=reference,
        )
    if json_path is not None and json_path.exists():
        old = json.loads(json_path.read_text())
        if old.get("params") == params.__dict__ and _same_run(old["rows"][0], rows[0]):
            rows = merge_rows(old["rows"], rows)
    table = Table("decoding", "accuracy", "Fréchet ± sd", "diversity", "PSNR vs MAR (dB)")
    table.add_column("drift p (vs MAR)")
    for row in rows:
        db, sd, p = row["psnr_vs_mar_db"], row.get("frechet_sd"), row.get("drift_p")
        table.add_row(
            row["name"],
            f"{row['accuracy']:.3f}",
            f"{row['frechet_distance']:.1f}"
            + ("" if sd is None else f" ± {sd:.1f}")
            + f" (floor {row['frechet_distance_real']:.1f})",
            f"{row['diversity_ratio']:.2f}",
            "-" if db is None else f"{db:.1f}",
            "-" if p is None else f"{p:.3f}",
        )
    Console(width=130).print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"params": params.__dict__, "rows": rows}, indent=2) + "\n")


def bench(
    model: Annotated[
        str, typer.Option(help="digits, mar_base, mar_large, mar_huge (--flops: comma-separated)")
    ] = "mar_base",
    batch: Annotated[int, typer.Option(min=1, help="images per batch")] = 1,
    steps: Annotated[int | None, typer.Option(min=1, help="AR steps (model default)")] = None,
    cfg: Annotated[float | None, typer.Option(help="guidance scale (model default)")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    modes: Annotated[str, typer.Option(help="comma-separated modes")] = "mar,marche,turbo",
    repeats: Annotated[int, typer.Option(min=1, help="timed runs per mode (interleaved)")] = 1,
    budget: BudgetOpt = 64,
    selection_layer: SelectionOpt = 2,
    refresh_period: PeriodOpt = 3,
    encoder: EncoderOpt = "cache",
    flops: Annotated[
        bool, typer.Option("--flops", help="count FLOPs per image per phase instead of timing")
    ] = False,
    dispatch: Annotated[
        bool,
        typer.Option("--dispatch", help="count operator calls per AR step and phase (on the CPU)"),
    ] = False,
    profile: Annotated[
        bool,
        typer.Option(
            "--profile",
            help="torch.profiler per mode and --batches: top kernels "
            "(operators on a CPU), device busy share, host time per step",
        ),
    ] = False,
    attention: Annotated[
        bool,
        typer.Option(
            "--attention",
            help="time MARché's cache-aware attention four ways (pool, pool_view, concat, lse) "
            "per layer call on the model's decoder shapes at --batches",
        ),
    ] = False,
    units: Annotated[
        str | None,
        typer.Option(
            help="time eager vs the head and transformer passes as units per bucket: "
            "cuda-graphs, compile or static, interleaved, per mode and --batches "
            "(with --dispatch: count each unit run as one call; with --profile: profile "
            "the units)"
        ),
    ] = None,
    eager: Annotated[
        bool,
        typer.Option(help="with --units: time eager too, interleaved (--no-eager: units alone)"),
    ] = True,
    batches: Annotated[
        str, typer.Option(help="with --dispatch, --profile or --units: comma-separated batches")
    ] = "1,4,16",
    head_buckets: Annotated[
        str, typer.Option(help="with --units: the head's token buckets (auto: sized by --batches)")
    ] = "auto",
    pass_buckets: Annotated[
        str, typer.Option(help="with --units: the passes' call buckets (auto: sized by --batches)")
    ] = "auto",
    count_steps: Annotated[
        int | None, typer.Option(min=1, help="with --dispatch: count the first N steps only")
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the report here")] = None,
) -> None:
    """Time generation per mode (median s/image, per-phase seconds, speedup over exact MAR),
    or count FLOPs per image per phase (--flops) or operator calls per AR step (--dispatch:
    what become kernel launches on a GPU); both device-independent."""
    from dataclasses import replace

    from engine.pipeline import MODELS

    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    models = [m.strip() for m in model.split(",") if m.strip()]

    def sizes() -> list[int]:  # --batches, read by the modes that take it
        return [int(b) for b in batches.split(",") if b.strip()]

    def params_of(name: str):
        """The model's default sampling parameters, with --steps and --cfg where given."""
        defaults = MODELS[name].defaults
        return replace(defaults, num_iter=steps or defaults.num_iter,
                       cfg=defaults.cfg if cfg is None else cfg)  # fmt: skip

    try:
        knobs = marche_config(budget, selection_layer, refresh_period, encoder, "attention", True)
        for name in models:
            if name not in MODELS:
                raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
        if attention:
            from engine.eval.attention import attention_table

            report = attention_table(models[0], sizes(), device, dtype, repeats=max(repeats, 20))
        elif profile:
            from engine.eval.profile import profile_table

            report = profile_table(models[0], mode_list, sizes(), params_of(models[0]), device,
                                   dtype, units=units or "off")  # fmt: skip
        elif units is not None and not dispatch:
            from engine.eval.latency import units_table

            report = units_table(models[0], units, mode_list, sizes(), params_of(models[0]), device,
                                 dtype, repeats, knobs, head_buckets, pass_buckets, eager,
                                 on_row=partial(_write_json, json_path))  # fmt: skip
        elif flops:
            from engine.eval.flops import flops_table

            report = flops_table(models, mode_list, steps, cfg, batch, knobs)
        elif dispatch:
            from engine.eval.dispatch import dispatch_table

            report = {
                name: dispatch_table(name, mode_list, sizes(), params_of(name), knobs, count_steps,
                                     units is not None)
                for name in models
            }  # fmt: skip
        else:
            from engine.eval.bench import bench as run_bench

            if len(models) != 1:
                raise ValueError("timing takes one model (--flops takes several)")
            report = run_bench(
                models[0], mode_list, batch, params_of(models[0]), device, dtype, repeats,
                marche=knobs, progress=_print_run,
            )  # fmt: skip
    except ValueError as exc:
        raise fail(str(exc)) from None
    if attention:
        _print_attention(report)
    elif profile:
        _print_profile(report)
    elif units is not None and not dispatch:
        _print_units(report)
    elif flops:
        _print_flops(report)
    elif dispatch:
        _print_dispatch(report)
    else:
        _print_timing(report)
    _write_json(json_path, report)


def _write_json(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def speculative(
    samples: Annotated[int, typer.Option(min=50, help="chains per token and method")] = 1000,
    tokens: Annotated[int, typer.Option(min=1, help="tokens per captured AR step")] = 4,
    seed: Annotated[
        int, typer.Option(help="seed of the exact MAR run the conditions come from")
    ] = 0,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the rows here")] = None,
) -> None:
    """The self-speculative exact head on digits: acceptance, sequential calls and MLP
    evaluations against exact sampling, and a two-sample test against exact chains."""
    from engine.eval.speculative import measure
    from engine.pipeline import Pipeline

    pipe = Pipeline.load("digits", device="cpu")
    report = measure(pipe, seed=seed, tokens_per_step=tokens, samples=samples)
    table = Table("AR step", "gamma", "verified", "acceptance", "sequential calls", "MLP rows",
                  "p-value")  # fmt: skip
    for row in report["rows"]:
        table.add_row(
            str(row["ar_step"]),
            str(row["gamma"]),
            "yes" if row["verified"] else "no (draft alone)",
            f"{row['acceptance']:.2f}",
            f"{row['sequential_calls_vs_exact']:.2f}x",
            f"{row['mlp_rows_vs_exact']:.2f}x",
            f"{row['p_value']:.2g}",
        )
    Console(width=130).print(table)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n")


def _same_run(mar: dict, other: dict) -> bool:
    """Two MAR rows of the same seeds and settings (only their timing may differ)."""
    return {**mar, "seconds": None} == {**other, "seconds": None}


def _print_run(mode: str, run: int, seconds: float, phases: dict[str, float]) -> None:
    split = ", ".join(f"{phase} {s:.1f}" for phase, s in phases.items())
    Console(stderr=True).print(f"{mode}: run {run} took {seconds:.1f} s ({split} s)")


def _print_flops(report: dict) -> None:
    from engine.eval.flops import PHASES

    for name, entry in report.items():
        table = Table(
            "mode",
            *(f"{p} TF" for p in PHASES),
            "total TF",
            "vs mar",
            title=f"{name}: FLOPs per image, {entry['steps']} steps, cfg {entry['cfg']}",
        )
        for mode, row in entry["modes"].items():
            reduction = entry.get("reduction", {}).get(mode)
            table.add_row(
                mode,
                *(f"{row[p] / 1e12:.3f}" for p in PHASES),
                f"{row['total'] / 1e12:.3f}",
                "-" if reduction is None else f"{reduction:.2f}x",
            )
        Console(width=130).print(table)


def _print_dispatch(report: dict) -> None:
    from engine.eval.dispatch import STEP_PHASES as steps

    for name, entry in report.items():
        units = "; units as CUDA graphs: one call per replay" if entry.get("units") else ""
        table = Table("mode", "batch", "ops/step", *steps, "views/step", "syncs/step",
                      "replays/step", "VAE ops",
                      title=f"{name}: operator calls per AR step (first {entry['counted_steps']} "
                      f"of {entry['steps']} steps, cfg {entry['cfg']}; views and allocations "
                      f"launch no kernel{units})")  # fmt: skip
        for row in entry["rows"]:
            table.add_row(row["mode"], str(row["batch"]), f"{row['ops_per_step']:.0f}",
                          *(f"{row['phases_per_step'][p]:.0f}" for p in steps),
                          f"{row['views_per_step']:.0f}", f"{row['syncs_per_step']:.2f}",
                          f"{row.get('replays_per_step', 0):.1f}", str(row["vae_ops"]))  # fmt: skip
        Console(width=130).print(table)


def _print_profile(report: dict) -> None:
    table = Table("mode", "batch", "ms/step", "host ms/step", "device busy", "top 3 (share)",
                  title=f"{report['model']} on {report['device']} ({report['dtype']}), "
                  f"{report['steps']} steps, torch.profiler")  # fmt: skip
    for row in report["rows"]:
        busy = row["device_busy"]
        tops = ", ".join(f"{t['name'][:40]} {t['share']:.0%}" for t in row["top"][:3])
        table.add_row(row["mode"], str(row["batch"]), f"{row['ms_per_step']:.1f}",
                      f"{row['host_ms_per_step']:.1f}", "-" if busy is None else f"{busy:.0%}",
                      tops)  # fmt: skip
    Console(width=150).print(table)


def _print_attention(report: dict) -> None:
    from engine.eval.attention import VARIANTS

    table = Table("batch", "calls", *(f"{v} µs" for v in VARIANTS),
                  *(f"{v} vs concat" for v in VARIANTS),
                  title=f"{report['model']} decoder attention on {report['device']} "
                  f"({report['dtype']}), {report['heads']} heads x {report['head_dim']}, "
                  f"median of {report['repeats']}")  # fmt: skip
    for row in report["rows"]:
        us, vs = row["us_per_call"], row["vs_concat"] or {}
        table.add_row(str(row["batch"]), str(row["calls"]),
                      *(f"{us[v]:.0f}" if v in us else "error" for v in VARIANTS),
                      *(f"{vs[v]:.2f}x" if v in vs else "-" for v in VARIANTS))  # fmt: skip
    console = Console(width=160)
    console.print(table)
    for row in report["rows"]:
        for name, error in row["errors"].items():
            console.print(f"batch {row['batch']}: {name}: {error}", markup=False)


def _print_units(report: dict) -> None:
    built = "; ".join(
        f"{name}: {u['built']} units in {u['build_seconds']:.1f} s, "
        f"{u['memory_bytes'] / 2**20:.1f} MiB, {u['hits']} hits, {u['misses']} eager"
        for name, u in report["units"].items()
    )
    runners = ["eager", "units"] if report.get("eager", True) else ["units"]
    mode = report["units_mode"]
    columns = [f"{'eager' if r == 'eager' else mode} {c}" for r in runners
               for c in ("ms/step", "s/image", "vs mar", "peak GiB")]  # fmt: skip
    if "eager" in runners:
        columns += ["speed-up", "max |token diff|"]
    table = Table("mode", "batch", *columns,
                  title=f"{report['model']} on {report['device']} ({report['dtype']}), "
                  f"{report['steps']} steps, cfg {report['cfg']}, median of {report['repeats']}; "
                  f"{built}")  # fmt: skip
    for row in report["rows"]:
        cells = []
        for r in runners:
            vs_mar, peak = row.get(f"{r}_vs_mar"), row.get(f"{r}_peak_bytes")
            cells += [f"{row[f'{r}_ms_per_step']:.2f}", f"{row[f'{r}_s_per_image']:.4f}",
                      "-" if vs_mar is None else f"{vs_mar:.2f}x",
                      "-" if peak is None else f"{peak / 2**30:.1f}"]  # fmt: skip
        if "eager" in runners:
            cells += [f"{row['speedup']:.2f}x", f"{row['max_token_diff']:.1e}"]
        table.add_row(row["mode"], str(row["batch"]), *cells)
    Console(width=160).print(table)


def _print_timing(report: dict) -> None:
    from engine.eval.bench import PHASES

    table = Table(
        "mode",
        "s/image",
        *PHASES,
        "active",
        "vs mar",
        title=(
            f"{report['model']} on {report['device']} ({report['dtype']}), batch "
            f"{report['batch']}, {report['steps']} steps, cfg {report['cfg']}, "
            f"units {report['units']}, median of {report['repeats']}"
        ),
    )
    for name, r in report["modes"].items():
        ph = r["phases_s_per_image"]
        frac = r["active_fraction"]
        speedup = report.get("speedup", {}).get(name)
        table.add_row(
            name,
            f"{r['s_per_image']:.3f}",
            *(f"{ph[p]:.3f}" for p in PHASES),
            "-" if frac is None else f"{frac:.2f}",
            "-" if speedup is None else f"{speedup:.2f}x",
        )
    Console(width=150).print(table)
