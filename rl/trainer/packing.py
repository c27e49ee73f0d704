"""Padding-free forward passes: tree-packed micro-batches and chunked log-probs.

A GRPO micro-batch is a few groups, each one prompt with completions of very different
lengths. `pack` lays it out as ONE row: each group's prompt once, followed by the completions
that share it; a 4D attention mask lets a completion token see its own prompt and the earlier
tokens of its own completion only, and position ids restart after the prompt for every
completion (tree attention, as AReaL's tree training). Nothing is padded. The lm_head then
runs only on the positions that predict a target, a checkpointed chunk at a time
(`chunked_logprobs`), so no [T, vocab] logits tensor is kept (prime-rl's chunked log-probs).
rl/trainer/strategy.py drives both, and falls back to `padded_logprobs` (rows padded to the
longest, full logits) for a model that cannot be packed. docs/operations.md: the speed knobs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

LOGIT_ELEMENTS = 2**25
"""Logits materialised per chunk (rows x vocab): 128 MiB in fp32."""

OnLogits = Callable[[slice, Tensor], None]
"""Called with (slice of the targets, their detached logits [n, V]) once per chunk of a forward, for statistics
beyond log-probs (the provenance checks) from the same logits; never again when a backward recomputes a chunk."""


@dataclass
class Packed:
    """One micro-batch as a single tree-packed row.

    `input_ids`, `position_ids` [1, L]; `attend` [L, L] bool (query i may see key j);
    `source` [N]: packed positions whose hidden state predicts a target; `targets` [N]
    the predicted token ids; `rows`, `cols` [N]: where each target sits in the
    caller's [B, T] batch (the result of a target goes to out[rows, cols]).
    """

    input_ids: Tensor
    position_ids: Tensor
    attend: Tensor
    source: Tensor
    targets: Tensor
    rows: Tensor
    cols: Tensor

    def attention_bias(self, dtype: torch.dtype) -> Tensor:
        """The mask as an additive [1, 1, L, L] bias (0 or dtype min): both the sdpa and eager backends take it."""
        bias = torch.zeros(self.attend.shape, dtype=dtype, device=self.attend.device)
        return bias.masked_fill_(~self.attend, torch.finfo(dtype).min)[None, None]

    def scatter(self, values: Tensor, shape: tuple[int, int]) -> Tensor:
        """[N] per-target values -> [B, T] (0 where no target)."""
        out = values.new_zeros(shape)
        return out.index_put((self.rows, self.cols), values)


@dataclass
class StatsRequest:
    """Per-token statistics wanted from the logits of a forward (the provenance checks, rl/trainer/provenance.py).

    `fn(logits [b, t, V], targets [b, t], u=[b, t]) -> [b, t, width]` runs without grad on each chunk of
    logits the forward produces anyway; the result lands in `out` [B, T, width] (the forward's rows, aligned like
    `token_logprobs`: position 0, padding and, with prompt sharing, prompt positions stay 0).
    """

    fn: Callable[..., Tensor]
    out: Tensor
    u: Tensor | None = None
    """[B, T] each target's seeded uniform (NaN: none), passed to `fn` as `u=`; None: not passed."""
    rows: Tensor | None = None
    """[B] bool: the rows whose statistics are wanted (None: all)."""


def pack(input_ids: Tensor, attention_mask: Tensor, prefix_lengths: Tensor) -> Packed:
    """Tree-pack right-padded rows [B, T] whose first `prefix_lengths[r]` tokens may be shared.

    Rows with the same prefix share one copy of it. Targets are the tokens at
    t in [prefix_lengths[r], length_r): with prefix length 1 that is every
    token after the first (a plain forward), with the prompt length it is the
    completion. Each prefix must be at least 1 token; a row with no token past
    its prefix contributes no target.
    """
    device = input_ids.device
    lengths = attention_mask.sum(-1).tolist()
    prefixes = [max(1, min(int(p), n)) if n > 0 else 0 for p, n in zip(prefix_lengths.tolist(), lengths, strict=True)]
    ids_list = input_ids.tolist()
    groups: dict[tuple[int, ...], list[int]] = {}
    for r, (p, n) in enumerate(zip(prefixes, lengths, strict=True)):
        if n > 0:
            groups.setdefault(tuple(ids_list[r][:p]), []).append(r)
    tokens: list[int] = []
    positions: list[int] = []
    own_start: list[int] = []  # first packed index of the block a token belongs to
    seen_start: list[int] = []  # the prefix block a suffix token also sees: [seen_start, seen_end)
    seen_end: list[int] = []
    source: list[int] = []
    targets: list[int] = []
    rows: list[int] = []
    cols: list[int] = []
    for prefix, members in groups.items():
        p, start = len(prefix), len(tokens)
        tokens += prefix
        positions += range(p)
        own_start += [start] * p
        seen_start += [0] * p
        seen_end += [0] * p
        last = start + p - 1
        for r in members:
            suffix = ids_list[r][p : lengths[r]]
            s = len(tokens)
            tokens += suffix
            positions += range(p, p + len(suffix))
            own_start += [s] * len(suffix)
            seen_start += [start] * len(suffix)
            seen_end += [start + p] * len(suffix)
            if not suffix:
                continue
            # target t (p <= t < length) is predicted by the token before it: the prefix's last, then the suffix.
            source += [last] + list(range(s, s + len(suffix) - 1))
            targets += suffix
            rows += [r] * len(suffix)
            cols += range(p, p + len(suffix))
    length = len(tokens)
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None]
    own = torch.tensor(own_start, dtype=torch.long, device=device)[:, None]
    lo = torch.tensor(seen_start, dtype=torch.long, device=device)[:, None]
    hi = torch.tensor(seen_end, dtype=torch.long, device=device)[:, None]
    attend = ((k >= own) & (k <= q)) | ((k >= lo) & (k < hi))

    def long(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return Packed(
        input_ids=long(tokens)[None],
        position_ids=long(positions)[None],
        attend=attend,
        source=long(source),
        targets=long(targets),
        rows=long(rows),
        cols=long(cols),
    )


def chunk_rows(vocab_size: int) -> int:
    """Positions per logits chunk: about `LOGIT_ELEMENTS` logits at a time."""
    return max(1, LOGIT_ELEMENTS // max(vocab_size, 1))


def _logprobs_of(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def _entropy_of(logits: Tensor, temperature: float) -> Tensor:
    logp = (logits.detach().float() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def chunked_logprobs(
    hidden: Tensor,
    lm_head: torch.nn.Module,
    targets: Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk: int | None = None,
    on_logits: OnLogits | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log softmax(lm_head(hidden) / temperature)[targets] and its entropy, a chunk of rows at a time.

    hidden [N, H], targets [N] -> fp32 [N], [N] (entropy without grad). With grad,
    each chunk is checkpointed: its logits are freed after the forward and
    recomputed in the backward, so at most one chunk of logits exists at a time. `on_logits`
    sees each chunk's logits once, in the forward.
    """
    chunk = chunk or chunk_rows(int(getattr(lm_head, "out_features", 0) or lm_head.weight.shape[0]))
    logps, ents = [], []
    for start in range(0, hidden.shape[0], chunk):
        h, tgt = hidden[start : start + chunk], targets[start : start + chunk]
        box: dict[str, Tensor] = {}

        def run(h: Tensor, tgt: Tensor = tgt, box: dict = box, part: slice = slice(start, start + len(tgt))) -> Tensor:
            logits = lm_head(h)
            if "seen" not in box:  # not again when the backward recomputes the chunk
                box["seen"] = True
                if with_entropy:
                    box["entropy"] = _entropy_of(logits, temperature)
                if on_logits is not None:
                    on_logits(part, logits.detach())
            return _logprobs_of(logits, tgt, temperature)

        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in lm_head.parameters())):
            logps.append(checkpoint(run, h, use_reentrant=False))
        else:
            logps.append(run(h))
        if with_entropy:
            ents.append(box["entropy"])
    empty = hidden.new_zeros(0, dtype=torch.float32)
    logp = torch.cat(logps) if logps else empty
    return logp, (torch.cat(ents) if ents else empty) if with_entropy else None


def logits_logprobs(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, with_entropy: bool = False,
    on_logits: OnLogits | None = None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """`chunked_logprobs` for logits that already exist ([N, V], e.g. computed inside the model's forward):
    the fp32 upcast and log-softmax temporaries stay one chunk in size."""
    chunk = chunk_rows(logits.shape[-1])
    logps, ents = [], []
    for start in range(0, logits.shape[0], chunk):
        part = logits[start : start + chunk]
        if on_logits is not None:
            on_logits(slice(start, start + part.shape[0]), part.detach())
        logps.append(_logprobs_of(part, targets[start : start + chunk], temperature))
        if with_entropy:
            ents.append(_entropy_of(part, temperature))
    empty = logits.new_zeros(0, dtype=torch.float32)
    logp = torch.cat(logps) if logps else empty
    return logp, (torch.cat(ents) if ents else empty) if with_entropy else None


def packed_logprobs(
    model: torch.nn.Module,
    packed: Packed,
    *,
    dtype: torch.dtype,
    decoder: torch.nn.Module | None,
    lm_head: torch.nn.Module | None,
    temperature: float = 1.0,
    with_entropy: bool = False,
    on_logits: OnLogits | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One forward of `model` (HF causal LM or its DeepSpeed engine) over a packed row -> per-target fp32 [N].

    With `decoder` and `lm_head` the model's forward keeps no logits (its final
    hidden states are taken from the decoder) and `chunked_logprobs` runs the head.
    Without them the head runs inside the forward on the target positions only
    (`logits_to_keep`): under multi-rank ZeRO-3 every call of a module gathers
    its parameters collectively, so the head must run exactly once per forward.
    """
    if decoder is None or lm_head is None:
        logits = _forward(model, packed, dtype, keep=packed.source).logits[0]
        return logits_logprobs(logits, packed.targets, temperature, with_entropy, on_logits)
    hidden = _final_hidden(model, decoder, packed, dtype)
    return chunked_logprobs(hidden, lm_head, packed.targets, temperature, with_entropy, on_logits=on_logits)


def _forward(model: torch.nn.Module, packed: Packed, dtype: torch.dtype, keep: Tensor) -> Any:
    return model(
        input_ids=packed.input_ids,
        attention_mask=packed.attention_bias(dtype),
        position_ids=packed.position_ids,
        logits_to_keep=keep,
        use_cache=False,
    )


def _final_hidden(model: torch.nn.Module, decoder: torch.nn.Module, packed: Packed, dtype: torch.dtype) -> Tensor:
    """[N, H] final (normed) hidden states at the target-predicting positions, through `model`'s own forward
    (DeepSpeed's hooks and autocast apply) with no logits kept."""
    box: list[Tensor] = []

    def grab(module: torch.nn.Module, args: Any, output: Any) -> None:
        box.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    handle = decoder.register_forward_hook(grab)
    try:
        _forward(model, packed, dtype, keep=packed.source[:0])
    finally:
        handle.remove()
    if len(box) != 1:
        raise RuntimeError(f"the decoder ran {len(box)} times in one forward (expected once)")
    return box[0][0, packed.source]


# --------------------------------------------------------------------------- the padded fallback
# For a model that cannot be packed (`DeepSpeedStrategy.packing_problem`).


def padded_logprobs(
    model: torch.nn.Module, ids: Tensor, mask: Tensor, length: int, temperature: float, with_entropy: bool,
    on_logits: Callable[[Tensor, int], None] | None = None,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """Rows [b, T] right-padded to their longest, one forward with full logits -> [b, length] (position 0
    and padding 0), and the entropy. `on_logits(logits [b, used - 1, V] detached, used)` sees the logits."""
    used = max(int(mask.sum(-1).max()), 1)
    ids, mask = ids[:, :used], mask[:, :used]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    if on_logits is not None:
        on_logits(logits.detach(), used)
    logp, ent = selected_logprobs(logits, ids[:, 1:], temperature, with_entropy)
    valid = mask[:, 1:].to(logp.dtype)
    logp = F.pad(logp * valid, (1, length - used))
    return logp, None if ent is None else F.pad(ent * valid, (1, length - used))


def selected_logprobs(
    logits: Tensor, targets: Tensor, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """log softmax(logits / temperature)[targets] and its (no-grad) entropy: [B, T, V], [B, T] -> [B, T].

    Full-precision logits use gather - logsumexp (one [B, T, V] temporary inside
    logsumexp); half-precision logits are upcast one row at a time, so no fp32
    [B, T, V] copy is ever materialised. Results are fp32.
    """
    full_precision = logits.dtype in (torch.float32, torch.float64)
    if full_precision:
        if temperature != 1.0:
            logits = logits / temperature
        picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        logp = (picked - torch.logsumexp(logits, dim=-1)).float()
    else:
        rows = [
            (row.float() / temperature).log_softmax(-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            for row, tgt in zip(logits, targets, strict=True)
        ]
        logp = torch.stack(rows)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            ents = []
            for row in logits:
                lsm = (row.float() / (1.0 if full_precision else temperature)).log_softmax(-1)
                ents.append(-(lsm.exp() * lsm).sum(-1))
            entropy = torch.stack(ents)
    return logp, entropy


# --------------------------------------------------------------------------- statistics from a forward's logits


def packed_stats_hook(stats: StatsRequest, rows: slice, packed: Packed) -> Callable[[slice, Tensor], None]:
    """`on_logits` of a packed forward over `rows` of the request: `stats.fn` on each chunk of target logits."""
    out = stats.out[rows]
    u = None if stats.u is None else stats.u[rows]
    want = None if stats.rows is None else stats.rows[rows].to(packed.rows.device)

    def hook(part: slice, logits: Tensor) -> None:
        r, c, targets = packed.rows[part], packed.cols[part], packed.targets[part]
        if want is not None:
            keep = want[r]
            if not bool(keep.any()):
                return
            r, c, targets, logits = r[keep], c[keep], targets[keep], logits[keep]
        kw = {} if u is None else {"u": u[r, c][None]}
        with torch.no_grad():
            out[r, c] = stats.fn(logits[None], targets[None], **kw)[0].float()

    return hook


def padded_stats_hook(stats: StatsRequest, rows: slice, ids: Tensor, mask: Tensor) -> Callable[[Tensor, int], None]:
    """`on_logits` of a padded forward over `rows` of the request (logits [b, used - 1, V])."""
    out = stats.out[rows]
    want = torch.ones(ids.shape[0], dtype=torch.bool) if stats.rows is None else stats.rows[rows].cpu()

    def hook(logits: Tensor, used: int) -> None:
        if not bool(want.any()):
            return
        idx = want.nonzero().squeeze(-1).to(logits.device)
        kw = {} if stats.u is None else {"u": stats.u[rows][idx, 1:used]}
        with torch.no_grad():
            values = stats.fn(logits[idx], ids[idx, 1:used], **kw) * mask[idx, 1:used, None].to(torch.float32)
        out[idx, 1:used] = values.float()

    return hook
