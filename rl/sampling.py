"""Verifiable sampling: each completion token is a public function of its distribution and a seed.

The hub gives every completion a seed; the token at position `i` of that completion is
`draw(logits, rule, uniform(seed, i))`: the processed distribution (`processed_probs`:
temperature, top-k, top-p) is laid out over the vocabulary in token-id order and the
token whose CDF interval holds `u` is taken (inverse CDF). Workers sample this way in
every engine; the trainer, which recomputes the logits anyway, checks each token with
`check_draws`, within a tolerance `tol` on the CDF for honest numeric mismatch near an
interval boundary. Pure functions of tensors; shapes in the docstrings. See
docs/security.md for what this defeats and the measured tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SamplingRule", "check_draws", "completion_seeds", "draw", "draws", "processed_probs", "seed_tensor",
           "uniform", "uniforms"]  # fmt: skip

_MASK64 = (1 << 64) - 1
# splitmix64 (Steele, Lea, Flood 2014; the seeding generator of xoshiro): increment and multipliers.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


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


def _cdf(probs: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CDF in token-id order [R, V] and u scaled to its total [R] (absorbs the total's rounding)."""
    cdf = torch.cumsum(probs, dim=-1)
    return cdf, u.to(torch.float64) * cdf[..., -1]


def draws(logits: torch.Tensor, rule: SamplingRule, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: logits [R, V], u [R] in [0, 1) → token ids [R] int64.

    Token t is drawn iff cdf[t-1] <= u * cdf[V-1] < cdf[t] (cdf[-1] = 0): tokens of zero
    probability have empty intervals and are never drawn.
    """
    probs = processed_probs(logits, rule)
    cdf, v = _cdf(probs, u.to(probs.device))
    tokens = torch.searchsorted(cdf, v.unsqueeze(-1), right=True).squeeze(-1)
    # u * total can round up to total itself: take the last token of nonzero probability then.
    last = probs.shape[-1] - 1 - torch.flip(probs > 0, dims=[-1]).to(torch.int8).argmax(dim=-1)
    return torch.minimum(tokens, last)


def draw(logits_row: torch.Tensor, rule: SamplingRule, u: float) -> int:
    """`draws` for one row: logits [V], u in [0, 1) → the token id."""
    return int(draws(logits_row.unsqueeze(0), rule, torch.tensor([u], dtype=torch.float64))[0])


def check_draws(
    logits: torch.Tensor, tokens: torch.Tensor, u: torch.Tensor, rule: SamplingRule, *, tol: float,
    chunk_rows: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Whether each token is the seeded draw: logits [T, V] (any dtype), tokens [T], u [T].

    Returns (accepted [T] bool, distance [T] float64): distance is how far u (scaled like in
    `draws`) lies outside the token's CDF interval [cdf[t-1], cdf[t]], 0 inside; a token is
    accepted when distance <= tol. Rows are processed `chunk_rows` at a time (float64 copies
    of [chunk_rows, V]), on the logits' device.
    """
    distance = torch.empty(tokens.shape[0], dtype=torch.float64, device=logits.device)
    tokens = tokens.to(device=logits.device, dtype=torch.int64)
    u = u.to(device=logits.device, dtype=torch.float64)
    for start in range(0, tokens.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        cdf, v = _cdf(processed_probs(logits[rows], rule), u[rows])
        token = tokens[rows].unsqueeze(-1)
        hi = cdf.gather(-1, token).squeeze(-1)
        lo = torch.where(token.squeeze(-1) > 0, cdf.gather(-1, (token - 1).clamp(min=0)).squeeze(-1), 0.0)
        distance[rows] = torch.clamp(torch.maximum(lo - v, v - hi), min=0.0)
    return distance <= tol, distance
