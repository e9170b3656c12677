"""Per-image decode state that lives on the device: a pool of slots allocated once.

Every image in flight owns one slot from admission to retirement (vLLM's KV-cache idea, one
block per image). A slot holds the image's tokens, its generation order and the condition
cache's h_uncond - h_cond and, for each CFG half, a *cache row*: MARché's encoder and decoder
K/V caches and the encoder output cache. Cache row `slot` is the conditional half's,
`slot + capacity` the unconditional one's; one more cache row, `scratch`, takes the writes of
a padded unit's pad rows (`units/full.py`, `units/lazy.py`) and is never read. Buffers are
allocated at their first use (in the dtype autocast gives their contents) at full capacity
and never grow; a released slot is reused as it is (every reader is bounded by lengths the
new owner writes first).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from engine.model.mar import MAR, Block, Rows


class PoolFull(Exception):
    """No free slot: the caller admits fewer rows."""


class SlotPool:
    def __init__(self, model: MAR, capacity: int, device: torch.device | str) -> None:
        config = model.config
        self.capacity, self.device = capacity, torch.device(device)
        self.num_slots = config.buffer_size + config.seq_len  # token slots per cache row
        self.tokens = torch.zeros(capacity, config.seq_len, config.token_embed_dim, device=device)
        self.orders = torch.zeros(capacity, config.seq_len, dtype=torch.long, device=device)
        self.enc_len = [0] * (2 * capacity)  # filled slots of each cache row's encoder cache
        self.scratch = 2 * capacity  # the cache row pad rows write to
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._buffers: dict[str, Tensor] = {}

    # -- slots ---------------------------------------------------------------------------------

    @property
    def free(self) -> int:
        return len(self._free)

    def acquire(self) -> int:
        if not self._free:
            raise PoolFull(f"all {self.capacity} slots are in use")
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def cache_row(self, slot: int, half: int) -> int:
        """The cache row of a slot's conditional (half 0) or unconditional (half 1) half."""
        return slot + half * self.capacity

    def index(self, cache_rows: Sequence[int]) -> Rows:
        """An index for these cache rows: a slice when contiguous (a view, no copy, no host
        transfer), else an index tensor on the device."""
        first = cache_rows[0]
        if list(cache_rows) == list(range(first, first + len(cache_rows))):
            return slice(first, first + len(cache_rows))
        return to_device(list(cache_rows), self.device)

    # -- buffers (allocated once, at first use) --------------------------------------------------

    def kv(self, part: str, layer: int, block: Block, x: Tensor) -> tuple[Tensor, Tensor]:
        """K/V cache of encoder ("enc") or decoder ("dec") `layer` (whose input looks like x):
        each (2 cap + 1, N, H, hd), in the dtype qkv produces under the current autocast."""
        attn = block.attn
        shape = (2 * self.capacity + 1, self.num_slots, attn.num_heads, attn.head_dim)
        dtype = _autocast_dtype(x)
        return (
            self._buffer(f"{part}{layer}.k", shape, dtype),
            self._buffer(f"{part}{layer}.v", shape, dtype),
        )

    def enc_out(self, like: Tensor) -> Tensor:
        """Encoder outputs of every cache row: (2 cap + 1, N, D_enc)."""
        return self._buffer(
            "enc_out", (2 * self.capacity + 1, self.num_slots, like.shape[-1]), like.dtype
        )

    def diff(self, like: Tensor) -> Tensor:
        """The condition cache's h_uncond - h_cond per image slot: (cap, L, D_dec)."""
        return self._buffer("diff", (self.capacity, *like.shape[-2:]), like.dtype)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if name not in self._buffers:
            self._buffers[name] = torch.zeros(shape, dtype=dtype, device=self.device)
        return self._buffers[name]

    @property
    def buffers(self) -> dict[str, Tensor]:
        """Every cache buffer allocated so far, by name ("enc0.k", "dec3.v", "diff", ...)."""
        return dict(self._buffers)


def _autocast_dtype(x: Tensor) -> torch.dtype:
    device = x.device.type
    if device != "meta" and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def to_device(values: list[int], device: torch.device) -> Tensor:
    """A small int64 index tensor on `device` (pinned, asynchronous copy on CUDA)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
