"""Checkpoint tensors as views of the tensors a running vLLM model computes with, for deltas written in place.

vLLM fuses checkpoint tensors into one parameter (`q_proj`, `k_proj`, `v_proj` -> `qkv_proj`; `gate_proj`,
`up_proj` -> `gate_up_proj`: the model's `packed_modules_mapping`), stacked along the first dimension in
that order when there is one tensor-parallel rank. Each checkpoint tensor is then a row range of its
kernel tensor: a contiguous view that rl/weights/inplace.py can rewrite element by element.

- On a GPU the kernel tensors are the model's parameters: a delta touches only the changed elements
  (no host copy of the model, nothing reloaded).
- On CPU vLLM packs each linear layer's weight for its GEMM (oneDNN) and frees the plain one. The plain
  weights are kept (`keeping_plain_weights`, around vLLM's own load), the delta is written there, and
  each changed layer is packed again by vLLM's own dispatch (`repack`).

The row ranges are derived from the model's declared fusion, then checked once against the shards the
engine loaded, bit for bit; a model whose tensors do not map this way (more than one rank, renamed or
transformed weights) gets None and the caller reloads through vLLM instead.

Imported inside vLLM's worker processes only when a delta is applied; it imports vLLM lazily.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Place:
    """Where a checkpoint tensor lives: rows `start:start+rows` of the kernel tensor `module`.`leaf`."""

    module: str
    leaf: str
    start: int
    rows: int


@dataclass
class Packed:
    """The CPU GEMM dispatches vLLM ran while loading: module name -> its plain weight (None: vLLM kept it
    on the module) and the `remove_weight` it was dispatched with."""

    plain: dict[str, torch.Tensor | None] = field(default_factory=dict)
    remove: dict[str, bool] = field(default_factory=dict)


@contextlib.contextmanager
def keeping_plain_weights(model: torch.nn.Module) -> Iterator[Packed]:
    """Within: every CPU GEMM dispatch vLLM runs (`process_weights_after_loading`) is recorded, and the
    plain weight it would free is kept. vLLM imports the dispatch by name at each call, so replacing the
    module attribute for the duration reaches every layer; nothing else changes."""
    from vllm.model_executor.layers import utils

    names = {id(m): n for n, m in model.named_modules()}
    packed = Packed()
    dispatch = utils.dispatch_cpu_unquantized_gemm

    def recording(layer: torch.nn.Module, remove_weight: bool) -> None:
        name = names.get(id(layer))
        weight = layer.weight
        dispatch(layer, remove_weight)
        if name is not None and weight.ndim == 2 and not weight.is_meta:
            packed.plain[name] = weight.data if remove_weight and layer.weight.numel() == 0 else None
            packed.remove[name] = remove_weight

    utils.dispatch_cpu_unquantized_gemm = recording
    try:
        yield packed
    finally:
        utils.dispatch_cpu_unquantized_gemm = dispatch


def places(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, Place] | None:
    """Each checkpoint tensor's place in `model` (`shapes`: checkpoint name -> shape), or None when one has
    no place this way (its name is not the model's, the fused rows do not add up)."""
    fused_of = {}
    for fused, parts in (getattr(model, "packed_modules_mapping", None) or {}).items():
        for i, part in enumerate(parts):
            fused_of[part] = (fused, parts[:i], parts)
    out = {}
    for name, shape in shapes.items():
        module, _, leaf = name.rpartition(".")
        prefix, _, short = module.rpartition(".")
        if short in fused_of:
            fused, before, parts = fused_of[short]
            siblings = [f"{prefix}.{p}.{leaf}" if prefix else f"{p}.{leaf}" for p in parts]
            if any(s not in shapes or not shapes[s] for s in siblings):
                return None
            start = sum(shapes[s][0] for s in siblings[: len(before)])
            out[name] = Place(f"{prefix}.{fused}" if prefix else fused, leaf, start, shape[0] if shape else 0)
        else:
            out[name] = Place(module, leaf, 0, shape[0] if shape else 0)
    return out


def kernel_tensor(model: torch.nn.Module, packed: Packed | None, place: Place) -> torch.Tensor | None:
    """The tensor `place` lives in: the plain weight kept for a packed CPU layer, else the parameter."""
    if packed is not None and place.leaf == "weight" and packed.plain.get(place.module) is not None:
        return packed.plain[place.module]
    try:
        return model.get_submodule(place.module).get_parameter(place.leaf).data
    except AttributeError:
        return None


def views(
    model: torch.nn.Module, packed: Packed | None, mapped: dict[str, Place] | None, shapes: dict[str, tuple[int, ...]]
) -> dict[str, torch.Tensor] | None:
    """Checkpoint name -> a view of its rows in the kernel tensor (`mapped`: `places`), or None when one
    does not fit: its shape or layout, or the parts of a fused tensor that do not tile it exactly (a
    lone tensor may leave rows at the end: vLLM pads the vocabulary)."""
    if mapped is None:
        return None
    out: dict[str, torch.Tensor] = {}
    parts: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for name, place in mapped.items():
        tensor = kernel_tensor(model, packed, place)
        shape = shapes[name]
        if tensor is None or not shape or not tensor.is_contiguous() or tuple(tensor.shape[1:]) != tuple(shape[1:]):
            return None
        if tensor.ndim != len(shape) or place.start + place.rows > tensor.shape[0]:
            return None
        out[name] = tensor.narrow(0, place.start, place.rows)
        parts.setdefault((place.module, place.leaf), []).append((place.start, place.rows))
    for (module, leaf), ranges in parts.items():
        if len(ranges) == 1 and ranges[0][0] == 0:
            continue
        rows = kernel_tensor(model, packed, Place(module, leaf, 0, 0)).shape[0]
        ends = [0]
        for start, count in sorted(ranges):
            if start != ends[-1]:
                return None
            ends.append(start + count)
        if ends[-1] != rows:
            return None
    return out


def matches(view: dict[str, torch.Tensor], tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """None when every checkpoint tensor equals its view bit for bit, else the first that does not."""
    for name, tensor in tensors:
        here = view.get(name)
        if here is None or here.dtype != tensor.dtype or here.shape != tensor.shape:
            return name
        if not torch.equal(here.view(-1).view(torch.uint8).cpu(), tensor.reshape(-1).view(torch.uint8)):
            return name
    return None


def repack(model: torch.nn.Module, packed: Packed, written: Iterable[torch.Tensor]) -> int:
    """Pack again, by vLLM's own CPU dispatch, every layer whose weight shares storage with a `written`
    view (and the language-model head, which shares the embedding when they are tied and which vLLM's
    load never dispatches); returns how many."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    storages = {t.untyped_storage().data_ptr() for t in written}
    remove = dict(packed.remove)
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "weight") and head.weight.numel():
        remove.setdefault(next(n for n, m in model.named_modules() if m is head), False)
    count = 0
    for name, remove_weight in remove.items():
        layer = model.get_submodule(name)
        plain = packed.plain.get(name)
        weight = plain if plain is not None else layer.weight.data
        if weight.numel() == 0 or weight.untyped_storage().data_ptr() not in storages:
            continue
        if plain is not None:
            layer.weight = torch.nn.Parameter(plain, requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight)
        count += 1
    return count
