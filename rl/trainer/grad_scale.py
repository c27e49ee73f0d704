"""A DeepSpeed step that scales the gradients accumulated since the last one (`DeepSpeedStrategy.step`).

The shared-forward checks (rl/trainer/verify.py) learn a token-normalised loss's divisor only after the
backwards; multiplying the accumulated gradients by `grad_scale` before the step is the same as having
multiplied every loss by it. Where the gradients wait depends on the engine's optimizer wrapper.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def plain_gradients(opt, client_optimizer, dtype: str, params: Callable[[], list[Tensor]]) -> list[Tensor] | None:
    """The gradients the next step reads its norm, clipping and update from, where they can be scaled in place:
    the parameters' own at ZeRO-0 (torch's AdamW in fp32; in bf16 DeepSpeed's wrapper FP16_UnfusedOptimizer,
    which keeps bf16 gradients there with a static loss scale of 1), or the fp32 buffers of DeepSpeed's
    BF16_Optimizer (bf16 with fp32 accumulation). None for ZeRO's optimizers and fp16's."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(opt, BF16_Optimizer):
        return list(opt.fp32_groups_gradients_flat)
    if opt is client_optimizer or (isinstance(opt, FP16_UnfusedOptimizer) and dtype == "bfloat16"):
        return [p.grad for p in params() if p.grad is not None]
    return None


def scales_by_loss_scale(opt, dtype: str) -> bool:
    """Whether the optimizer is ZeRO's with a static loss scale (not fp16's dynamic one): the step divides the
    gradients, and the norm it reports, by it."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = isinstance(opt, DeepSpeedZeroOptimizer | DeepSpeedZeroOptimizer_Stage3)
    return zero and dtype != "float16" and not getattr(opt, "custom_loss_scaler", False)


def scaled_step(engine, gradients: list[Tensor] | None, grad_scale: float) -> None:
    """`engine.step()` as if every loss since the last step had been multiplied by `grad_scale`: the
    `plain_gradients` multiplied in place (before or after their all-reduce over ranks alike: it is a sum), else
    through the ZeRO optimizer's loss scale."""
    if grad_scale == 1.0:
        engine.step()
    elif gradients is not None:
        torch._foreach_mul_(gradients, grad_scale)
        engine.step()
    else:
        opt = engine.optimizer
        opt.loss_scale = 1.0 / grad_scale
        try:
            engine.step()
        finally:
            opt.loss_scale = 1.0
