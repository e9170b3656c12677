"""Optional `torch.compile` of the per-step hot paths (off by default; `--compile MODE`).

What is compiled, and why it can be:

* the DiffLoss MLP's step (`SimpleMLPAdaLN.forward_lean`, and `final_lean` that the head cache's
  lazy steps run alone): it runs num_iter x T times per image on
  a handful of rows, so at small batch it is bound by launches and dispatch, not FLOPs. Its
  shapes depend only on the rows predicted in a step, so there is one graph per row count; on
  CUDA `reduce-overhead` replays each as a CUDA graph;
* MARché's cache-aware decoder layers (`Block.forward_active`): on non-full steps their shapes
  are static (budget active tokens, a fixed-size cache), so they compile once per batch size.

Baseline's full passes change length every step; they are left eager rather than recompiled
for each length. Compiling changes no weights and no maths, but fused kernels may round
differently: the exactness tests run eager.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine.model.mar import MAR

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def compile_model(model: MAR, mode: str = "default", backend: str | Callable = "inductor") -> MAR:
    """Compile `model`'s hot paths in place (the same parameters); "off" leaves it eager.

    `backend` is torch.compile's (tests pass a counting "aot_eager" one)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if mode == "off":
        return model
    options: dict = {"backend": backend}  # static first; dims that vary become dynamic
    if backend == "inductor":
        options["mode"] = mode
    net = model.diffloss.net
    net.forward_lean = torch.compile(net.forward_lean, **options)
    net.final_lean = torch.compile(net.final_lean, **options)
    for block in model.decoder_blocks:
        block.forward_active = torch.compile(block.forward_active, **options)
    return model
