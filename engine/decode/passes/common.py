"""What the transformer passes share: the call (one CFG half of one image in a pass), the
record a pass returns, and the ragged-row helpers (padding, key masks, class embeddings).

The twin of `units/common.py`: an eager pass (`passes/X.py`) and its units (`units/X.py`)
take the same arguments and return the same `PassOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from engine.decode.pool import SlotPool
from engine.model.mar import MAR


@dataclass(eq=False)
class Call:
    """One CFG half of one image in this step's transformer pass."""

    slot: int  # the image's slot (its tokens and order)
    cache_row: int  # this half's cache row in the pool (its K/V and encoder caches)
    label: Tensor | None  # (1,) class on the device; None: the null class (unconditional)
    known: Tensor  # (n,) positions generated so far, oldest first
    pred: Tensor  # (k,) positions predicted this step
    prev_pred: Tensor | None = None  # (k',) positions predicted on the row's previous step
    cache_encoder: bool = False  # full passes: fill the encoder caches (MARché "cache")
    cache_decoder_from: int | None = None  # full passes: fill decoder K/V from this layer
    refresh_rng: torch.Generator | None = None  # MARché's "random" refresh ablation


@dataclass(eq=False)
class PassOutput:
    """What a transformer pass computed for its calls, in their order."""

    h: list[Tensor]  # per call: (k, D) hidden states before decoder_norm at its predictions
    active: list[float]  # per call: share of the decoder's tokens through its late layers
    enc_len: list[int] | None = None  # per call: its cache row's encoder length now (None: kept)
    h_all: Tensor | None = None  # (G, L, D) full passes: every image position


def pad(rows: list[Tensor], value: int) -> Tensor:
    """Ragged 1-D index rows -> (G, max n), padded with `value`."""
    return pad_sequence(rows, batch_first=True, padding_value=value)


def pad_repeat(rows: list[Tensor]) -> Tensor:
    """Ragged 1-D rows -> (G, max n), each padded with copies of its own first entry."""
    longest = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, r[:1].expand(longest - len(r))]) for r in rows])


def length_mask(lengths: list[int], device: torch.device) -> Tensor | None:
    """(G, max) True below each row's length; None when every row is full length."""
    longest = max(lengths)
    if all(n == longest for n in lengths):
        return None
    positions = torch.arange(longest, device=device)
    return torch.stack([positions < n for n in lengths])


def class_embedding(model: MAR, calls: list[Call]) -> Tensor:
    """(G, D): the class embedding of conditional calls, the null class for the others.
    Calls are ordered conditional first."""
    labels = [c.label for c in calls if c.label is not None]
    parts = [model.class_emb(torch.cat(labels))] if labels else []
    num_null = len(calls) - len(labels)
    if num_null:
        parts.append(model.fake_latent.expand(num_null, -1))
    return torch.cat(parts)


def tokens_of(pool: SlotPool, calls: list[Call]) -> Tensor:
    """(G, L, C) current tokens of each call's image."""
    return torch.stack([pool.tokens[c.slot] for c in calls])
