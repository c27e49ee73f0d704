"""Checkpoint tensors as row ranges of a vLLM model's fused tensors (rollout_workers/engines/vllm_kernel.py).

The model here is a plain torch module laid out as vLLM lays out a decoder layer (fused `qkv_proj` and
`gate_up_proj`, a padded vocabulary); the real vLLM engine is tested in test_in_place.py. Also the fallback's
memory check (rollout_workers/engines/vllm_ext.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rollout_workers.engines.vllm_ext import room_for_a_host_copy
from rollout_workers.engines.vllm_kernel import Packed, Place, matches, places, views

Q, KV, HIDDEN, FFN, VOCAB, PADDED = 8, 4, 8, 12, 10, 16


class FusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.qkv_proj = nn.Linear(HIDDEN, Q + 2 * KV)
        self.mlp = nn.Module()
        self.mlp.gate_up_proj = nn.Linear(HIDDEN, 2 * FFN, bias=False)


class FusedModel(nn.Module):
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(PADDED, HIDDEN)
        self.model.layers = nn.ModuleList([FusedLayer()])


def checkpoint(model: FusedModel) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of `model` holds, cut out of its fused ones."""
    attn, mlp = model.model.layers[0].self_attn.qkv_proj, model.model.layers[0].mlp.gate_up_proj
    prefix = "model.layers.0."
    out = {"model.embed_tokens.weight": model.model.embed_tokens.weight.data[:VOCAB].clone()}
    for leaf in ("weight", "bias"):
        q, k, v = getattr(attn, leaf).data.split([Q, KV, KV])
        for name, t in (("q", q), ("k", k), ("v", v)):
            out[f"{prefix}self_attn.{name}_proj.{leaf}"] = t.clone()
    gate, up = mlp.weight.data.split([FFN, FFN])
    out[f"{prefix}mlp.gate_proj.weight"], out[f"{prefix}mlp.up_proj.weight"] = gate.clone(), up.clone()
    return out


def test_checkpoint_tensors_are_views_of_their_rows():
    torch.manual_seed(0)
    model = FusedModel()
    tensors = checkpoint(model)
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    mapped = places(model, shapes)
    assert mapped["model.layers.0.self_attn.v_proj.weight"] == Place("model.layers.0.self_attn.qkv_proj", "weight",
                                                                      Q + KV, KV)  # fmt: skip
    live = views(model, None, mapped, shapes)
    assert live is not None and matches(live, tensors.items()) is None
    live["model.layers.0.self_attn.k_proj.bias"][1] = 7.0  # a write lands in the fused tensor's row
    assert model.model.layers[0].self_attn.qkv_proj.bias[Q + 1] == 7.0
    assert matches(live, tensors.items()) == "model.layers.0.self_attn.k_proj.bias"


def test_plain_weights_kept_for_packed_layers_are_written_instead():
    model = FusedModel()
    tensors = checkpoint(model)
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    plain = model.model.layers[0].mlp.gate_up_proj.weight.data.clone()
    model.model.layers[0].mlp.gate_up_proj.weight = nn.Parameter(torch.empty(0), requires_grad=False)  # packed
    packed = Packed(plain={"model.layers.0.mlp.gate_up_proj": plain}, remove={"model.layers.0.mlp.gate_up_proj": True})
    live = views(model, packed, places(model, shapes), shapes)
    assert live is not None and matches(live, tensors.items()) is None
    assert live["model.layers.0.mlp.up_proj.weight"].untyped_storage().data_ptr() == plain.untyped_storage().data_ptr()


def test_tensors_that_do_not_map_give_none():
    model = FusedModel()
    tensors = checkpoint(model)
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    missing = {n: s for n, s in shapes.items() if "v_proj.weight" not in n}
    assert places(model, missing) is None  # a fused part without its sibling
    renamed = {("transformer." + n if "embed" in n else n): s for n, s in shapes.items()}
    assert views(model, None, places(model, renamed), renamed) is None  # a name the model does not have
    short = dict(shapes, **{"model.layers.0.self_attn.q_proj.weight": (Q - 2, HIDDEN)})
    assert views(model, None, places(model, short), short) is None  # fused rows that do not add up
    wide = dict(shapes, **{"model.embed_tokens.weight": (VOCAB, HIDDEN + 1)})
    assert views(model, None, places(model, wide), wide) is None


def test_a_host_copy_that_would_not_fit_is_refused(tmp_path):
    """The reload path's host copy: one per tensor-parallel rank, at most half the memory available."""
    shard = tmp_path / "model.safetensors"
    shard.write_bytes(b"\0" * 1000)
    room_for_a_host_copy([str(shard)], ranks=4, available=8000)
    with pytest.raises(MemoryError, match="host copy of the checkpoint on each of 4 rank"):
        room_for_a_host_copy([str(shard)], ranks=4, available=7999)
