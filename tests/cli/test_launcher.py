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
