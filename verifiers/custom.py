"""User reward functions named `module:function` in a config, used as-is.

Two shapes, told apart by the signature:
- ours: `f(completion_text, example, **params)` returning a `Reward`, a number, a bool or None
  (None scores 0, "not applicable");
- TRL's: `f(prompts, completions, **columns) -> list[float | None]` (any function with a
  `completions` parameter), called one completion at a time: `prompts=[prompt or question]`,
  `completions=[text]` (chat-shaped when the prompt is a list of messages), every other column as
  a one-element list, plus the term's params; columns it cannot accept and TRL's trainer-only
  kwargs (`completion_ids`, `trainer_state`, ...) are left out.
Functions run in the pool's worker processes, with the pool's hard timeout.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from typing import Any

from verifiers.base import Example, Reward, VerifierError, as_reward

_RESERVED = {"prompt", "prompts", "completion", "completions"}


def split_target(target: str) -> tuple[str, str]:
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise VerifierError(f"custom reward {target!r}: expected `module:function`")
    return module, attr


def check_target(target: str) -> None:
    """Cheap check in the calling process that the module exists (the workers import it)."""
    module, _ = split_target(target)
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError) as e:
        raise VerifierError(f"custom reward {target!r}: cannot find module {module!r}: {e}") from None
    if found is None:
        raise VerifierError(f"custom reward {target!r}: module {module!r} not found (is it on PYTHONPATH?)")


def load_function(target: str) -> Callable[..., Any]:
    module_name, attr = split_target(target)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:
        raise VerifierError(f"custom reward {target!r}: importing {module_name!r} failed: {e!r}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise VerifierError(f"custom reward {target!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise VerifierError(f"custom reward {target!r} is not callable")
    return obj


def is_trl_style(fn: Callable[..., Any]) -> bool:
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _trl_call(fn: Callable[..., Any], name: str, text: str, example: Example, params: dict) -> Reward:
    prompt = example.get("prompt", example.get("question"))
    completion: Any = [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
    kwargs: dict[str, Any] = {k: [v] for k, v in example.items() if k not in _RESERVED}
    kwargs.update(params)
    sig = inspect.signature(fn)
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in sig.parameters}
    if "prompts" in sig.parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        kwargs["prompts"] = [prompt]
    values = fn(completions=[completion], **kwargs)
    if not isinstance(values, list | tuple) or len(values) != 1:
        raise TypeError(f"{name} returned {values!r}; a TRL reward function returns one value per completion")
    return as_reward(values[0], name)


def adapt(fn: Callable[..., Any], name: str) -> Callable[..., Reward]:
    """A `score(text, example, **params) -> Reward` for either accepted shape."""
    if is_trl_style(fn):
        return lambda text, example, **params: _trl_call(fn, name, text, example, params)
    return lambda text, example, **params: as_reward(fn(text, example, **params), name)
