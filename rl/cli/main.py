"""The `rl` command (typer): one thin function per subcommand; `rl --help` lists them.

Each subcommand parses its arguments, loads and validates config, and hands off to the
module of its role (rl/cli/launcher.py for `rl train`, rl/hub/, rollout_workers/, rl/plan/,
...), imported only then; errors in user input end with a clear message and a non-zero
exit, never a traceback.
"""

from __future__ import annotations

import faulthandler
import io
import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated

# Before anything loads OpenMP (torch, vLLM): idle OpenMP threads sleep instead of spinning. The
# trainer, local workers and verifiers share the machine's cores; spinning threads of one process
# then steal them from the others (a 2-core staleness-1 run went from 48 to 12 s/step). Inherited
# by every child `rl train` starts; set OMP_WAIT_POLICY yourself to override. A local worker that owns its
# cores spins briefly instead (GOMP_SPINCOUNT, rl/cli/launcher.py `worker_spin`).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from rl.cli.children import exit_with_parent
from rl.cli.contributions import contributions_app, identity_app
from rl.config import ConfigError, ModelConfig, RunConfig, dump_config, load_config, shipped_names
from rl.models import ALIASES, ModelError, cache_dir, prepare_model, verify_manifest
from rl.wire.protocol import SAFE_NAME

app = typer.Typer(
    help="scatter-rl: RL fine-tuning of LLMs with verifiable rewards on scattered rollout workers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Prepare and list offline model aliases.", no_args_is_help=True)
app.add_typer(models_app, name="models")

# In a terminal rich sizes to it; in a log file or CI it would wrap at 80 columns and break lines apart.
_WIDTH = None if sys.stderr.isatty() else 200
err = Console(stderr=True, soft_wrap=True, width=_WIDTH)
out = Console(soft_wrap=True, width=_WIDTH)

ConfigArg = Annotated[
    Path, typer.Argument(help=f"YAML run config file, or a shipped config's name: {', '.join(shipped_names())}.")
]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides, e.g. trainer.lr=1e-6 rollout.local_workers=2.")
]


def _setup_logging(level: str = "INFO") -> None:
    """Rich log lines at a terminal; plain ones otherwise (a log file, a launcher's pipe): rich renders each
    record as a table, a few ms of the event loop per line, which a hub registering thousands of workers
    cannot spare."""
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler, fmt = RichHandler(console=err, show_path=False, rich_tracebacks=False), "%(message)s"
    else:
        handler, fmt = logging.StreamHandler(sys.stderr), "%(asctime)s %(levelname)-8s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="[%X]", handlers=[handler], force=True)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from rl.trainer.watchdog import STACK_SIGNAL

    try:  # stacks to the log, for the step watchdog's reports
        faulthandler.register(STACK_SIGNAL, all_threads=True)
    except (io.UnsupportedOperation, AttributeError):  # stderr captured in memory (a test's CliRunner)
        faulthandler.register(STACK_SIGNAL, file=sys.__stderr__, all_threads=True)


def _load(config: Path | None, overrides: list[str] | None) -> RunConfig:
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        err.print(f"[red]error:[/red] {e}", markup=True, highlight=False)
        raise typer.Exit(2) from None


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="Where to write the config.")] = Path("run.yaml"),
    model: Annotated[
        str, typer.Option("--model", help="model.name: a local directory, a Hugging Face id, or an alias.")
    ] = ModelConfig().name,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter run config that `rl train` accepts as is."""
    from rl.cli.init import write_starter_config

    if path.exists() and not force:
        err.print(f"[red]error:[/red] {path} already exists; pass --force to overwrite it", highlight=False)
        raise typer.Exit(2)
    write_starter_config(path, model)
    out.print(f"wrote {path}: check it with `rl train {path} --dry-run`, start it with `rl train {path}`",
              highlight=False, markup=False)  # fmt: skip


@app.command()
def train(
    config: ConfigArg,
    overrides: OverridesArg = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved config and exit.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory (overrides run_dir).")] = None,
) -> None:
    """Run a whole RL job: hub, DeepSpeed GRPO trainer and local rollout workers."""
    cfg = _load(config, overrides)
    if run_dir is not None:
        cfg.run_dir = run_dir
    if dry_run:
        sys.stdout.write(dump_config(cfg))
        return
    _setup_logging(cfg.logging.level)
    from rl.cli.launcher import run_training

    sys.exit(run_training(cfg, resume=resume))


@app.command()
def hub(
    config: ConfigArg,
    overrides: OverridesArg = None,
    host: Annotated[str | None, typer.Option(help="Listen address (overrides hub.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Listen port (overrides hub.port).")] = None,
    ledger: Annotated[
        Path | None,
        typer.Option(help="Start from a checkpoint's ledger.json (else from run_dir/hub.sqlite, if there)."),
    ] = None,
    fd: Annotated[int | None, typer.Option(hidden=True, help="Listen on this inherited bound socket.")] = None,
) -> None:
    """Serve the control plane (leases, submissions, scoring, policy files) for a run."""
    cfg = _load(config, overrides)
    if host is not None:
        cfg.hub.host = host
    if port is not None:
        cfg.hub.port = port
    _setup_logging(cfg.logging.level)
    exit_with_parent()  # a hub started by `rl train` ends with it
    from rl.hub.main import serve

    sys.exit(serve(cfg, ledger_path=ledger, fd=fd))


@app.command()
def rollout(
    hub: Annotated[str, typer.Option("--hub", help="Hub URL, e.g. https://trainer:8000.")],
    token: Annotated[str, typer.Option("--token", envvar="RL_HUB_TOKEN", help="Worker bearer token.")],
    engine: Annotated[str, typer.Option(help="Generation engine: vllm or hf.")] = "vllm",
    tp: Annotated[int, typer.Option("--tp", min=1, help="vLLM tensor parallel size.")] = 1,
    max_prompts: Annotated[
        int | None, typer.Option("--max-prompts", min=1, help="Leave after this many prompts.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Worker name shown in `rl status`.")] = None,
    prompts_per_lease: Annotated[int, typer.Option(min=1, help="Prompts to take per lease.")] = 4,
    max_inflight_prompts: Annotated[
        int | None,
        typer.Option(min=1, help="Prompts to keep leased and unfinished (default: what the engine batches + a lease)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed (give each worker its own).")] = 0,
    cache_dir: Annotated[Path | None, typer.Option(help="Where downloaded policy versions are kept.")] = None,
    kv_cache_gib: Annotated[
        float, typer.Option(min=0.01, envvar="VLLM_CPU_KVCACHE_SPACE", help="vLLM-CPU KV cache in GiB.")
    ] = 1.0,
    gpu_memory_utilization: Annotated[
        float, typer.Option(min=0.01, max=1.0, help="vLLM GPU memory fraction (GPU workers).")
    ] = 0.85,
    enforce_eager: Annotated[
        bool | None,
        typer.Option("--enforce-eager/--no-enforce-eager", help="Skip vLLM compilation (default: eager on CPU only)."),
    ] = None,
    weights_url: Annotated[
        str | None,
        typer.Option(
            "--weights-url",
            help="HTTP cache or mirror of the hub's /v1/blobs/ to fetch weights from first (hashes still checked).",
        ),
    ] = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model",
            help="The run's base model on this machine (directory or alias): verified, then not downloaded.",
        ),
    ] = None,
    identity: Annotated[
        Path | None,
        typer.Option("--identity", help="Contributor key (`rl identity new`): the work is credited to it."),
    ] = None,
) -> None:
    """Join a run as a rollout worker (outbound HTTP only; start as many as you like)."""
    from rollout_workers.engines import EngineSpec

    try:
        spec = EngineSpec(kind=engine, tensor_parallel=tp, seed=seed, kv_cache_gib=kv_cache_gib,
                          gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager)  # fmt: skip
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if weights_url is not None and not weights_url.startswith(("http://", "https://")):
        err.print(f"[red]error:[/red] --weights-url must be an http:// or https:// URL, got {weights_url!r}")
        raise typer.Exit(2)
    _setup_logging()
    exit_with_parent()  # a local worker started by `rl train` ends with it
    base_dir = None
    if base_model is not None:
        from rl.models import ModelError, resolve_model

        try:
            base_dir = Path(resolve_model(base_model))
        except ModelError as e:
            err.print(f"[red]error:[/red] --base-model: {e}")
            raise typer.Exit(2) from None
        if not base_dir.is_dir():
            err.print(f"[red]error:[/red] --base-model must be a local directory or an alias, got {base_model!r}")
            raise typer.Exit(2)
    if identity is not None:
        from rl.wire.identity import IdentityError, load_key, public_id

        try:
            err.print(f"contributing as {public_id(load_key(identity))}", highlight=False, markup=False)
        except IdentityError as e:
            err.print(f"[red]error:[/red] --identity: {e}", highlight=False)
            raise typer.Exit(2) from None
    if name is not None and not re.fullmatch(SAFE_NAME, name):
        err.print(f"[red]error:[/red] --name {name!r}: use 1 to 64 letters, digits or ._:@+- (it is printed in logs)")
        raise typer.Exit(2)
    from rollout_workers.worker import run_worker

    sys.exit(
        run_worker(
            hub,
            token,
            spec=spec,
            max_prompts=max_prompts,
            name=name,
            prompts_per_lease=prompts_per_lease,
            max_inflight_prompts=max_inflight_prompts,
            cache_dir=cache_dir,
            weights_url=weights_url,
            base_model=base_dir,
            identity=identity,
        )
    )


@app.command()
def status(
    hub: Annotated[str, typer.Option("--hub", help="Hub URL.")],
    token: Annotated[str, typer.Option("--token", envvar="RL_HUB_TOKEN", help="Any valid bearer token.")],
    once: Annotated[bool, typer.Option("--once", help="Print one snapshot and exit.")] = False,
) -> None:
    """Live view of a run: workers, throughput, queue, buffer, staleness."""
    from rl.cli.status_view import show_status

    sys.exit(show_status(hub, token, once=once))


@app.command()
def verify(
    config: Annotated[Path | None, typer.Argument(help="Run config whose rewards to use.")] = None,
    input: Annotated[Path | None, typer.Option("--input", help="JSONL rows: completion, answer, ...")] = None,
    rewards: Annotated[
        str | None, typer.Option("--rewards", help="Comma-separated reward names instead of a config.")
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", help="Write one JSON result per row.")] = None,
) -> None:
    """Score a file of completions with the configured rewards (debug rewards before spending GPU hours)."""
    if input is None:
        err.print("[red]error:[/red] --input is required")
        raise typer.Exit(2)
    if (config is None) == (rewards is None):
        err.print("[red]error:[/red] give either a CONFIG or --rewards NAME[,NAME...], not both or neither")
        raise typer.Exit(2)
    from rl.cli.verify import run_verify

    cfg = _load(config, []) if config is not None else None
    sys.exit(run_verify(cfg, rewards, input, output))


@app.command()
def plan(
    config: ConfigArg,
    overrides: OverridesArg = None,
    gpus: Annotated[int, typer.Option("--gpus", help="GPUs on the trainer side.")] = 1,
    gpu_mem: Annotated[float, typer.Option("--gpu-mem", help="Memory of one GPU, GiB (e.g. 80).")] = 80.0,
    trainer_gpus: Annotated[
        int | None, typer.Option("--trainer-gpus", help="GPUs that train (default: all; the rest host workers).")
    ] = None,
    gpus_per_node: Annotated[int, typer.Option("--gpus-per-node", help="GPUs per node (offload is per node).")] = 8,
    cpu_mem: Annotated[float | None, typer.Option("--cpu-mem", help="Host memory per node, GiB.")] = None,
    tp: Annotated[int | None, typer.Option("--tp", help="Worker TP size (default: rollout.tensor_parallel).")] = None,
    worker_gpu_mem: Annotated[float | None, typer.Option("--worker-gpu-mem", help="A worker GPU's GiB.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Rollout workers fetching each version.")] = 1,
    bandwidth: Annotated[float, typer.Option("--bandwidth", help="Hub uplink, Gbit/s.")] = 10.0,
    sites: Annotated[int, typer.Option("--sites", help="Sites, each behind one HTTP cache.")] = 1,
    site_bandwidth: Annotated[float, typer.Option("--site-bandwidth", help="Site cache to workers, Gbit/s.")] = 25.0,
    change_density: Annotated[
        float, typer.Option("--change-density", help="Share of elements a delta carries (quickstart: 0.0122).")
    ] = 0.0122,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Say before launch whether a config fits the GPUs (trainer and workers) and what weight sync costs."""
    import json

    from rl.plan.estimate import make_plan
    from rl.plan.inputs import Hardware, PlanError
    from rl.plan.view import render_plan

    cfg = _load(config, overrides)
    hw = Hardware(
        gpus=gpus,
        gpu_mem_gib=gpu_mem,
        trainer_gpus=gpus if trainer_gpus is None else trainer_gpus,
        gpus_per_node=gpus_per_node,
        cpu_mem_gib=cpu_mem,
        worker_gpu_mem_gib=worker_gpu_mem,
        workers=workers,
        bandwidth_gbit=bandwidth,
        sites=sites,
        site_bandwidth_gbit=site_bandwidth,
        change_density=change_density,
    )
    try:
        result = make_plan(cfg, hw, tp=tp)
    except PlanError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        render_plan(result, out)


@models_app.command("prepare")
def models_prepare(
    alias: Annotated[str, typer.Argument(help=f"One of: {', '.join(ALIASES)}.")],
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the cache is intact.")] = False,
) -> None:
    """Materialise an alias offline into the model cache (a plain HF safetensors directory)."""
    _setup_logging()
    try:
        path = prepare_model(alias, force=force)
    except ModelError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    out.print(str(path), highlight=False)


@models_app.command("list")
def models_list() -> None:
    """Show the aliases and whether each is prepared and intact."""
    for alias in ALIASES:
        path = cache_dir() / alias
        state = "not prepared" if not path.exists() else (verify_manifest(path) or "ready")
        out.print(f"{alias:24s} {state:20s} {path}", highlight=False)


admin_app = typer.Typer(help="Operator actions on a running hub (admin token): quarantine, revoke.",
                        no_args_is_help=True)  # fmt: skip
app.add_typer(admin_app, name="admin")
_HubOpt = Annotated[str, typer.Option("--hub", help="Hub URL.")]
_AdminTokenOpt = Annotated[str, typer.Option("--token", envvar="RL_HUB_ADMIN_TOKEN", help="The admin token.")]


def _admin_call(hub: str, token: str, action) -> None:
    from rl.wire.admin import HubAdmin
    from rl.wire.client import HubUnavailable
    from rl.wire.protocol import HubError

    try:
        with HubAdmin(hub, token, patience_s=10.0) as admin:
            out.print(action(admin).detail or "ok", highlight=False)
    except (HubError, HubUnavailable) as e:
        err.print(f"[red]error:[/red] {e}")
        sys.exit(2)


@admin_app.command("quarantine")
def admin_quarantine(
    worker_id: str, hub: _HubOpt, token: _AdminTokenOpt,
    reason: Annotated[str, typer.Option(help="Shown in `rl status`.")] = "quarantined by an operator",
) -> None:  # fmt: skip
    """Quarantine a worker: no more leases; its leased and buffered tasks are re-queued."""
    _admin_call(hub, token, lambda a: a.quarantine(worker_id, reason))


@admin_app.command("release")
def admin_release(worker_id: str, hub: _HubOpt, token: _AdminTokenOpt) -> None:
    """Lift a worker's quarantine."""
    _admin_call(hub, token, lambda a: a.release(worker_id))


@admin_app.command("revoke-worker")
def admin_revoke_worker(worker_id: str, hub: _HubOpt, token: _AdminTokenOpt) -> None:
    """Remove a worker now (its leases are re-queued; its secret stops working)."""
    _admin_call(hub, token, lambda a: a.revoke_worker(worker_id))


@admin_app.command("revoke-token")
def admin_revoke_token(
    worker_token: Annotated[str, typer.Argument(help="The worker token, or its id (hub log).")],
    hub: _HubOpt, token: _AdminTokenOpt,
) -> None:  # fmt: skip
    """Refuse a worker token from now on and remove every worker registered with it."""
    _admin_call(hub, token, lambda a: a.revoke_token(worker_token))


app.add_typer(identity_app, name="identity")
app.add_typer(contributions_app, name="contributions")

if __name__ == "__main__":
    app()
