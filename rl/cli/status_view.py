"""`rl status --hub URL --token T`: a live terminal view of a hub's `GET /v1/status`."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from rl.wire.client import HubHTTP, HubUnavailable
from rl.wire.protocol import HubError, HubStatus, WorkerStatus

PIPED_WIDTH = 240


def fetch_status(client: HubHTTP) -> HubStatus:
    return client.call("GET", "/v1/status", HubStatus)


def _masked(w: WorkerStatus) -> str:
    """Sequences the trainer masked of those it checked, by reason (rl/trainer/provenance.py)."""
    t = w.trust
    if t is None or not t.sequences_checked:
        return "-"
    reasons = " ".join(f"{k}:{v}" for k, v in t.rejected.items())
    return f"{sum(t.rejected.values())}/{t.sequences_checked}" + (f" ({reasons})" if reasons else "")


def _trust(w: WorkerStatus) -> str:
    if w.quarantined:
        return f"[red]QUARANTINED[/red]: {w.quarantined}"
    if w.trust is None:
        return "-"
    return f"|dlogp| {w.trust.mean_abs_logprob_diff:.3f}, reward z {w.trust.reward_z:+.1f}"


def _short(contributor: str) -> str:
    """An identity's first 16 hex digits (enough to tell keys apart on screen), a token contributor whole."""
    return contributor[:24] if contributor.startswith("ed25519:") else contributor or "-"


def render(status: HubStatus) -> Group:
    summary = status.worker_summary
    shown = f"{len(status.workers)} of {summary.total}" if summary.total > len(status.workers) else str(summary.total)
    workers = Table(title=f"workers ({shown})", expand=False)
    for col in ("name", "id", "contributor", "engine", "version", "tokens/s", "leased", "done", "last seen", "masked",
                "trust"):  # fmt: skip
        if col in ("name", "id", "contributor"):  # identities: fold in a narrow terminal, never cut with "…"
            workers.add_column(col, overflow="fold")
        else:
            workers.add_column(col, justify="left" if col == "engine" else "right")
    for w in status.workers:
        workers.add_row(
            w.name, w.worker_id, _short(w.contributor), w.engine, str(w.policy_version), f"{w.tokens_per_s:.0f}",
            str(w.leased_tasks), str(w.completed_tasks), f"{w.last_seen_s:.1f}s", _masked(w), _trust(w),
        )  # fmt: skip
    operators = Table(title=f"operators ({len(status.operators)}; trust is kept per worker token)", expand=False)
    for col in ("token id", "workers", "leased", "done", "masked", "quarantined"):
        operators.add_column(col, overflow="fold", justify="left" if col in ("token id", "quarantined") else "right")
    for o in status.operators:
        masked = "-"
        if o.trust is not None and o.trust.sequences_checked:
            masked = f"{sum(o.trust.rejected.values())}/{o.trust.sequences_checked}"
        operators.add_row(o.operator, str(o.workers), str(o.leased_tasks), str(o.completed_tasks), masked,
                          o.quarantined or "-")  # fmt: skip
    contributors = Table(title=f"contributors ({len(status.contributors)}; only trained work counts)", expand=False)
    for col in ("contributor", "workers", "trained samples", "trained tokens", "share"):
        contributors.add_column(col, overflow="fold", justify="left" if col == "contributor" else "right")
    for c in status.contributors:
        contributors.add_row(c.contributor, str(c.workers), str(c.trained_samples), str(c.trained_tokens),
                             f"{100 * c.share:.1f}%")  # fmt: skip
    run = Table(title="run", show_header=False)
    run.add_column("metric")
    run.add_column("value", justify="right")
    rows = {
        "policy version": status.policy_version,
        "workers by loaded version": ", ".join(f"v{k}: {v}" for k, v in summary.by_version.items()) or "-",
        "workers' tokens/s": f"{summary.tokens_per_s:.0f}",
        "trainer batches": status.batches,
        "queued / leased / scoring / buffered": (
            f"{status.queued} / {status.leased} / {status.scoring} / {status.buffered}"
        ),
        "groups consumed": status.consumed,
        "stale dropped": status.stale_dropped,
        "zero-variance skipped": status.zero_variance_skipped,
        "tokens generated": status.tokens_generated,
        "staleness histogram": ", ".join(f"{k}: {v}" for k, v in status.staleness_histogram.items()) or "-",
        "rejections": ", ".join(f"{k}: {v}" for k, v in status.rejections.items()) or "-",
        "workers (all tokens) / quarantined": f"{status.workers_total} / {status.quarantined}",
        "operators quarantined": status.operators_quarantined,
        "uptime": f"{status.uptime_s:.0f}s",
    }
    if status.episodes:  # an environment run
        e = status.episodes
        rows["episodes in flight / turns queued / done"] = (
            f"{e.get('in_flight', 0):.0f} / {e.get('turns_queued', 0):.0f} / {e.get('turns_done', 0):.0f}"
            f" (hub {e.get('hub_ms_per_turn', 0):.2f} ms, environment {e.get('env_ms_per_turn', 0):.1f} ms per turn)"
        )
        rows["later turns: same worker / prefix cached"] = (
            f"{e.get('same_worker_share', 0):.0%} / {e.get('prefix_cached_share', 0):.0%}"
        )
    if status.scoring_failures:  # the verifier is failing: say so, with the last error
        rows["scoring failures / dropped"] = f"{status.scoring_failures} / {status.scoring_dropped}"
        rows["last scoring error"] = status.last_scoring_error
    for stall in status.stalls:  # no progress (step watchdog) or waits past their time (docs/operations.md)
        where = f"; stacks in {stall.report}" if stall.report else ""
        label = "STALLED" if stall.report is not None or stall.component == "trainer" else "waiting"
        key = f"{label}: {stall.component}"
        while key in rows:  # one component waiting on several things
            key += " "
        rows[key] = escape(f"for {stall.since_s:.0f} s, {stall.what}{where}")
    if status.stall_counts:  # every stall and reported wait since the hub started, by what
        rows["stalls so far"] = ", ".join(f"{k} {n}" for k, n in sorted(status.stall_counts.items()))
    for k, v in rows.items():
        run.add_row(k, str(v))
    return Group(run, contributors, operators, workers)


def show_status(hub: str, token: str, *, once: bool = False, interval: float = 2.0) -> int:
    console = Console()
    if not console.is_terminal:  # piped or logged: no terminal width to fit, keep every line whole
        console = Console(width=PIPED_WIDTH)
    client = HubHTTP(hub, token, timeout_s=10.0, max_retry_s=5.0)
    try:
        status = fetch_status(client)
    except (HubError, HubUnavailable) as e:
        console.print(f"[red]error:[/red] cannot read status from {hub}: {e}")
        return 2
    if once:
        console.print(render(status))
        return 0
    with Live(render(status), console=console, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval)
                try:
                    live.update(render(fetch_status(client)))
                except (HubError, HubUnavailable) as e:
                    live.console.print(f"[yellow]hub unreachable: {e}[/yellow]")
        except KeyboardInterrupt:
            return 0
