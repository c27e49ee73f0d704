"""The trainer's receipts: after each optimizer step, what it trained, signed with the run's key.

Rank 0 holds the run's Ed25519 key (`run_dir/run_key.pem`, made with the run; rl/wire/identity.py). Per
step it makes one `ReceiptEntry` per group with sequences it trained (not masked by the provenance checks):
the group's contributor as the hub labelled it, its task id, version, trained samples and tokens, and the
digest of their token ids; signs their Merkle root (rl/wire/receipts.py); appends the receipt with its
entries and the masked work to `receipts.jsonl`; and sends the same to the hub (`POST /v1/receipts`),
which serves each contributor its entries with inclusion proofs. docs/contributions.md.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

from torch import Tensor

from rl.rundir import RunDir
from rl.trainer.provenance import REASONS
from rl.wire.identity import load_or_create, public_id
from rl.wire.receipts import MaskedWork, ReceiptEntry, StepReceipt, sign_step, token_digest

log = logging.getLogger(__name__)


def contributor_of(group) -> str:
    """Whom the hub credited a group to (a hub without contribution labels: its registration)."""
    return group.contributor or f"worker:{group.worker_id}"


def step_entries(groups: list, trained: list[bool], codes: list[int] | None) -> tuple[list, list]:
    """(entries, masked work) of one step: `trained[i]` / `codes[i]` are sequence i's (groups in batch order,
    completions in group order; code 0 = passed, else 1 + its index in provenance.REASONS)."""
    entries, masked, i = [], [], 0
    for group in groups:
        contributor = contributor_of(group)
        ids, reasons, masked_tokens = [], Counter(), Counter()
        for c in group.completions:
            if trained[i]:
                ids.append(c.token_ids)
            elif codes is not None and codes[i] > 0:
                reasons[REASONS[codes[i] - 1]] += 1
                masked_tokens[REASONS[codes[i] - 1]] += len(c.token_ids)
            i += 1
        if ids:
            entries.append(ReceiptEntry(contributor=contributor, task_id=group.task_id,
                                        policy_version=group.policy_version, samples=len(ids),
                                        tokens=sum(len(x) for x in ids), digest=token_digest(ids)))  # fmt: skip
        if reasons:
            masked.append(MaskedWork(contributor=contributor, task_id=group.task_id, reasons=dict(reasons),
                                     tokens=dict(masked_tokens)))  # fmt: skip
    return entries, masked


def panel_name(contributor: str) -> str:
    """A contributor's W&B panel group: an identity's first 16 hex digits (enough to tell keys apart)."""
    return contributor[:24].replace(":", "_")


class Receipts:
    """Rank 0's signer: `issue` after each step."""

    def __init__(self, paths: RunDir, hub) -> None:
        self.key = load_or_create(paths.run_key)
        self.run_key = public_id(self.key)
        self.path, self.hub = paths.receipts, hub
        self.last: StepReceipt | None = None
        self.signed: Counter | None = None
        """Contributor -> trained tokens signed so far (read from receipts.jsonl at the first step: after a
        resume cut it back)."""

    def _signed_before(self, step: int) -> Counter:
        if self.signed is None:
            self.signed = Counter()
            lines = self.path.read_text().splitlines() if self.path.is_file() else []
            for record in map(json.loads, filter(str.strip, lines)):
                if record["step"] < step:
                    for e in record["entries"]:
                        self.signed[e["contributor"]] += e["tokens"]
        return self.signed

    def issue(self, step: int, groups: list, completion_mask: Tensor, codes: Tensor | None) -> dict[str, float]:
        """Sign step `step`'s trained work (a sequence is trained when any of its completion tokens is in the
        loss), record it in receipts.jsonl and send it to the hub (a failure is logged; the file keeps it).
        Returns the step's metrics per contributor: `contributions/<contributor>/samples|tokens` of this step,
        and `.../share`, its share of the trained tokens signed so far (every contributor's, each step)."""
        trained = (completion_mask.sum(dim=1) > 0).tolist()
        entries, masked = step_entries(groups, trained, None if codes is None else codes.tolist())
        report = StepReceipt(receipt=sign_step(self.key, self.run_key, step, entries), entries=entries, masked=masked)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **report.model_dump()}) + "\n")
        if self.hub is not None:
            try:
                self.hub.record_receipt(report)
            except Exception as e:  # the receipt stays in receipts.jsonl; training goes on
                log.error("could not send the receipt of step %d to the hub: %s", step, e)
        self.last = report
        signed = self._signed_before(step)
        metrics: dict[str, float] = {}
        for e in entries:
            name = panel_name(e.contributor)
            metrics[f"contributions/{name}/samples"] = metrics.get(f"contributions/{name}/samples", 0.0) + e.samples
            metrics[f"contributions/{name}/tokens"] = metrics.get(f"contributions/{name}/tokens", 0.0) + e.tokens
            signed[e.contributor] += e.tokens
        total = sum(signed.values())
        for contributor, tokens in signed.items():
            metrics[f"contributions/{panel_name(contributor)}/share"] = tokens / total if total else 0.0
        return metrics
