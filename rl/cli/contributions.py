"""`rl identity new` and `rl contributions ...`: contributor keys, the per-contributor report, receipts.

    rl identity new KEY                          an Ed25519 key pair: KEY (private) and KEY.pub
    rl contributions RUN_DIR [--json|--csv] [--steps]   work per contributor (and step), from the run's hub database
    rl contributions fetch --hub --token [--identity KEY] [-o FILE]   a contributor's receipts and proofs
    rl contributions verify FILE --run-key PUB   check them offline against the run's public key

The report reads the database read-only (safe beside a live run). docs/contributions.md.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.core import TyperGroup

from rl.rundir import RunDir
from rl.wire.identity import IdentityError, challenge_message, load_key, public_id, read_public, sign, write_key
from rl.wire.protocol import IDENTITY_CHALLENGE_HEADER, IDENTITY_SIGNATURE_HEADER, IdentityChallenge
from rl.wire.receipts import Contributions, totals, verify_contributions
from rl.wire.tokens import token_id

COLUMNS = ["contributor", "kind", "trained_samples", "trained_tokens", "share", "trained_groups", "masked_samples",
           "masked_tokens", "masked_rate", "submitted_groups", "submitted_tokens", "scored_groups", "scored_tokens",
           "rejected_groups", "rejected_tokens", "rejected_rate", "generation_s", "quarantined_s", "versions",
           "registrations", "first_seen", "last_seen"]  # fmt: skip
STEP_COLUMNS = ["step", *(c for c in COLUMNS if c not in ("registrations", "first_seen", "last_seen"))]


def new_identity(path: Path) -> str:
    """Write a new key pair; returns its public key (raises FileExistsError rather than replace a key)."""
    return public_id(write_key(path))


def _when(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _short(contributor: str) -> str:
    return contributor[:20] + "…" if contributor.startswith("ed25519:") else contributor


def versions_text(versions: list[int]) -> str:
    """Policy versions as ranges: [0, 1, 2, 5] -> "0-2,5"."""
    spans: list[list[int]] = []
    for v in sorted(versions):
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in spans)


def report_rows(run_dir: Path, by_step: bool = False) -> list[dict]:
    from rl.hub.contribution_db import report, report_steps

    return (report_steps if by_step else report)(RunDir(run_dir).hub_db)


def render_report(rows: list[dict], fmt: str, console, by_step: bool = False) -> str | None:
    """`fmt` json | csv: the text to print; table: printed on `console` (None returned)."""
    if fmt == "json":
        return json.dumps(rows, indent=2) + "\n"
    if fmt == "csv":
        columns = STEP_COLUMNS if by_step else COLUMNS
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        for r in rows:
            cells = {**r, "versions": versions_text(r["versions"]), "first_seen": _when(r.get("first_seen")),
                     "last_seen": _when(r.get("last_seen"))}  # fmt: skip
            writer.writerow([cells[c] for c in columns])
        return buf.getvalue()
    from rich.table import Table

    table = Table(title="contributions (only trained work counts)" + (", per step" if by_step else ""))
    names = ["contributor", "samples", "tokens", "share", "masked", "rejected", "quarantined", "versions"]
    names = ["step", *names] if by_step else [*names, "first seen", "last seen"]
    for name in names:
        table.add_column(name, justify="left" if name in ("contributor", "first seen", "last seen") else "right")
    for r in rows:
        cells = [_short(r["contributor"]), str(r["trained_samples"]), str(r["trained_tokens"]),
                 f"{100 * r['share']:.1f}%", f"{r['masked_samples']} ({100 * r['masked_rate']:.1f}%)",
                 f"{r['rejected_groups']} ({100 * r['rejected_rate']:.1f}%)",
                 f"{r['quarantined_s']:.0f}s" if r["quarantined_s"] else "-", versions_text(r["versions"])]  # fmt: skip
        table.add_row(*([str(r["step"]), *cells] if by_step else [*cells, _when(r["first_seen"]),
                                                                  _when(r["last_seen"])]))  # fmt: skip
    console.print(table)
    return None


def fetch(hub: str, token: str, identity: Path | None, contributor: str | None, from_step: int = 0) -> Contributions:
    """A contributor's receipts from a live hub: the identity's (proved by signing a challenge), else the token's."""
    from rl.wire.client import HubHTTP

    key = load_key(identity) if identity is not None else None
    who = contributor or (public_id(key) if key is not None else f"token:{token_id(token)}")
    with HubHTTP(hub, token, max_retry_s=30.0) as http:
        if key is not None:
            challenge = http.call("POST", "/v1/challenges", IdentityChallenge).challenge
            http.http.headers[IDENTITY_CHALLENGE_HEADER] = challenge
            signature = sign(key, challenge_message(challenge, f"contributions {who}"))
            http.http.headers[IDENTITY_SIGNATURE_HEADER] = signature
        return http.call("GET", f"/v1/contributions/{who}?from_step={from_step}", Contributions)


def verify_file(path: Path, run_key: str) -> tuple[list[str], dict[str, int]]:
    """(problems, totals) of a receipts file; raises ValueError for a file that is not one."""
    try:
        doc = Contributions.model_validate_json(Path(path).read_bytes())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"{path} is not a receipts file (rl contributions fetch writes one): {e}") from None
    try:
        key = read_public(run_key)
    except IdentityError as e:
        raise ValueError(f"--run-key: {e}") from None
    return verify_contributions(doc, key), totals(doc)


# --------------------------------------------------------------------------- commands
_err = Console(stderr=True, soft_wrap=True)
_out = Console(soft_wrap=True)


class _ReportByDefault(TyperGroup):
    """`rl contributions RUN_DIR` is `rl contributions report RUN_DIR`; `fetch` and `verify` are subcommands."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            return "report", self.commands["report"], args
        return super().resolve_command(ctx, args)


identity_app = typer.Typer(help="Contributor identities (Ed25519 keys).", no_args_is_help=True)
contributions_app = typer.Typer(
    cls=_ReportByDefault,
    no_args_is_help=True,
    help="Who did the work: per-contributor report, receipts, offline verification.",
)


def _fail(message: str) -> None:
    _err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(2)


@identity_app.command("new")
def identity_new(path: Annotated[Path, typer.Argument(help="Private key file to write (its public key: PATH.pub).")]):
    """Create an Ed25519 key pair for `rl rollout --identity PATH`."""
    try:
        public = new_identity(path)
    except FileExistsError:
        _fail(f"{path} already exists; a key is never overwritten (choose another path)")
    except OSError as e:
        _fail(f"cannot write {path}: {e.strerror}")
    _out.print(f"wrote {path} (keep it private) and {path}.pub\n{public}", highlight=False, markup=False)


@contributions_app.command("report")
def contributions_report(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (reads its hub.sqlite, read-only).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    by_step: Annotated[bool, typer.Option("--steps", help="One row per contributor and step.")] = False,
) -> None:
    """Trained samples and tokens per contributor, share, masked and rejected rates, first and last seen."""
    import sqlite3

    if as_json and as_csv:
        _fail("give --json or --csv, not both")
    try:
        rows = report_rows(run_dir, by_step)
    except (FileNotFoundError, sqlite3.Error) as e:
        _fail(f"{e}")
    text = render_report(rows, "json" if as_json else "csv" if as_csv else "table", _out, by_step)
    if text is not None:
        sys.stdout.write(text)


@contributions_app.command("fetch")
def contributions_fetch(
    hub: Annotated[str, typer.Option("--hub", help="Hub URL.")],
    token: Annotated[str, typer.Option("--token", envvar="RL_HUB_TOKEN", help="A worker token (or the admin's).")],
    identity: Annotated[Path | None, typer.Option("--identity", help="Your contributor key.")] = None,
    contributor: Annotated[str | None, typer.Option(help="Whose (admin token only; default: yours).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write here (default: stdout).")] = None,
    from_step: Annotated[int, typer.Option("--from-step", min=0, help="Only this step's receipts and later.")] = 0,
) -> None:
    """Download your receipts with inclusion proofs (keep the file: it verifies offline)."""
    from rl.wire.client import HubUnavailable
    from rl.wire.protocol import HubError

    try:
        doc = fetch(hub, token, identity, contributor, from_step)
    except (HubError, HubUnavailable, IdentityError) as e:
        _fail(str(e))
    text = doc.model_dump_json(indent=1) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        _err.print(f"wrote {output}: {totals(doc)}", highlight=False, markup=False)


@contributions_app.command("verify")
def contributions_verify(
    receipts: Annotated[Path, typer.Argument(help="A receipts file (rl contributions fetch).")],
    run_key: Annotated[str, typer.Option("--run-key", help="The run's public key: ed25519:<hex> or its .pub file.")],
) -> None:
    """Check receipts offline: signed by the run key, each entry yours and in its signed Merkle root."""
    try:
        problems, counts = verify_file(receipts, run_key)
    except ValueError as e:
        _fail(str(e))
    for p in problems:
        _err.print(f"FAIL {p}", highlight=False, markup=False)
    if problems:
        raise typer.Exit(1)
    _out.print(f"OK: {counts['steps']} steps, {counts['groups']} groups, {counts['samples']} samples, "
               f"{counts['tokens']} tokens verified", highlight=False, markup=False)  # fmt: skip
