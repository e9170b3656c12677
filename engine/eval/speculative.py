"""A self-speculative exact diffusion head, measured: what an exact-distribution mode can and
cannot save in MAR (issue 33, item 3; `marche speculative`, docs/ENGINE.md "Speculative").

The head samples a token by a DDPM chain x_T -> ... -> x_0 whose transitions are Gaussians,
x_{i-1} ~ N(A_i x_i + B_i eps(x_i), (exp(P_i + Q_i v(x_i)) temperature)^2), so the density of
every transition is known and speculative sampling (Leviathan et al.; CSpD for continuous
tokens) applies transition by transition:

1. from a state whose exact (eps, v) is known, take the exact transition, then draft up to
   `gamma - 1` more with that stale (eps, v) (no MLP call: a free draft);
2. evaluate the exact MLP at every drafted state in one batched call;
3. accept each drafted transition with probability min(1, p / q); at the first rejection,
   draw the state from the residual max(0, p - q) (rejection from p, accepting with
   probability 1 - q / p: both means are known, so a retry costs random numbers only) and
   drop the rest of the draft. The final step (no noise) is always the exact mean.

The chain's distribution is then exactly the head's (`two_sample_test` checks it, with the
unverified draft as the control that must fail). What it saves is *sequential* MLP calls
(rounds), never MLP evaluations: every state the chain visits is evaluated exactly, and the
rejected tails are evaluated for nothing. The transformer is the same: a MAR step's tokens
condition on the previous step's, through bidirectional attention over the known set, so
verifying a drafted step needs that step's own full pass (one pass cannot serve two known
sets, as a causal LM's one pass serves every prefix). So no exact mode has fewer FLOPs than
exact MAR; it can only trade depth for width, which pays where a step is latency-bound (a
GPU at small batch), not on a compute-bound CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy import stats
from torch import Tensor

from engine.decode.passes import head as head_pass
from engine.decode.policy import make_policy
from engine.decode.units.common import DecodeUnits, UnitStats
from engine.model.diffloss import DiffLoss


@dataclass
class ChainStats:
    """What a batch of chains cost: sequential exact MLP calls and exact rows evaluated."""

    tokens: int
    steps: int  # T, the DDPM steps of one chain
    rounds: int = 0  # sequential exact MLP calls, summed over tokens (exact sampling: T each)
    rows: int = 0  # exact MLP rows evaluated, summed over tokens (exact sampling: T per token)
    proposed: int = 0  # drafted transitions checked
    accepted: int = 0

    def to_dict(self) -> dict:
        exact_rows = self.tokens * self.steps
        return {
            "tokens": self.tokens,
            "ddpm_steps": self.steps,
            "sequential_calls_per_token": self.rounds / self.tokens,
            "sequential_calls_vs_exact": self.rounds / exact_rows,
            "mlp_rows_vs_exact": self.rows / exact_rows,
            "acceptance": self.accepted / max(1, self.proposed),
        }


class Head:
    """The exact head's pieces for rows at their own diffusion index: (eps, v) and the
    transition's mean and std. z (K, D) or (2K, D) = [cond; uncond] with cfg (K,)."""

    def __init__(self, head: DiffLoss, z: Tensor, cfg: Tensor | None, temperature: float):
        self.net, self.z, self.cfg, self.temperature = head.net, z, cfg, temperature
        terms = head.gen_schedule.step_terms(z.device)
        self.table, self.timesteps = terms.table, terms.timestep_map  # (T, 4): A, B, P, Q
        self.num_t, self.k = len(self.table), len(z) if cfg is None else len(z) // 2

    def eps(self, x: Tensor, index: Tensor, token: Tensor) -> tuple[Tensor, Tensor]:
        """Exact (eps, v) (N, C) at states x (N, C), diffusion indices and token ids (N,)."""
        t = self.timesteps[index]
        if self.cfg is None:
            out = self.net(x, t, self.z[token])
        else:
            out = self.net(torch.cat([x, x]), torch.cat([t, t]),
                           torch.cat([self.z[token], self.z[self.k + token]]))  # fmt: skip
        eps, v = out.float().split(self.net.in_channels, dim=1)
        if self.cfg is not None:
            cond, uncond = eps.chunk(2)
            eps, v = torch.lerp(uncond, cond, self.cfg[token][:, None]), v[: len(x)]
        return eps, v

    def transition(self, x: Tensor, eps: Tensor, v: Tensor, index: Tensor):
        """Mean and std (N, C) of x_{i-1} given x_i, (eps, v) and i (N,)."""
        a, b, p, q = self.table[index].unbind(1)
        mean = a[:, None] * x + b[:, None] * eps
        return mean, torch.exp(p[:, None] + q[:, None] * v) * self.temperature


def log_normal(y: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(y; mean, diag std^2) summed over channels, up to a constant: (N,)."""
    return (-0.5 * ((y - mean) / std) ** 2 - std.log()).sum(-1)


@torch.no_grad()
def exact_chains(head: Head, token: Tensor, g: torch.Generator) -> Tensor:
    """x_0 (N, C) of exact chains for token ids (N,): T sequential calls."""
    n, c = len(token), head.net.in_channels
    x = torch.randn(n, c, generator=g, device=token.device)
    for i in reversed(range(head.num_t)):
        index = torch.full((n,), i, dtype=torch.long, device=token.device)
        eps, v = head.eps(x, index, token)
        mean, std = head.transition(x, eps, v, index)
        x = mean if i == 0 else mean + std * torch.randn(n, c, generator=g, device=x.device)
    return x


@torch.no_grad()
def speculative_chains(
    head: Head, token: Tensor, g: torch.Generator, gamma: int = 4, verify: bool = True
) -> tuple[Tensor, ChainStats]:
    """x_0 (N, C) of speculative chains for token ids (N,); `verify=False` is the draft
    alone (every drafted transition kept: the control that is *not* exact)."""
    n, c, dev = len(token), head.net.in_channels, token.device
    st = ChainStats(n, head.num_t)
    x = torch.randn(n, c, generator=g, device=dev)
    index = torch.full((n,), head.num_t - 1, dtype=torch.long, device=dev)
    eps, v = head.eps(x, index, token)
    st.rounds, st.rows = n, n
    out, live = torch.empty_like(x), torch.ones(n, dtype=torch.bool, device=dev)
    while live.any():
        rows = live.nonzero().flatten()
        xs, i0, e0, v0, tok = x[rows], index[rows], eps[rows], v[rows], token[rows]
        mean, std = head.transition(xs, e0, v0, i0)  # the exact first transition
        last = i0 == 0
        out[rows[last]] = mean[last]  # the final step: the exact mean, no noise
        live[rows[last]] = False
        keep = ~last
        rows, xs, i0, e0, v0, tok = rows[keep], xs[keep], i0[keep], e0[keep], v0[keep], tok[keep]
        if len(rows) == 0:
            break
        mean, std = mean[keep], std[keep]
        # states s_1..s_m at indices i0-1 .. i0-m >= 0: every drafted transition is a noisy one
        m = torch.minimum(torch.full_like(i0, gamma), i0)
        states = [mean + std * torch.randn(mean.shape, generator=g, device=dev)]
        drafts = []  # (mean_q, std_q) of the transition s_j -> s_{j+1}
        for j in range(1, gamma):
            idx = (i0 - j).clamp(min=0)
            mq, sq = head.transition(states[-1], e0, v0, idx)
            drafts.append((mq, sq))
            states.append(mq + sq * torch.randn(mq.shape, generator=g, device=dev))
        s = torch.stack(states, 1)  # (R, gamma, C)
        valid = torch.arange(gamma, device=dev)[None] < m[:, None]  # (R, gamma)
        s_index = (i0[:, None] - 1 - torch.arange(gamma, device=dev)[None]).clamp(min=0)
        flat_rows = valid.nonzero()
        ev, vv = head.eps(
            s[flat_rows[:, 0], flat_rows[:, 1]],
            s_index[flat_rows[:, 0], flat_rows[:, 1]],
            tok[flat_rows[:, 0]],
        )
        st.rounds += len(rows)  # one sequential call per chain in this round
        st.rows += len(flat_rows)
        e_all = torch.zeros(*s.shape, device=dev)
        v_all = torch.zeros(*s.shape, device=dev)
        e_all[flat_rows[:, 0], flat_rows[:, 1]] = ev
        v_all[flat_rows[:, 0], flat_rows[:, 1]] = vv
        # accept s_j -> s_{j+1} for j = 1 .. m-1, in order
        accepted = torch.zeros(len(rows), dtype=torch.long, device=dev)
        going = torch.ones(len(rows), dtype=torch.bool, device=dev)
        reject_at = torch.full((len(rows),), -1, dtype=torch.long, device=dev)
        for j in range(gamma - 1):
            checked = going & (j + 1 < m)
            if not checked.any():
                break
            mp, sp = head.transition(s[:, j], e_all[:, j], v_all[:, j], s_index[:, j])
            mq, sq = drafts[j]
            y = s[:, j + 1]
            log_ratio = log_normal(y, mp, sp) - log_normal(y, mq, sq)
            u = torch.rand(len(rows), generator=g, device=dev)
            ok = u.log() < log_ratio if verify else torch.ones_like(checked)
            st.proposed += int(checked.sum())
            st.accepted += int((checked & ok).sum())
            reject_at = torch.where(checked & ~ok, j, reject_at)
            accepted += (checked & ok).long()
            going = checked & ok
        r = torch.arange(len(rows), device=dev)
        kept = reject_at < 0  # every drafted transition kept: go on from s_m, exact eps known
        a = accepted[kept]
        x[rows[kept]], index[rows[kept]] = s[r[kept], a], s_index[r[kept], a]
        eps[rows[kept]], v[rows[kept]] = e_all[r[kept], a], v_all[r[kept], a]
        if kept.all():
            continue
        rj, j = r[~kept], reject_at[~kept]  # the rejected transition s_j -> s_{j+1}
        mp, sp = head.transition(s[rj, j], e_all[rj, j], v_all[rj, j], s_index[rj, j])
        mq = torch.stack([d[0] for d in drafts], 1)[rj, j]
        sq = torch.stack([d[1] for d in drafts], 1)[rj, j]
        new = rows[rj]
        x[new], index[new] = residual(mp, sp, mq, sq, g), s_index[rj, j + 1]
        eps[new], v[new] = head.eps(x[new], index[new], token[new])  # its exact eval
        st.rounds, st.rows = st.rounds + len(new), st.rows + len(new)
    return out, st


def residual(mp: Tensor, sp: Tensor, mq: Tensor, sq: Tensor, g: torch.Generator) -> Tensor:
    """A draw per row from max(0, p - q) normalised, p = N(mp, sp^2), q = N(mq, sq^2):
    rejection from p, accepting with probability 1 - q/p (random numbers only, no MLP)."""
    y = torch.empty_like(mp)
    todo = torch.ones(len(mp), dtype=torch.bool, device=mp.device)
    while todo.any():
        m, s_, mq_, sq_ = mp[todo], sp[todo], mq[todo], sq[todo]
        draw = m + s_ * torch.randn(m.shape, generator=g, device=m.device)
        u = torch.rand(len(draw), generator=g, device=m.device)
        ratio = torch.exp(log_normal(draw, mq_, sq_) - log_normal(draw, m, s_)).clamp(max=1)
        ok = u < 1 - ratio
        rows = todo.nonzero().flatten()
        y[rows[ok]] = draw[ok]
        todo[rows[ok]] = False
    return y


def two_sample_test(a: Tensor, b: Tensor) -> float:
    """The smallest Bonferroni-corrected p-value of per-channel two-sample Kolmogorov-Smirnov
    tests between samples a and b (N, C)."""
    c = a.shape[1]
    p = [float(stats.ks_2samp(a[:, j].numpy(), b[:, j].numpy()).pvalue) for j in range(c)]
    return min(1.0, min(p) * c)


def worst_p(exact: Tensor, other: Tensor, token: Tensor) -> float:
    """`two_sample_test` per token id, the smallest p-value, Bonferroni over tokens."""
    ids = token.unique()
    ps = [two_sample_test(exact[token == t], other[token == t]) for t in ids]
    return min(1.0, min(ps) * len(ps))


class CapturingHead:
    """A head unit (the `Unit` protocol) that runs the eager pass and keeps the conditions
    of the calls at `steps` (the AR step of each call, counted from 0)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.calls, self.seen = steps, [], 0
        self.stats = UnitStats("capturing", (1,))

    def can_run(self, *args) -> bool:
        return True

    def run(self, head: DiffLoss, plan, z, x_T, step_noise, temperature, cfg) -> Tensor:
        if self.seen in self.steps:
            self.calls.append((self.seen, z.clone(), None if cfg is None else cfg[:, 0].clone()))
        self.seen += 1
        return head_pass.sample(head, plan, z, x_T, step_noise, temperature, cfg)


@torch.no_grad()
def measure(
    pipe,
    class_id: int = 3,
    seed: int = 0,
    ar_steps: tuple[int, ...] = (0, 32, 96),
    tokens_per_step: int = 4,
    samples: int = 1000,
    gammas: tuple[int, ...] = (2, 4, 8),
) -> dict:
    """Exact chains against speculative ones (and the unverified draft) for real conditions:
    the head's z at `ar_steps` of an exact MAR run of (class_id, seed) with the model's
    defaults, `tokens_per_step` tokens each, `samples` chains per token and method."""
    capture = CapturingHead(set(ar_steps))
    units, pipe.units = pipe.units, DecodeUnits(head=capture)
    try:
        pipe.generate_tokens([class_id], [seed], policy=make_policy("mar"))
    finally:
        pipe.units = units
    g = torch.Generator().manual_seed(seed)
    rows = []
    for step, z, cfg in capture.calls:
        k = len(z) if cfg is None else len(z) // 2
        pick = torch.arange(min(tokens_per_step, k))
        zs = z[pick] if cfg is None else torch.cat([z[pick], z[k + pick]])
        head = Head(pipe.model.diffloss, zs, None if cfg is None else cfg[pick], 1.0)
        token = pick.repeat_interleave(samples)
        exact = exact_chains(head, token, g)

        for gamma in gammas:
            spec, st = speculative_chains(head, token, g, gamma)
            rows.append({"ar_step": step, "gamma": gamma, "verified": True,
                         "p_value": worst_p(exact, spec, token), **st.to_dict()})  # fmt: skip
        draft, st = speculative_chains(head, token, g, max(gammas), verify=False)
        rows.append({"ar_step": step, "gamma": max(gammas), "verified": False,
                     "p_value": worst_p(exact, draft, token), **st.to_dict()})  # fmt: skip
    return {"class_id": class_id, "seed": seed, "samples_per_token": samples, "rows": rows}
