"""`marche bench --attention`: MARché's cache-aware attention on a model's decoder shapes,
four ways, timed per layer call (issue 30, item 3: "measure it against concat").

A lazy step's late decoder layers run only the active tokens (A per call: the budget) of G
calls (two CFG halves per image), whose queries attend over each call's N = buffer + L keys:
fresh K/V for the active tokens, cached K/V for the rest. Each variant also writes the fresh
K/V into the cache, which the next step reads:

* `pool` (ours, what the eager pass and the units run, `Attention.forward_active`): the
  fresh K/V written into their slots of the token-major pool first, then one SDPA call over
  the calls' cache rows, picked by an index tensor: a gather, i.e. a copy of every key;
* `pool_view`: the same over cache rows that are one contiguous range, a view of the pool
  with no copy: what the gather costs (the eager pass gets it when a pass's cache rows are
  contiguous; units always index);
* `concat` (the paper's baseline): the cached K/V gathered, the fresh K/V concatenated after
  them, the active slots' stale entries masked, one SDPA call;
* `lse`: two SDPA calls, one over the fresh K/V and one over the cached K/V with the active
  slots' stale entries masked, merged by their log-sum-exp (the notes' option A, xformers'
  `merge_attentions`; the LSE from the backends' own ops, which SDPA does not return).

All four compute the same attention (a test checks it on the CPU). Not here: FlexAttention
over the whole pool with a block mask, the one way to skip the gather for any rows (it needs
`torch.compile` per shape).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.decode.marche import MarcheConfig
from engine.decode.units.common import timed
from engine.eval.bench import device_name
from engine.model.mar import store_kv
from engine.pipeline import MODELS, resolve_device, resolve_dtype

VARIANTS = ("pool", "pool_view", "concat", "lse")


def inputs(
    heads: int, head_dim: int, slots: int, batch: int, active: int, device, dtype, seed: int = 0
) -> dict:
    """A pool of 2 * batch cache rows (+1, as the slot pool's scratch row), G = 2 * batch calls
    on its rows 0..G-1, each with `active` distinct active slots and their fresh Q/K/V."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    calls = 2 * batch

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    slots_of = torch.stack([torch.randperm(slots, generator=gen)[:active] for _ in range(calls)])
    slots_of = slots_of.to(device)  # (G, A)
    rows = torch.arange(calls, device=device)
    return {
        "k_pool": randn(calls + 1, slots, heads, head_dim),
        "v_pool": randn(calls + 1, slots, heads, head_dim),
        "q": randn(calls, heads, active, head_dim),  # SDPA's layout
        "k": randn(calls, active, heads, head_dim),  # token-major, as qkv_tokens gives them
        "v": randn(calls, active, heads, head_dim),
        "slots": slots_of,
        "rows": rows,  # an index tensor, as units pass them
        "flat": (slots_of + (rows * slots)[:, None]).flatten(),  # cache row * N + slot
        "stale": torch.zeros(calls, slots, dtype=torch.bool, device=device).scatter_(
            1, slots_of, True
        ),  # (G, N): the active slots, whose cached entries are stale
    }


def _store(x: dict) -> None:
    """The fresh K/V into their slots, as the model writes them."""
    store_kv(x["k"], x["v"], x["flat"], x["k_pool"], x["v_pool"])


def pool(x: dict) -> Tensor:
    _store(x)
    keys, values = x["k_pool"][x["rows"]], x["v_pool"][x["rows"]]  # (G, N, H, hd) copies
    return F.scaled_dot_product_attention(x["q"], keys.transpose(1, 2), values.transpose(1, 2))


def pool_view(x: dict) -> Tensor:
    _store(x)
    rows = slice(0, len(x["rows"]))  # the same rows, contiguous: views
    keys, values = x["k_pool"][rows], x["v_pool"][rows]
    return F.scaled_dot_product_attention(x["q"], keys.transpose(1, 2), values.transpose(1, 2))


def concat(x: dict) -> Tensor:
    keys = torch.cat([x["k_pool"][x["rows"]], x["k"]], dim=1).transpose(1, 2)  # (G, H, N+A, hd)
    values = torch.cat([x["v_pool"][x["rows"]], x["v"]], dim=1).transpose(1, 2)
    fresh = torch.ones_like(x["stale"][:, : x["k"].shape[1]])
    mask = torch.cat([~x["stale"], fresh], dim=1)[:, None, None, :]
    out = F.scaled_dot_product_attention(x["q"], keys, values, mask)
    _store(x)
    return out


def lse(x: dict) -> Tensor:
    cached_k, cached_v = x["k_pool"][x["rows"]], x["v_pool"][x["rows"]]
    out_a, lse_a = attention_lse(x["q"], x["k"].transpose(1, 2), x["v"].transpose(1, 2), None)
    mask = (~x["stale"])[:, None, None, :]
    out_b, lse_b = attention_lse(x["q"], cached_k.transpose(1, 2), cached_v.transpose(1, 2), mask)
    total = torch.logaddexp(lse_a, lse_b)  # (G, H, A), fp32
    weight_a, weight_b = (lse_a - total).exp()[..., None], (lse_b - total).exp()[..., None]
    _store(x)
    return (weight_a * out_a.float() + weight_b * out_b.float()).to(out_a.dtype)


def attention_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Attention and its log-sum-exp per query (B, H, Lq), natural log, fp32, from the
    backend's own op (private ATen ops: SDPA returns no LSE)."""
    bias = None  # additive: 0 where attended, -inf where masked
    if mask is not None:
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
            ~mask, -torch.inf
        )
    if q.device.type == "cuda":  # memory-efficient: takes a bias; its LSE is padded to 32
        if bias is not None:
            bias = bias.expand(-1, q.shape[1], q.shape[2], -1)
        out, lse_ = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[:2]
        return out, lse_[..., : q.shape[2]]
    out, lse_ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias)
    return out, lse_


FUNCTIONS: dict[str, Callable[[dict], Tensor]] = {
    "pool": pool, "pool_view": pool_view, "concat": concat, "lse": lse,
}  # fmt: skip


@torch.no_grad()
def attention_table(
    model: str,
    batches: Sequence[int],
    device: str = "auto",
    dtype: str = "auto",
    repeats: int = 20,
    variants: Sequence[str] = VARIANTS,
) -> dict:
    """Median microseconds per layer call of each variant at each batch, interleaved, on
    `model`'s decoder shapes (heads, head dim, buffer + L keys, MARché's budget of active
    tokens); each variant's time relative to `concat`'s."""
    config, dev = MODELS[model].config, resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    heads = config.decoder_num_heads
    head_dim, slots = config.decoder_embed_dim // heads, config.buffer_size + config.seq_len
    active = min(MarcheConfig().budget, slots)
    rows = []
    for batch in batches:
        x = inputs(heads, head_dim, slots, batch, active, dev, torch_dtype)
        times: dict[str, list[float]] = {v: [] for v in variants}
        errors: dict[str, str] = {}  # a variant a backend refuses (private ops) is reported
        for round_ in range(repeats + 2):  # two warm-up rounds
            for name in variants:
                if name in errors:
                    continue
                try:
                    seconds = timed(dev, lambda name=name, x=x: FUNCTIONS[name](x))
                except RuntimeError as exc:
                    errors[name] = str(exc).splitlines()[0][:200]
                    continue
                if round_ >= 2:
                    times[name].append(seconds)
        us = {v: 1e6 * statistics.median(t) for v, t in times.items() if v not in errors}
        base = us.get("concat")
        vs_concat = {v: base / t for v, t in us.items()} if base else None
        rows.append({"batch": batch, "calls": 2 * batch, "keys": slots, "active": active,
                     "us_per_call": us, "errors": errors, "vs_concat": vs_concat})  # fmt: skip
    return {"model": model, "device": device_name(dev),
            "dtype": str(torch_dtype).removeprefix("torch."), "heads": heads,
            "head_dim": head_dim, "repeats": repeats, "rows": rows}  # fmt: skip
