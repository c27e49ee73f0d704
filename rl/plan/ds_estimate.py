"""DeepSpeed's side of `rl plan` (rl/plan/estimate.py): importing it quietly, and its own model-state estimators."""

from __future__ import annotations

from rl.plan.inputs import TrainerSetup
from rl.plan.specs import Architecture


def deepspeed_estimate(
    arch: Architecture, setup: TrainerSetup, ranks: int, per_node: int
) -> tuple[int | None, int | None, str]:
    """DeepSpeed's own model-state estimate (GPU per rank, CPU per node) from parameter counts alone."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    nodes = ranks / per_node
    note = "assumes 16-bit mixed precision" if setup.dtype == "float32" else ""
    if setup.zero_stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=arch.params,
            largest_layer_params=arch.largest_layer_params,
            num_gpus_per_node=per_node,
            num_nodes=nodes,
            cpu_offload=setup.offload_optimizer,
            cpu_offload_params=setup.offload_param and setup.offload_optimizer,
            zero_init=True,
        )
        return gpu, cpu, note
    if setup.zero_stage in (1, 2):
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params=arch.params, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=setup.offload_optimizer
        )
        if setup.zero_stage == 1:
            zero1 = "ZeRO-2 formula (DeepSpeed has none for ZeRO-1, whose gradients are not sharded)"
            note = "; ".join(filter(None, [note, zero1]))
        return gpu, cpu, note
    return None, None, "DeepSpeed has no ZeRO-0 estimator"
