"""Publishing policy versions beside the training loop (trainer rank 0).

The loop hands each new version's weights to `Publisher.publish` as an iterator (the gather,
`DeepSpeedStrategy.iter_state_dict`: collectives on every rank, so it runs in the loop).
`weights.background` (default): copy the weights into a host snapshot in the rollout dtype
(one version in flight, the model's size of host RAM) and return; a thread writes the shards
or deltas, hashes them and announces the version to the hub while the next step trains.
Streamed: write the shards as the tensors arrive (about one shard of memory), announce,
return. The trainer calls `wait()` before it evaluates a version or checkpoints the hub's
ledger; a failed background publication is raised by the next call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

import torch

from rl.weights.store import PolicyWriter, Written

log = logging.getLogger(__name__)


class Publisher:
    def __init__(
        self, writer: PolicyWriter, announce: Callable[[int], None], rollout_dtype: torch.dtype, *, background: bool
    ) -> None:
        self.writer, self.announce = writer, announce
        self.rollout_dtype, self.background = rollout_dtype, background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._finished: list[tuple[Written, float]] = []
        self._lock = threading.Lock()

    def publish(self, version: int, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Publish `tensors` (in the writer's layout order) as `version`; see the module docstring."""
        self.wait()
        start = time.perf_counter()
        if not self.background:
            self._write(version, tensors, start)
            return
        snapshot = [(name, t.to(self.rollout_dtype)) for name, t in tensors]
        self._thread = threading.Thread(
            target=self._run, args=(version, snapshot, start), name=f"rl-publish-v{version}", daemon=True
        )
        self._thread.start()

    def _run(self, version: int, snapshot: list, start: float) -> None:
        try:
            self._write(version, snapshot, start)
        except BaseException as e:  # raised in the training loop by the next wait()
            self._error = e

    def _write(self, version: int, tensors: Iterable, start: float) -> None:
        written = self.writer.write(version, tensors)
        self.announce(version)
        total = time.perf_counter() - start
        with self._lock:
            self._finished.append((written, total))
        log.info(
            "published policy v%d (%s): %.1f MB shipped of %.1f MB full in %.2f s%s",
            version,
            written.manifest.format,
            written.bytes_shipped / 1e6,
            written.bytes_full / 1e6,
            total,
            "" if written.changed_fraction is None else f", {100 * written.changed_fraction:.2f}% of elements changed",
        )

    def wait(self) -> None:
        """Until the version in flight (if any) is announced; re-raises its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"publishing a policy version failed: {error}") from error

    def take_metrics(self) -> dict[str, float]:
        """`weights/*` of the newest version announced since the last call (empty if none)."""
        with self._lock:
            finished, self._finished = self._finished, []
        if not finished:
            return {}
        written, total = finished[-1]
        out = {
            "weights/publish_s": total,
            "weights/write_s": written.seconds,
            "weights/bytes_full": float(written.bytes_full),
            "weights/bytes_shipped": float(written.bytes_shipped),
            "weights/version": float(written.manifest.version),
        }
        if written.changed_fraction is not None:
            out["weights/changed_fraction"] = written.changed_fraction
        return out
