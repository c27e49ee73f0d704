"""Rich tables for `rl plan` (the numbers come from rl/plan/estimate.py; this file only lays them out)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from rl.plan.estimate import GIB, Plan, Row


def gib(nbytes: float) -> str:
    if 0 < nbytes < GIB / 10:
        return f"{nbytes / 2**20:,.1f} MiB"
    return f"{nbytes / GIB:,.1f} GiB"


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _verdict(ok: bool) -> str:
    return "[green]fits[/green]" if ok else "[red]DOES NOT FIT[/red]"


def _rows(table: Table, rows: list[Row]) -> None:
    for r in rows:
        table.add_row(r.name, gib(r.bytes), r.note)


def render_plan(plan: Plan, console: Console) -> None:
    m, hw, ts, ws = plan.model, plan.hardware, plan.trainer_setup, plan.worker_setup
    console.print(
        f"[bold]{m.name}[/bold]: {m.params / 1e9:.2f}B parameters ({m.model_type}, {m.num_layers} layers, hidden "
        f"{m.hidden_size}, {m.num_heads}/{m.num_kv_heads} heads, vocab {m.vocab_size}"
        f"{', tied embeddings' if m.tie_word_embeddings else ''}) from {m.source}",
        highlight=False,
    )

    t = plan.trainer
    offload = [x for x, on in (("optimizer", ts.offload_optimizer), ("weights", ts.offload_param)) if on]
    title = (
        f"Trainer, per GPU: {t.ranks} rank(s), ZeRO-{ts.zero_stage}"
        f"{', CPU offload of ' + ' and '.join(offload) if offload else ''}, {ts.dtype}, micro-batch {ts.micro_batch}"
        f" x {ts.seq_len} tokens, gradient checkpointing {'on' if ts.gradient_checkpointing else 'off'}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("GPU memory")
    table.add_column("per GPU", justify="right")
    table.add_column("how")
    _rows(table, t.gpu_rows)
    table.add_row(
        "[bold]total[/bold]",
        f"[bold]{gib(t.gpu_total)}[/bold]",
        f"of {gib(t.gpu_capacity)} ({t.gpu_total / t.gpu_capacity:.0%}): {_verdict(t.fits)}",
    )
    console.print(table)
    if t.cpu_rows_per_rank:
        cpu = Table(
            title=f"Trainer, host memory (offload), {min(hw.gpus_per_node, t.ranks)} rank(s) per node",
            title_justify="left",
        )
        cpu.add_column("CPU memory")
        cpu.add_column("per rank", justify="right")
        cpu.add_column("how")
        _rows(cpu, t.cpu_rows_per_rank)
        verdict = "" if t.cpu_fits is None else f" of {hw.cpu_mem_gib:g} GiB: " + _verdict(t.cpu_fits)
        cpu.add_row("[bold]per node[/bold]", f"[bold]{gib(t.cpu_per_node)}[/bold]", verdict)
        console.print(cpu)
    if t.deepspeed_gpu is not None:
        diff = (t.model_states - t.deepspeed_gpu) / t.deepspeed_gpu
        console.print(
            f"Model states (weights, gradients, optimizer, one gathered layer): this plan {gib(t.model_states)}, "
            f"DeepSpeed's estimator {gib(t.deepspeed_gpu)} per GPU ({diff:+.0%})"
            + (f", CPU {gib(t.deepspeed_cpu_per_node)} per node" if t.cpu_rows_per_rank else "")
            + (f"; {t.deepspeed_note}" if t.deepspeed_note else ""),
            highlight=False,
        )
    else:
        console.print(f"DeepSpeed estimator: n/a ({t.deepspeed_note})", highlight=False)
    for s in t.suggestions:
        console.print(f"  [yellow]->[/yellow] {s}", highlight=False)

    w = plan.worker
    wmem = hw.worker_gpu_mem_gib or hw.gpu_mem_gib
    wt = Table(
        title=f"Rollout worker, per GPU: vLLM TP {w.tensor_parallel}, {ws.dtype}, gpu_memory_utilization "
        f"{ws.gpu_memory_utilization:g} of {wmem:g} GiB, max_model_len {ws.max_model_len}",
        title_justify="left",
    )
    wt.add_column("GPU memory")
    wt.add_column("per GPU", justify="right")
    wt.add_column("how")
    wt.add_row("vLLM budget", gib(w.budget), f"{ws.gpu_memory_utilization:g} x {wmem:g} GiB")
    _rows(wt, w.rows)
    wt.add_row(
        "[bold]KV cache[/bold]",
        f"[bold]{gib(w.kv_cache)}[/bold]",
        f"{w.kv_tokens:,} tokens at {w.kv_bytes_per_token / 1024:.0f} KiB/token: {w.sequences_at_max_len:,.1f} "
        f"sequences of {ws.max_model_len}, {w.sequences_at_rollout_len:,.1f} of {ws.rollout_len} "
        f"(a lease: {ws.sequences_per_lease}): {_verdict(w.fits)}",
    )
    console.print(wt)
    if w.problem:
        console.print(f"  [red]{w.problem}[/red]", highlight=False)
    for s in w.suggestions:
        console.print(f"  [yellow]->[/yellow] {s}", highlight=False)
    if plan.local_worker_gpus:
        console.print(
            f"{plan.local_worker_gpus} GPU(s) beside the trainer: room for "
            f"{plan.local_worker_gpus // w.tensor_parallel} local worker(s) of TP {w.tensor_parallel}",
            highlight=False,
        )

    s = plan.sync
    st = Table(
        title=f"Weight sync per version: {s.workers} worker(s), hub uplink {hw.bandwidth_gbit:g} Gbit/s, "
        f"{s.sites} site cache(s) at {hw.site_bandwidth_gbit:g} Gbit/s",
        title_justify="left",
    )
    st.add_column("format")
    st.add_column(f"bytes ({s.dtype})", justify="right")
    st.add_column("from the hub", justify="right")
    st.add_column("through site caches", justify="right")
    st.add_row("full", gib(s.full_bytes), duration(s.full_s_from_hub), duration(s.full_s_via_caches))
    st.add_row(
        f"delta ({s.change_density:.2%} changed)",
        gib(s.delta_bytes),
        duration(s.delta_s_from_hub),
        duration(s.delta_s_via_caches),
    )
    console.print(st)
    console.print(f"  {s.note}", highlight=False)
    console.print(
        "[green]The config fits this hardware.[/green]" if plan.fits else "[red]The config does not fit as is.[/red]"
    )
