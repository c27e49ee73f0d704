"""Verifiable sampling: each completion token is a public function of its distribution and a seed.

The hub gives every completion a seed; the token at position `i` of that completion is
`draw(logits, rule, uniform(seed, i))`: a Gumbel-max race. Every token t of the vocabulary gets
a keyed Gumbel noise g_t (`gumbels`, a hash of (u, t)); the draw is the token of the processed
distribution (`processed_probs`: temperature, top-k, top-p) with the largest logit / T + g_t,
which is exactly a sample of that distribution. Workers sample this way in every engine; the
trainer, which recomputes the logits anyway, checks each token with `check_draws`: the distance
is how far, in raw-logit nats, the token's score falls short of the race's winner (0 for the
winner). A race compares two tokens' logits only, so honest numeric mismatch (a bf16 worker, an
fp32 trainer) moves a distance by the two logits' errors, never by errors summed over the
vocabulary; and a tolerance `tol` lets a token pass with probability at most exp(tol / T) times
its own. Pure functions of tensors; shapes in the docstrings. See docs/security.md.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["SamplingRule", "check_draws", "completion_seeds", "draw", "draws", "gumbels", "processed_probs",
           "seed_tensor", "token_gumbel", "uniform", "uniforms"]  # fmt: skip

_MASK64 = (1 << 64) - 1
# splitmix64 (Steele, Lea, Flood 2014; the seeding generator of xoshiro): increment and multipliers.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# lowbias32 (C. Wellons' 32-bit integer hash): multipliers; the per-token noise is 32-bit (fast on any device).
_MASK32 = (1 << 32) - 1
_LOW1 = 0x7FEB352D
_LOW2 = 0x846CA68B
_GOLDEN32 = 0x9E3779B9


def _signed(x: int) -> int:
    """The int64 with the same 64 bits as `x` (mod 2**64)."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _splitmix64(x: int) -> int:
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def completion_seeds(run_seed: int, task_id: int, n: int) -> list[int]:
    """The seeds of a task's `n` completions, fixed by the hub (the same whenever the task is leased again):
    splitmix64 of (run seed, task id, index), as non-negative int64 so that any JSON reader keeps them exact."""
    base = _splitmix64((run_seed & _MASK64) ^ _splitmix64(task_id & _MASK64))
    return [_splitmix64((base + j * _GOLDEN) & _MASK64) >> 1 for j in range(n)]


def uniform(seed: int, position: int) -> float:
    """u in [0, 1) for token `position` (0-based, in the completion) of the completion seeded `seed`.

    u = top 53 bits of splitmix64(splitmix64(seed) + position * 0x9E3779B97F4A7C15) / 2**53, all
    arithmetic mod 2**64 (seed and position are taken mod 2**64). Bit-identical to `uniforms`.
    """
    key = _splitmix64(seed & _MASK64)
    return (_splitmix64((key + (position & _MASK64) * _GOLDEN) & _MASK64) >> 11) * 2.0**-53


def _srl(z: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's `>>` is arithmetic)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def _splitmix64_t(x: torch.Tensor) -> torch.Tensor:
    # int64 add and multiply wrap mod 2**64 (two's complement), like the masked Python ints above.
    z = x + _signed(_GOLDEN)
    z = (z ^ _srl(z, 30)) * _signed(_MIX1)
    z = (z ^ _srl(z, 27)) * _signed(_MIX2)
    return z ^ _srl(z, 31)


def seed_tensor(seeds: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeds (any ints, taken mod 2**64) → [N] int64 holding their bits, as `uniforms` takes them."""
    return torch.tensor([_signed(s) for s in seeds], dtype=torch.int64, device=device)


def uniforms(seeds: torch.Tensor | int, positions: torch.Tensor) -> torch.Tensor:
    """`uniform` vectorised: seeds [N] (or one int) and positions [N], int64 → u [N] float64.

    An int seed may be anything mod 2**64; a tensor holds seeds as int64 bits (`seed_tensor`).
    """
    if isinstance(seeds, int):
        seeds = torch.tensor(_signed(seeds), dtype=torch.int64, device=positions.device)
    key = _splitmix64_t(seeds.to(torch.int64))
    h = _splitmix64_t(key + positions.to(torch.int64) * _signed(_GOLDEN))
    return _srl(h, 11).to(torch.float64) * 2.0**-53


@dataclass(frozen=True)
class SamplingRule:
    """How logits become the distribution drawn from (the sampling params of a task)."""

    temperature: float
    """<= 0: greedy (argmax, the lowest id on ties)."""
    top_k: int = -1
    """Keep the k most likely tokens (ties: lowest ids first); <= 0 or >= vocab: all."""
    top_p: float = 1.0
    """Keep the most likely tokens, in the top-k order, while the mass before each is < top_p; >= 1: all."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def processed_probs(logits: torch.Tensor, rule: SamplingRule) -> torch.Tensor:
    """The distribution drawn from: logits [R, V] (any float dtype) → probabilities [R, V] float64.

    z = logits / temperature (in float64); the top_k largest z stay (a stable descending sort:
    equal z rank by token id); in that order, a token stays while the softmax mass of those
    before it is < top_p (the first always stays); softmax over what stays, 0 elsewhere.
    Greedy rules give a one-hot row at the argmax.
    """
    x = logits.to(torch.float64)
    if rule.greedy:
        out = torch.zeros_like(x)
        return out.scatter_(-1, x.argmax(dim=-1, keepdim=True), 1.0)
    z = x / rule.temperature
    vocab = z.shape[-1]
    k = rule.top_k if 0 < rule.top_k < vocab else vocab
    if k == vocab and rule.top_p >= 1.0:
        return torch.softmax(z, dim=-1)
    sorted_z, order = torch.sort(z, dim=-1, descending=True, stable=True)
    sorted_z, order = sorted_z[..., :k], order[..., :k]
    p = torch.softmax(sorted_z, dim=-1)
    if rule.top_p < 1.0:
        cum = torch.cumsum(p, dim=-1)
        before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)
        keep = before < rule.top_p
        keep[..., 0] = True
        p = torch.where(keep, p, 0.0)
        p = p / p.sum(dim=-1, keepdim=True)
    return torch.zeros_like(z).scatter_(-1, order, p)


def _lowbias32(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _LOW1) & _MASK32
    x ^= x >> 15
    x = (x * _LOW2) & _MASK32
    return x ^ (x >> 16)


def _row_key(u: float) -> int:
    """The 32-bit key of one position's noise: low 32 bits of splitmix64 of u's 53 bits."""
    return _splitmix64(int(u * 2.0**53)) & _MASK32


def token_gumbel(u: float, token: int) -> float:
    """The Gumbel noise of `token` at the position whose seeded uniform is `u` (the reference for `gumbels`).

    h = lowbias32(lowbias32(token * 0x9E3779B9) xor key), key = `_row_key(u)`, all mod 2**32;
    w = ((h mod 2**31) + 1/2) / 2**31 in (0, 1); g = -log(-log1p(-w)). Engines compute it in float32.
    """
    h = _lowbias32(_lowbias32(token * _GOLDEN32) ^ _row_key(u))
    w = ((h & 0x7FFFFFFF) + 0.5) * 2.0**-31
    return -math.log(-math.log1p(-w))


def _i32(x: torch.Tensor) -> torch.Tensor:
    """int64 holding values in [0, 2**32) -> int32 with the same 32 bits."""
    x = x & _MASK32
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def _lowbias32_t(x: torch.Tensor) -> torch.Tensor:
    # int32 multiply wraps mod 2**32 (two's complement); `>>` is arithmetic, so mask the shifted-in bits.
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _LOW1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * (_LOW2 - (1 << 32))
    return x ^ ((x >> 16) & 0xFFFF)


@functools.lru_cache(maxsize=8)
def _token_keys(vocab: int, device: torch.device) -> torch.Tensor:
    """[V] int32: lowbias32(token * 0x9E3779B9), the per-token half of the noise hash."""
    return _lowbias32_t(_i32(torch.arange(vocab, dtype=torch.int64, device=device) * _GOLDEN32))


def gumbels(u: torch.Tensor, vocab: int) -> torch.Tensor:
    """`token_gumbel` vectorised: u [R] float64 (each position's seeded uniform) -> noise [R, V] float32."""
    keys = _i32(_splitmix64_t((u.to(torch.float64) * 2.0**53).to(torch.int64)))
    h = _lowbias32_t(_token_keys(vocab, u.device).unsqueeze(0) ^ keys.unsqueeze(-1))
    w = (h & 0x7FFFFFFF).to(torch.float32).add_(0.5).mul_(2.0**-31)
    return w.neg_().log1p_().neg_().log_().neg_()


def _truncated(rule: SamplingRule, vocab: int) -> bool:
    return 0 < rule.top_k < vocab or rule.top_p < 1.0


def draws(logits: torch.Tensor, rule: SamplingRule, u: torch.Tensor) -> torch.Tensor:
    """Seeded draws: logits [R, V], u [R] in [0, 1) -> token ids [R] int64.

    The token with the largest logits / temperature + gumbels(u) among those the rule keeps
    (`processed_probs` > 0); greedy rules take the argmax of the logits (the lowest id on ties).
    """
    if rule.greedy:
        return logits.to(torch.float64).argmax(dim=-1)
    scores = logits.to(torch.float32) / rule.temperature
    scores += gumbels(u.to(logits.device), logits.shape[-1])
    if _truncated(rule, logits.shape[-1]):
        scores.masked_fill_(processed_probs(logits, rule) == 0, float("-inf"))
    return scores.argmax(dim=-1)


def draw(logits_row: torch.Tensor, rule: SamplingRule, u: float) -> int:
    """`draws` for one row: logits [V], u in [0, 1) -> the token id."""
    return int(draws(logits_row.unsqueeze(0), rule, torch.tensor([u], dtype=torch.float64))[0])


def _sorted_mass(z: torch.Tensor, rule: SamplingRule):
    """z [R, V] in the rule's order: (sorted z, order, rank of each token, top-k size, the top-k set's
    softmax mass before each rank (1 past the top-k set))."""
    vocab = z.shape[-1]
    k = rule.top_k if 0 < rule.top_k < vocab else vocab
    sorted_z, order = torch.sort(z, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(vocab, device=z.device).expand_as(order))
    p = torch.softmax(sorted_z[..., :k], dim=-1)
    before = torch.cat([p.cumsum(-1) - p, torch.ones_like(sorted_z[..., k:])], dim=-1)
    return sorted_z, order, rank, k, before


_NEAR_RANKS = 16
"""How many of the next-ranked tokens `_margins` lets move above a kept token (near ties at the top-p edge)."""


def _margins(z: torch.Tensor, rule: SamplingRule) -> torch.Tensor:
    """[R, V] how far (nats of z = logits / T) each kept token lies inside the rule's top-k / top-p set:
    the least d such that moving logits by d could drop it. top-k: z minus the (k+1)-th largest z.
    top-p: tokens up to d below it may move above it and the mass above it may grow by e^d; it drops
    once that mass reaches top_p (the next `_NEAR_RANKS` ranks are tried). Not meaningful outside."""
    sorted_z, order, rank, k, before = _sorted_mass(z, rule)
    vocab = z.shape[-1]
    margin = torch.full_like(z, float("inf"))
    if k < vocab:
        margin = z - sorted_z[..., k : k + 1]
    if rule.top_p < 1.0:
        n = min(int((before < rule.top_p).sum(-1).max()), vocab)  # the widest kept set of these rows
        probs = torch.cat([before[..., 1:k] - before[..., : k - 1], 1.0 - before[..., k - 1 : k],
                           torch.zeros_like(before[..., k:])], dim=-1)  # fmt: skip
        inside = torch.full_like(sorted_z[..., :n], float("inf"))
        for offset in range(_NEAR_RANKS + 1):
            j = (torch.arange(n, device=z.device) + offset).clamp(max=vocab - 1)
            mass = before[..., j] + probs[..., j] - probs[..., :n]  # ranks <= j but the token itself
            need = torch.maximum(sorted_z[..., :n] - sorted_z[..., j], torch.log(rule.top_p / mass.clamp(min=1e-300)))
            inside = torch.minimum(inside, need)
        by_rank = torch.cat([inside, torch.full_like(sorted_z[..., n:], -1.0)], dim=-1)
        margin = torch.minimum(margin, torch.empty_like(by_rank).scatter_(-1, order, by_rank))
    return margin


def _outside(z: torch.Tensor, token: torch.Tensor, rule: SamplingRule) -> torch.Tensor:
    """[R] how far (nats of z) `token` [R] lies outside the top-k / top-p set, 0 inside: the least d
    such that moving logits by d could keep it. top-k: the k-th largest z minus its z. top-p: the
    tokens more than d above it must have a mass below top_p x e^d (their mass can shrink by e^-d)."""
    sorted_z, _, rank, k, before = _sorted_mass(z, rule)
    mine, my_rank = z.gather(-1, token.unsqueeze(-1)), rank.gather(-1, token.unsqueeze(-1))
    out = torch.zeros_like(mine.squeeze(-1))
    if k < z.shape[-1]:
        out = torch.maximum(out, (sorted_z[..., k - 1 : k] - mine).squeeze(-1))
    if rule.top_p < 1.0:
        # the tokens above rank j stay above, ranks j..its own may fall below it: d >= z_(j) - z, log(C_j / p)
        need = torch.maximum(sorted_z - mine, torch.log(before.clamp(min=1e-300) / rule.top_p))
        ranks = torch.arange(z.shape[-1], device=z.device)
        out = torch.maximum(out, need.masked_fill(ranks > my_rank, float("inf")).amin(-1))
    return out.clamp(min=0.0)


def check_draws(
    logits: torch.Tensor, tokens: torch.Tensor, u: torch.Tensor, rule: SamplingRule, *, tol: float,
    chunk_rows: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Whether each token is the seeded draw: logits [T, V] (any dtype), tokens [T], u [T].

    Returns (accepted [T] bool, distance [T] float64): distance = T x (the race winner's score - the
    token's score), scores = logits / T + gumbels(u); greedy: the max logit - the token's. Under top-k
    / top-p, a kept token s beating it counts min(its lead, how far s lies inside the kept set), and a
    token outside the kept set is at least as far off as it lies outside (`_outside`): so a worker whose
    logits are all within eps of the trainer's is at distance <= 2 eps (top-p: about).
    In raw-logit nats, so a tolerance reads like a logit mismatch at any temperature. Accepted when
    distance <= tol: for honest workers, when the two logits' numeric errors stay under tol; for an
    operator, a chosen token passes with probability at most exp(tol / T) times its probability.
    Rows are processed `chunk_rows` at a time (float64 copies of [chunk_rows, V]).
    """
    distance = torch.empty(tokens.shape[0], dtype=torch.float64, device=logits.device)
    tokens = tokens.to(device=logits.device, dtype=torch.int64)
    u = u.to(device=logits.device, dtype=torch.float64)
    for start in range(0, tokens.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        x, token = logits[rows].to(torch.float64), tokens[rows].unsqueeze(-1)
        if rule.greedy:
            distance[rows] = x.amax(-1) - x.gather(-1, token).squeeze(-1)
            continue
        z = x / rule.temperature
        scores = z + gumbels(u[rows], x.shape[-1]).to(torch.float64)
        mine = scores.gather(-1, token).squeeze(-1)
        gap = scores - mine.unsqueeze(-1)  # [r, V] how far each token beats this one
        if _truncated(rule, x.shape[-1]):
            # a kept token that beats this one excuses it by as little as it lies inside the kept set (the
            # worker may not have kept it); a token outside the kept set is as far off as it lies outside.
            kept, margin = processed_probs(x, rule) > 0, _margins(z, rule)
            excused = torch.minimum(gap, margin.clamp(min=0.0)).masked_fill(~kept, float("-inf")).amax(-1)
            gap = torch.maximum(excused, _outside(z, token.squeeze(-1), rule))
        else:
            gap = gap.amax(-1)
        distance[rows] = rule.temperature * gap.clamp(min=0.0)
    return distance <= tol, distance
