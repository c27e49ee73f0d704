"""The launcher's reading of a full disk: a failure raised by a background writer still names the device."""

from __future__ import annotations

import errno

from rl.cli.launcher import _no_space, disk_full


def _wrapped(error: BaseException) -> RuntimeError:
    try:
        try:
            raise error
        except OSError as e:
            raise RuntimeError(f"publishing a policy version failed: {e}") from e
    except RuntimeError as outer:
        return outer


def test_no_space_is_found_through_a_wrapping_error():
    """The publisher thread's ENOSPC is re-raised as a RuntimeError from it (the CI failure of stop 24)."""
    full = OSError(errno.ENOSPC, "No space left on device", "/run/weights/v3/shard-0.safetensors")
    assert _no_space(full) is full
    assert _no_space(_wrapped(full)) is full
    other = OSError(errno.EACCES, "Permission denied")
    assert _no_space(_wrapped(other)) is None
    assert _no_space(ValueError("unrelated")) is None


def test_a_certain_disk_full_names_the_device_and_how_to_resume(tmp_path):
    (tmp_path / "config.yaml").write_text("")
    said = disk_full(tmp_path, certain=True)
    assert said is not None and f"no space left on the device of {tmp_path}" in said and "--resume" in said
    assert disk_full(tmp_path) is None  # this disk has room: only a failed write makes it certain


def test_a_local_worker_spins_briefly_only_when_it_owns_its_cores(monkeypatch):
    """Brief OpenMP spinning speeds vLLM-CPU's decode steps ~15%, but took ~14% off a staleness-1 quickstart
    step, where the trainer computes on the same cores meanwhile (docs/benchmarks.md)."""
    from rl.cli.launcher import BRIEF_SPIN, worker_spin
    from rl.config import load_config

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)

    def spin(*overrides: str) -> dict[str, str]:
        return worker_spin(load_config("quickstart", list(overrides)))

    assert spin() == {}  # staleness 1, two local workers: they share the cores with the trainer and each other
    assert spin("rollout.local_workers=1") == {}  # staleness 1: the trainer trains while the worker generates
    assert spin("rollout.local_workers=1", "async.max_staleness=0") == {"GOMP_SPINCOUNT": BRIEF_SPIN}  # turns
    assert spin("async.max_staleness=0") == {}  # two workers generate at once
    apart = ("rollout.local_workers=1", "rollout.cpus=[0]", "trainer.cpus=[1]")
    assert spin(*apart) == {"GOMP_SPINCOUNT": BRIEF_SPIN}
    assert spin("rollout.local_workers=1", "rollout.cpus=[0,1]", "trainer.cpus=[1]") == {}
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")  # the user's own setting is kept
    assert spin("rollout.local_workers=1", "async.max_staleness=0") == {}
