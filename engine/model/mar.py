"""The MAR transformer (LTH14/mar `models/mar.py`) as a plain nn.Module.

No sampling loop, no RNG, no `.cuda()`: device and dtype come from the inputs. Parameter names
and shapes are upstream's (timm `Block` names inside), so official checkpoints load strictly.

Token positions are passed as index tensors instead of masks: `known_idx` (B, n) lists the
positions already generated. Gathers and scatters over static-size index tensors keep the
step free of `.nonzero()` host syncs and dynamic shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model.config import MARConfig
from engine.model.diffloss import DiffLoss


class Attention(nn.Module):
    """timm-compatible multi-head self-attention (fused qkv, rows [q; k; v])."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, hd)
        return q, k, v

    def merge_heads(self, x: Tensor) -> Tensor:
        b, h, n, hd = x.shape
        return self.proj(x.transpose(1, 2).reshape(b, n, h * hd))  # (B, N, D)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Self-attention; key_mask (B, N) bool marks real tokens (padding gets no weight)."""
        q, k, v = self.qkv_heads(x)
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v, _mask(key_mask)))

    # -- cache-aware paths (MARché). Caches are token-major (R, N, H, hd) pools owned by the
    # caller; `rows` picks the calls' cache rows in them (a slice, or an index tensor), and
    # slot n of a cache row holds the K/V of that call's token n.

    def qkv_tokens(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q (B, H, n, hd) for SDPA; k, v token-major (B, n, H, hd), the cache layout."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        return q.transpose(1, 2), k, v

    def forward_fill(
        self, x: Tensor, k_pool: Tensor, v_pool: Tensor, rows: Rows, key_mask: Tensor | None
    ) -> Tensor:
        """Attention over all n tokens, storing every token's K/V in slots [0, n) of `rows`."""
        q, k, v = self.qkv_tokens(x)
        n = x.shape[1]
        k_pool[rows, :n] = k.to(k_pool.dtype)
        v_pool[rows, :n] = v.to(v_pool.dtype)
        out = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), _mask(key_mask)
        )
        return self.merge_heads(out)

    def forward_active(
        self, x: Tensor, flat_slots: Tensor, k_pool: Tensor, v_pool: Tensor, rows: Rows
    ) -> Tensor:
        """Cache-aware attention: only the active tokens x (B, n, D) get fresh Q/K/V.

        Their K/V are written into their slots (flat_slots (B*n,) = cache row * N + slot);
        their queries then attend over the rows' whole caches: fresh K/V for active tokens,
        stored K/V for cached ones. One SDPA call, exact for the given cache.
        """
        q, k, v = self.qkv_tokens(x)
        store_kv(k, v, flat_slots, k_pool, v_pool)
        keys, values = k_pool[rows].transpose(1, 2), v_pool[rows].transpose(1, 2)  # (B,H,N,hd)
        return self.merge_heads(F.scaled_dot_product_attention(q, keys, values))

    def forward_append(
        self,
        x: Tensor,
        flat_slots: Tensor,
        k_pool: Tensor,
        v_pool: Tensor,
        rows: Rows,
        end: int,
        key_mask: Tensor | None,
    ) -> Tensor:
        """The encoder's append-only cache: tokens x (B, m, D) appended at flat_slots (B*m,)
        attend over their row's cache prefix up to and including themselves: slots
        [0, end), and where rows end earlier, key_mask (B, end) marks each row's prefix."""
        q, k, v = self.qkv_tokens(x)
        store_kv(k, v, flat_slots, k_pool, v_pool)
        keys = k_pool[rows, :end].transpose(1, 2)  # (B, H, S, hd)
        values = v_pool[rows, :end].transpose(1, 2)
        out = F.scaled_dot_product_attention(q, keys, values, _mask(key_mask))
        return self.merge_heads(out)

    def forward_scored(
        self, x: Tensor, query_idx: Tensor, query_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Full attention, plus the attention each token receives from the queries at
        query_idx (B, g): softmax probabilities (fp32), mean over heads, summed over queries
        (those where query_mask (B, g) is True, if given).
        Returns (output (B, N, D), scores (B, N))."""
        q, k, v = self.qkv_heads(x)  # (B, H, N, hd)
        out = self.merge_heads(F.scaled_dot_product_attention(q, k, v))
        q_gen = torch.gather(
            q, 2, query_idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3])
        )
        logits = (q_gen.float() * self.head_dim**-0.5) @ k.float().transpose(-2, -1)  # (B,H,g,N)
        probs = logits.softmax(dim=-1).mean(dim=1)  # (B, g, N)
        if query_mask is not None:
            probs = probs * query_mask[..., None]
        return out, probs.sum(dim=1)


Rows = slice | Tensor  # a call's rows in a cache pool


def store_kv(k: Tensor, v: Tensor, flat_slots: Tensor, k_pool: Tensor, v_pool: Tensor) -> None:
    """Write token-major K/V (B, n, H, hd) into pool slots flat_slots (B*n,) = row * N + slot."""
    width = k_pool.shape[-2] * k_pool.shape[-1]
    k_pool.view(-1, width).index_copy_(0, flat_slots, k.reshape(-1, width).to(k_pool.dtype))
    v_pool.view(-1, width).index_copy_(0, flat_slots, v.reshape(-1, width).to(v_pool.dtype))


def _mask(key_mask: Tensor | None) -> Tensor | None:
    """(B, N) bool key mask -> SDPA's (B, 1, 1, N) attn_mask."""
    return None if key_mask is None else key_mask[:, None, None, :]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf GELU, as timm's default
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block with timm's parameter names."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.mlp(self.norm2(x))

    def forward_fill(
        self, x: Tensor, k_pool: Tensor, v_pool: Tensor, rows: Rows, key_mask: Tensor | None
    ) -> Tensor:
        x = x + self.attn.forward_fill(self.norm1(x), k_pool, v_pool, rows, key_mask)
        return x + self.mlp(self.norm2(x))

    def forward_active(
        self, x: Tensor, flat_slots: Tensor, k_pool: Tensor, v_pool: Tensor, rows: Rows
    ) -> Tensor:
        """Active tokens only through attention (over the cache) and the MLP."""
        x = x + self.attn.forward_active(self.norm1(x), flat_slots, k_pool, v_pool, rows)
        return x + self.mlp(self.norm2(x))

    def forward_append(
        self,
        x: Tensor,
        flat_slots: Tensor,
        k_pool: Tensor,
        v_pool: Tensor,
        rows: Rows,
        end: int,
        key_mask: Tensor | None,
    ) -> Tensor:
        x = x + self.attn.forward_append(
            self.norm1(x), flat_slots, k_pool, v_pool, rows, end, key_mask
        )
        return x + self.mlp(self.norm2(x))

    def forward_scored(
        self, x: Tensor, query_idx: Tensor, query_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        out, scores = self.attn.forward_scored(self.norm1(x), query_idx, query_mask)
        x = x + out
        return x + self.mlp(self.norm2(x)), scores


def gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, L, C) at positions idx (B, n) -> (B, n, C)."""
    return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))


class MAR(nn.Module):
    """Masked autoregressive transformer: sparse encoder, full decoder, DiffLoss head."""

    def __init__(self, config: MARConfig) -> None:
        super().__init__()
        self.config = config
        enc_d, dec_d, buf, seq = (
            config.encoder_embed_dim,
            config.decoder_embed_dim,
            config.buffer_size,
            config.seq_len,
        )
        # Construction order mirrors upstream so a seeded init consumes the RNG identically.
        self.class_emb = nn.Embedding(config.class_num, enc_d)
        self.fake_latent = nn.Parameter(torch.zeros(1, enc_d))  # the null class for CFG
        self.z_proj = nn.Linear(config.token_embed_dim, enc_d, bias=True)
        self.z_proj_ln = nn.LayerNorm(enc_d, eps=config.norm_eps)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + seq, enc_d))
        self.encoder_blocks = nn.ModuleList(
            Block(enc_d, config.encoder_num_heads, config.mlp_ratio, config.norm_eps)
            for _ in range(config.encoder_depth)
        )
        self.encoder_norm = nn.LayerNorm(enc_d, eps=config.norm_eps)
        self.decoder_embed = nn.Linear(enc_d, dec_d, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_d))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + seq, dec_d))
        self.decoder_blocks = nn.ModuleList(
            Block(dec_d, config.decoder_num_heads, config.mlp_ratio, config.norm_eps)
            for _ in range(config.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dec_d, eps=config.norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq, dec_d))
        self.initialize_weights()
        self.diffloss = DiffLoss(
            config.token_embed_dim,
            dec_d,
            config.diffloss_d,
            config.diffloss_w,
            config.num_sampling_steps,
        )

    def initialize_weights(self) -> None:
        """Upstream init: N(0, .02) embeddings, xavier linears, unit LayerNorms."""
        for p in (
            self.class_emb.weight,
            self.fake_latent,
            self.mask_token,
            self.encoder_pos_embed_learned,
            self.decoder_pos_embed_learned,
            self.diffusion_pos_embed_learned,
        ):
            nn.init.normal_(p, std=0.02)

        def init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.bias, 0)
                nn.init.constant_(m.weight, 1.0)

        self.apply(init)

    # ------------------------------------------------------------------------------------------
    # forward pieces used by the sampler (and MARché policies)

    def class_embedding(self, labels: Tensor, guided: bool) -> Tensor:
        """(B,) labels -> (B, D), or (2B, D) = [class_emb; fake_latent] for CFG."""
        emb = self.class_emb(labels)
        if guided:
            emb = torch.cat([emb, self.fake_latent.expand(len(labels), -1)])
        return emb

    def embed_known(self, tokens: Tensor, known_idx: Tensor) -> Tensor:
        """Known tokens projected, + their position embedding, LN: (B, n, D)."""
        pos = self.encoder_pos_embed_learned.expand(len(tokens), -1, -1)
        x = self.z_proj(gather_tokens(tokens, known_idx))  # (B, n, D)
        return self.z_proj_ln(x + gather_tokens(pos, self.config.buffer_size + known_idx))

    def encoder_input(self, tokens: Tensor, known_idx: Tensor, class_embedding: Tensor) -> Tensor:
        """Buffer slots (all the class embedding) then the known tokens, + pos embed, LN.

        tokens (B, L, C), known_idx (B, n), class_embedding (B, D) -> (B, buffer + n, D)
        """
        x_known = self.embed_known(tokens, known_idx)
        x_buf = (
            class_embedding[:, None, :]
            + self.encoder_pos_embed_learned[:, : self.config.buffer_size]
        )
        return torch.cat([self.z_proj_ln(x_buf).to(x_known.dtype), x_known], dim=1)

    def forward_encoder(
        self,
        tokens: Tensor,
        known_idx: Tensor,
        class_embedding: Tensor,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """Upstream `forward_mae_encoder`: only the buffer and the known tokens are seen.

        Rows with fewer known tokens than others pad known_idx and pass key_mask
        (B, buffer + n), True at real tokens; padded outputs are garbage."""
        x = self.encoder_input(tokens, known_idx, class_embedding)
        for block in self.encoder_blocks:
            x = block(x, key_mask)
        return self.encoder_norm(x)

    def decoder_input(self, x: Tensor, known_idx: Tensor) -> Tensor:
        """Encoder output scattered into a full (B, buffer + L, D) sequence of mask tokens.

        Padded entries of known_idx hold L (one past the last position): they land in a
        scratch slot that is cut off."""
        buf, seq = self.config.buffer_size, self.config.seq_len
        x = self.decoder_embed(x)  # (B, buffer + n, D)
        b, _, d = x.shape
        full = self.mask_token.to(x.dtype).expand(b, buf + seq + 1, d).clone()  # + scratch
        full[:, :buf] = x[:, :buf]
        full.scatter_(1, (buf + known_idx)[..., None].expand(-1, -1, d), x[:, buf:])
        return full[:, : buf + seq] + self.decoder_pos_embed_learned

    def decoder_output(self, x: Tensor) -> Tensor:
        """decoder_norm, drop the buffer, add the diffusion position embedding: z (B, L, D)."""
        x = self.decoder_norm(x)
        return x[:, self.config.buffer_size :] + self.diffusion_pos_embed_learned

    def decoder_output_at(self, x: Tensor, pos: Tensor) -> Tensor:
        """`decoder_output` for image positions pos (B, k) whose hidden states are x (B, k, D)."""
        pos_embed = self.diffusion_pos_embed_learned.expand(len(x), -1, -1)
        return self.decoder_norm(x) + gather_tokens(pos_embed, pos)

    def forward_decoder_hidden(self, x: Tensor, known_idx: Tensor) -> Tensor:
        """The decoder's last hidden states at the image positions, before decoder_norm:
        (B, L, D). `decoder_output_at` turns them into z."""
        x = self.decoder_input(x, known_idx)
        for block in self.decoder_blocks:
            x = block(x)
        return x[:, self.config.buffer_size :]

    def forward_decoder(self, x: Tensor, known_idx: Tensor) -> Tensor:
        """Upstream `forward_mae_decoder`: all buffer + L positions, z for every position."""
        x = self.decoder_input(x, known_idx)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_output(x)
