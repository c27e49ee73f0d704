"""LoRA: train low-rank adapters (peft) and ship only them; workers merge them into base weights.

The trainer wraps its model with peft before DeepSpeed sees it (rl/trainer/lora.py), so only the
adapters train. Version 0 is the full base model; with `weights.format: lora` every later
version is the adapters alone (`adapter.safetensors`, MBs), which a worker merges into the base
(`merge_adapter`: W' = W + scaling * B @ A in fp32, cast to the rollout dtype; apply.py) and
reloads in place, so any engine works. Exports (`final/`) and full versions are merged (`merged_state_dict`).
Adapters are named `<module>.lora_A` [r, in] and `<module>.lora_B` [out, r] (`<module>`: the HF
name of the adapted linear layer); the file's metadata carries `scaling` (alpha / r). Modules
trained in full beside them (`modules_to_save`) ship under their HF names and replace the base's.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Iterator, Mapping

from torch import Tensor

from rl.config import LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER_FILE = "adapter.safetensors"


def hf_name(peft_name: str) -> str:
    """The model's own parameter name for a peft-wrapped one (adapter names keep their lora_ part;
    a trained copy of a saved module takes the module's own name)."""
    name = peft_name.removeprefix(PEFT_PREFIX)
    name = name.replace(".modules_to_save.default.", ".")
    return name.replace(".base_layer.", ".").replace(".default.", ".")


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.endswith((".lora_A", ".lora_B"))


def split_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A peft model's (gathered) state -> (base weights under HF names, adapters as `<module>.lora_A/B`
    plus trained copies of saved modules under their HF names)."""
    base, adapters = {}, {}
    for name, tensor in state.items():
        plain = hf_name(name)
        if is_adapter(plain):
            adapters[plain.removesuffix(".weight")] = tensor
        elif ".modules_to_save." in name:
            adapters[plain] = tensor
        elif ".original_module." in name:
            base[plain.replace(".original_module.", ".")] = tensor
        else:
            base[plain] = tensor
    return base, adapters


def merge_adapter(base: Mapping[str, Tensor], adapters: Mapping[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """Base weights with every adapter merged in: W + scaling * B @ A in fp32, cast back to W's dtype.

    Raises ValueError when an adapter has no base weight or shapes disagree (never a silently
    wrong model). Tensors without an adapter are returned as they are (not copied).
    """
    merged = dict(base)
    for name, tensor in adapters.items():  # saved modules: trained copies replace the base's
        if name.endswith((".lora_A", ".lora_B")):
            continue
        if name not in base or tuple(base[name].shape) != tuple(tensor.shape):
            raise ValueError(f"saved module weight {name} {tuple(tensor.shape)} does not fit the base")
        merged[name] = tensor.to(base[name].dtype)
    modules = {name.rsplit(".", 1)[0] for name in adapters if name.endswith((".lora_A", ".lora_B"))}
    for module in sorted(modules):
        a, b = adapters.get(f"{module}.lora_A"), adapters.get(f"{module}.lora_B")
        weight = base.get(f"{module}.weight")
        if a is None or b is None or weight is None:
            raise ValueError(f"adapter {module}: needs lora_A, lora_B and a base weight {module}.weight")
        if b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != tuple(weight.shape):
            raise ValueError(
                f"adapter {module}: B {tuple(b.shape)} @ A {tuple(a.shape)} does not fit weight {tuple(weight.shape)}"
            )
        delta = (b.float() @ a.float()) * scaling
        merged[f"{module}.weight"] = (weight.float() + delta).to(weight.dtype)
    return merged


def merged_state_dict(state: Mapping[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """A peft model's gathered state -> the merged model's state under the model's own names."""
    base, adapters = split_state(state)
    return merge_adapter(base, adapters, scaling)


def merged_names(peft_names: Iterable[str]) -> list[str]:
    """The merged model's tensor names, in order, for a peft model's names (adapters and the frozen
    originals of saved modules left out)."""
    out = []
    for name in peft_names:
        plain = hf_name(name)
        if is_adapter(plain) or ".original_module." in name:
            continue
        out.append(plain)
    return list(dict.fromkeys(out))


def merge_stream(items: Iterable[tuple[str, Tensor]], scaling: float) -> Iterator[tuple[str, Tensor]]:
    """Merge while streaming: (peft name, tensor) in parameter order -> (HF name, merged tensor), same order.

    peft registers an adapted layer's base weight before its lora_A and lora_B, so each base weight
    (and what follows it, to keep the order) waits only until its two adapters arrive: a layer or
    two, never the whole model.
    """
    queue: deque[list] = deque()  # [HF name, tensor or None while its adapters are missing]
    pending: dict[str, dict] = {}  # module -> {"slot": queue entry, "weight"/"lora_A"/"lora_B": tensor}
    for name, tensor in items:
        if ".original_module." in name:
            continue  # a saved module's frozen original: its trained copy is what ships
        plain = hf_name(name)
        if is_adapter(plain):
            module, part = plain.removesuffix(".weight").rsplit(".", 1)
        elif ".base_layer." in name and plain.endswith(".weight"):
            module, part = plain.removesuffix(".weight"), "weight"
            slot = [plain, None]
            queue.append(slot)
            pending.setdefault(module, {})["slot"] = slot
        else:
            queue.append([plain, tensor])
            module = None
        if module is not None:
            parts = pending.setdefault(module, {})
            parts[part] = tensor
            if {"slot", "weight", "lora_A", "lora_B"} <= parts.keys():
                del pending[module]
                merged = merge_adapter({f"{module}.weight": parts["weight"]},
                                       {f"{module}.lora_A": parts["lora_A"], f"{module}.lora_B": parts["lora_B"]},
                                       scaling)  # fmt: skip
                parts["slot"][1] = merged[f"{module}.weight"]
        while queue and queue[0][1] is not None:
            out_name, out = queue.popleft()
            yield out_name, out
    if pending or queue:
        raise ValueError(f"adapted layers without all of weight, lora_A, lora_B: {sorted(pending)[:4]}")


def adapter_metadata(cfg: LoraConfig, version: int) -> dict[str, str]:
    """safetensors metadata of an adapter file (strings only)."""
    return {
        "format": "pt",
        "policy_version": str(version),
        "scaling": repr(cfg.alpha / cfg.r),
        "lora": json.dumps(cfg.model_dump(mode="json")),
    }
