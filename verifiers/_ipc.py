"""Child processes the asyncio loop can talk to without ever blocking.

Worker processes, sandboxed reasoning-gym servers and sandboxed code runs all
speak over their stdin/stdout pipes. Messages are framed: a 4-byte big-endian
length, then the payload. `ChildProcess` makes the pipes non-blocking and waits
on them with `loop.add_reader`/`add_writer` of whichever loop is running, so a
pool built outside any loop (as the hub does) works from the hub's loop, and
`score_many_sync` can use a fresh loop per call. Children run in their own
process group, so `kill()` takes their descendants along.

`IdleSet` hands idle resources (workers, sandbox slots) to waiting coroutines
first-come-first-served; unlike `asyncio.Queue` it is not tied to one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import struct
import subprocess
import time
from collections import deque
from collections.abc import Sequence
from typing import BinaryIO, Generic, TypeVar

from verifiers.base import VerifierError

HEADER = struct.Struct(">I")
MAX_FRAME = 256 << 20
_CHUNK = 1 << 16

T = TypeVar("T")


class ChildDied(RuntimeError):
    """The child closed its pipe (exited or crashed) before answering."""


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def read_frame_blocking(stream: BinaryIO) -> bytes | None:
    """Next frame from a blocking stream (child side); None at end of input."""
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes exceeds the limit")
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


class ChildProcess:
    """A subprocess with non-blocking stdin/stdout; stderr keeps only its last `stderr_tail` bytes."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        stderr_tail: int = 4096,
        max_output: int = MAX_FRAME,
    ) -> None:
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self._in, self._out, self._err = (
            self.proc.stdin.fileno(),
            self.proc.stdout.fileno(),
            self.proc.stderr.fileno(),
        )
        for fd in (self._in, self._out, self._err):
            os.set_blocking(fd, False)
        self._buf = bytearray()
        self._err_buf = bytearray()
        self._stderr_tail = stderr_tail
        self._max_output = max_output
        self.eof = False
        self._err_eof = False
        self.killed = False

    # ------------------------------------------------------------------ reading

    def _drain(self) -> None:
        """Read whatever is available on stdout and stderr without blocking."""
        for fd, buf, is_out in ((self._out, self._buf, True), (self._err, self._err_buf, False)):
            while is_out or not self._err_eof:
                try:
                    chunk = os.read(fd, _CHUNK)
                except BlockingIOError:
                    break
                except OSError:
                    chunk = b""
                if not chunk:
                    if is_out:
                        self.eof = True
                    else:
                        self._err_eof = True
                    break
                buf += chunk
                if not is_out and len(buf) > self._stderr_tail:
                    del buf[: len(buf) - self._stderr_tail]
                if is_out and len(buf) > self._max_output:
                    raise ChildDied(f"child wrote more than {self._max_output} bytes")

    async def _wait_readable(self, deadline: float | None) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        watched = [self._out] if self._err_eof else [self._out, self._err]
        for fd in watched:
            loop.add_reader(fd, ready)
        try:
            timeout = None if deadline is None else max(0.0, deadline - loop.time())
            await asyncio.wait_for(fut, timeout)
        finally:
            for fd in watched:
                loop.remove_reader(fd)

    def _pop_frame(self) -> bytes | None:
        if len(self._buf) < HEADER.size:
            return None
        (size,) = HEADER.unpack_from(self._buf)
        if size > self._max_output:
            raise ChildDied(f"child sent a frame of {size} bytes")
        if len(self._buf) < HEADER.size + size:
            return None
        data = bytes(self._buf[HEADER.size : HEADER.size + size])
        del self._buf[: HEADER.size + size]
        return data

    async def read_frame(self, deadline: float | None = None) -> bytes:
        """Next frame; `asyncio.TimeoutError` past `deadline` (loop time), `ChildDied` at end of output."""
        while True:
            self._drain()
            data = self._pop_frame()
            if data is not None:
                return data
            if self.eof:
                raise ChildDied(await self._exit_reason())
            await self._wait_readable(deadline)

    async def wait_ready(self, timeout_s: float, what: str) -> None:
        """Wait for the child's first frame, `{"ready": true}`; `VerifierError` naming the child (`what`)
        when it answers `{"error": ...}` instead, dies, or says nothing within `timeout_s`."""
        loop = asyncio.get_running_loop()
        try:
            hello = json.loads(await self.read_frame(loop.time() + timeout_s))
        except (TimeoutError, ChildDied, ValueError) as e:
            raise VerifierError(f"{what} did not start: {e!r}") from None
        if not hello.get("ready"):
            raise VerifierError(f"{what} failed to start: {hello.get('error')}")

    async def _exit_reason(self, grace_s: float = 0.5) -> str:
        """Why the output ended; waits briefly (without blocking) for the exit status to be known."""
        end = time.monotonic() + grace_s
        while self.proc.poll() is None and time.monotonic() < end:
            await asyncio.sleep(0.01)
        return self.describe_exit()

    async def read_all(self, deadline: float | None = None) -> bytes:
        """Everything the child writes to stdout until it closes it."""
        while True:
            self._drain()
            if self.eof:
                return bytes(self._buf)
            await self._wait_readable(deadline)

    # ------------------------------------------------------------------ writing

    async def write(self, payload: bytes, deadline: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(payload)
        while view:
            try:
                written = os.write(self._in, view)
                view = view[written:]
                continue
            except BlockingIOError:
                pass
            except (BrokenPipeError, OSError) as e:
                raise ChildDied(f"child stopped reading ({e}); {self.describe_exit()}") from None
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_writer(self._in, lambda f=fut: f.done() or f.set_result(None))
            try:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait_for(fut, timeout)
            finally:
                loop.remove_writer(self._in)

    async def send_frame(self, payload: bytes, deadline: float | None = None) -> None:
        await self.write(frame(payload), deadline)

    def close_stdin(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()

    # ------------------------------------------------------------------ ending

    def stderr_text(self) -> str:
        with contextlib.suppress(ChildDied):
            self._drain()
        return self._err_buf.decode("utf-8", "replace").strip()

    def describe_exit(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "child closed its output"
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        tail = self.stderr_text()
        return f"{how}: {tail[-300:]}" if tail else how

    def alive(self) -> bool:
        return not self.eof and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the child's whole process group; never blocks (zombies are reaped later)."""
        self.killed = True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            with contextlib.suppress(OSError):
                stream.close()
        self.eof = True
        self.proc.poll()


class IdleSet(Generic[T]):
    """Idle resources handed to waiters in order; usable from any (one at a time) event loop."""

    def __init__(self) -> None:
        self._idle: deque[T] = deque()
        self._waiters: deque[asyncio.Future[T]] = deque()

    def __len__(self) -> int:
        return len(self._idle)

    def release(self, item: T) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(item)
                return
        self._idle.append(item)

    async def acquire(self) -> T:
        if self._idle:
            return self._idle.popleft()
        waiter: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(waiter.result())
            raise

    def drain(self) -> list[T]:
        items = list(self._idle)
        self._idle.clear()
        return items
