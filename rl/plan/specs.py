"""Model architectures without weights: what `rl plan` needs to size a run before anything is downloaded.

`resolve_architecture(name)` turns a config's `model.name` into an `Architecture`: the shape
numbers (hidden size, layers, heads, vocab, ...) and the exact parameter count of the real
model, built on the meta device (no memory, no weights). The config comes from, in order:
a local model directory's `config.json`; an offline alias of rl/models.py (the SmolLM2 alias
has a built-in spec when it is not prepared yet); the built-in specs below (the public
`config.json` values of the Qwen2.5 family, so `rl plan` works offline for them); the local
Hugging Face cache (`local_files_only`: never the network).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ArchitectureError(ValueError):
    """A model whose architecture cannot be found offline."""


_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 32768,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
}


def _qwen25(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int, tie: bool) -> dict:
    return {
        **_QWEN2,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
    }


SPECS: dict[str, dict[str, Any]] = {
    # Public config.json values of the Qwen2.5 releases (base and -Instruct share the architecture;
    # max_position_embeddings is the Instruct value).
    "Qwen/Qwen2.5-0.5B": _qwen25(896, 4864, 24, 14, 2, 151936, True),
    "Qwen/Qwen2.5-1.5B": _qwen25(1536, 8960, 28, 12, 2, 151936, True),
    "Qwen/Qwen2.5-7B": _qwen25(3584, 18944, 28, 28, 4, 152064, False),
    "Qwen/Qwen2.5-14B": _qwen25(5120, 13824, 48, 40, 8, 152064, False),
    "Qwen/Qwen2.5-32B": _qwen25(5120, 27648, 64, 40, 8, 152064, False),
    "Qwen/Qwen2.5-72B": _qwen25(8192, 29568, 80, 64, 8, 152064, False),
    # The quickstart's model (rl/models.py alias), for plans before `rl models prepare`.
    "smollm2-135m-instruct": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 8192,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
    },
}


def _spec_key(name: str) -> str | None:
    """A built-in spec for `name`: exact, case-insensitive, and `-Instruct` variants share their base's."""
    lowered = {k.lower(): k for k in SPECS}
    n = name.strip().lower()
    for candidate in (n, n.removesuffix("-instruct")):
        if candidate in lowered:
            return lowered[candidate]
    return None


@dataclass(frozen=True)
class Architecture:
    """The numbers of a decoder-only model that memory and transfer sizes depend on."""

    name: str
    source: str
    """Where the config came from (a path, 'built-in spec', 'HF cache')."""
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    params: int
    """Unique parameters of the model built on the meta device (tied embeddings counted once)."""
    largest_layer_params: int
    """Parameters of the biggest single module (what ZeRO-3 gathers at once; DeepSpeed's estimator input)."""


def _load_config(name: str, trust_remote_code: bool) -> tuple[Any, str]:
    from transformers import AutoConfig

    from rl.models import ALIASES, cache_dir, prepare_model, verify_manifest

    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ArchitectureError(f"model directory {path} has no config.json")
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), str(path / "config.json")
    if name in ALIASES:
        prepared = cache_dir() / name
        if prepared.is_dir() and verify_manifest(prepared) is None:
            return AutoConfig.from_pretrained(prepared), f"alias {name} ({prepared})"
        if name == "tiny-test":  # built offline in seconds
            return AutoConfig.from_pretrained(prepare_model(name)), f"alias {name}"
    key = _spec_key(name)
    if key is not None:
        spec = dict(SPECS[key])
        return AutoConfig.for_model(spec.pop("model_type"), **spec), f"built-in spec {key}"
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            cfg = AutoConfig.from_pretrained(name, local_files_only=True, trust_remote_code=trust_remote_code)
            return cfg, "local Hugging Face cache"
        except (OSError, ValueError):
            pass
    known = ", ".join(SPECS)
    raise ArchitectureError(
        f"unknown model {name!r}: not a local directory with a config.json, not an alias, not a built-in "
        f"spec ({known}; -Instruct variants too), and not in the local Hugging Face cache. Pass the model's "
        "directory (only its config.json is read) or run `huggingface-cli download NAME config.json` first."
    )


def count_parameters(config: Any, trust_remote_code: bool = False) -> tuple[int, int]:
    """(unique parameters, largest single module's parameters) of the model built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def resolve_architecture(name: str, trust_remote_code: bool = False) -> Architecture:
    """`model.name` -> its Architecture, offline. Raises ArchitectureError with what to do instead."""
    config, source = _load_config(name, trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        hidden = int(text.hidden_size)
        layers = int(text.num_hidden_layers)
        heads = int(text.num_attention_heads)
        vocab = int(text.vocab_size)
    except AttributeError as e:
        raise ArchitectureError(
            f"model {name!r} ({source}): not a decoder-only LM config this plan knows ({e})"
        ) from None
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    params, largest = count_parameters(config, trust_remote_code)
    return Architecture(
        name=name,
        source=source,
        model_type=str(getattr(config, "model_type", "?")),
        hidden_size=hidden,
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_position_embeddings=int(getattr(text, "max_position_embeddings", 0) or 0),
        params=params,
        largest_layer_params=largest,
    )
