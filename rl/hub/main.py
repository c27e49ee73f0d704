"""Start-up of the hub process: `rl hub CONFIG` (and `rl train`, which starts it as its own process).

`serve(cfg)` opens the ledger database (rl/hub/ledger.py), builds the `Hub`
(rl/hub/service.py: tokenizer, prompts, verifier pool), binds the socket and runs the
app of rl/hub/routes.py under uvicorn until `POST /v1/shutdown`, then flushes the ledger.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import sys
from pathlib import Path

from rl.config import RunConfig
from rl.hub.episode_store import EpisodeStore
from rl.hub.ledger import LedgerStore
from rl.hub.listen import listening_socket
from rl.hub.routes import create_app
from rl.hub.service import Hub
from rl.hub.state import HubState
from rl.wire.protocol import Ledger
from rl.wire.tokens import Tokens

log = logging.getLogger(__name__)

KEEP_ALIVE_S = 75
"""Seconds an idle worker connection stays open (as nginx's default)."""


def build_hub(
    cfg: RunConfig, ledger: Ledger | None = None, tokens: Tokens | None = None, store: LedgerStore | None = None
) -> Hub:
    """Load tokenizer and prompts, start the verifier pool; everything a hub needs but a socket.

    `ledger` restores the data position; `store` is where the ledger is kept from then on.
    """
    from transformers import AutoConfig, AutoTokenizer

    from rl.hub.data import PromptSet, load_rows
    from rl.models import resolve_model
    from verifiers.pool import VerifierPool

    model_dir = resolve_model(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
    vocab_size = AutoConfig.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code).vocab_size
    train_rows, eval_rows = load_rows(cfg.data)
    prompts = PromptSet.build(train_rows, cfg.data, tokenizer)
    eval_prompts = PromptSet.build(eval_rows, cfg.data, tokenizer) if eval_rows else None
    log.info("hub: %d training prompts (%d too long, skipped)", len(prompts), prompts.skipped_too_long)
    state = HubState(cfg, prompts, vocab_size, ledger, eval_prompts)
    pool = VerifierPool.from_config(cfg.rewards)
    if tokens is None:
        tokens, _ = Tokens.from_config(cfg)
    state.eval_operator = tokens.local_id
    return Hub(cfg, state, pool, tokenizer, cfg.paths.policy, tokens, store)


def open_ledger(cfg: RunConfig, ledger_path: Path | None) -> tuple[LedgerStore, Ledger | None]:
    """The run's ledger database and the ledger to start from.

    With `ledger_path` (a checkpoint's ledger.json: `rl train --resume`) that ledger wins and
    the database is reset to it; otherwise the database's own (a restart after a crash), if any.
    """
    store = LedgerStore(cfg.paths.hub_db)
    if ledger_path is not None:
        ledger = Ledger.model_validate_json(Path(ledger_path).read_text())
        store.reset(ledger)
        EpisodeStore(store.path).clear()  # episodes in flight after the checkpoint start over from their task
        log.info("hub ledger reset to %s", ledger_path)
        return store, ledger
    ledger = store.ledger
    if ledger is not None:
        log.warning("hub ledger restored from %s: position %d, %d batches taken, %d pending tasks re-queued "
                    "(delete the file to start the data over)", store.path, ledger.position, ledger.batches,
                    len(ledger.pending))  # fmt: skip
    return store, ledger


def serve(cfg: RunConfig, ledger_path: Path | None = None, fd: int | None = None) -> int:
    """Run the hub until shutdown; prints the URL (and generated tokens once). `fd`: a bound socket inherited
    from `rl train` (rl/hub/listen.py), else the hub binds `hub.host`:`hub.port` itself."""
    import uvicorn

    tokens, generated = Tokens.from_config(cfg)
    store, ledger = open_ledger(cfg, ledger_path)
    hub = build_hub(cfg, ledger, tokens, store)
    if fd is not None:
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)  # the verifier pool's processes must not hold the port
    else:
        try:
            sock = listening_socket(cfg.hub.host, cfg.hub.port)
        except OSError as e:
            print(f"hub: cannot listen on {cfg.hub.host}:{cfg.hub.port}: {e.strerror}", file=sys.stderr, flush=True)
            return 1
    port = sock.getsockname()[1]
    url = cfg.hub.public_url or f"http://{cfg.hub.host}:{port}"
    print(f"hub listening on {url}", file=sys.stderr, flush=True)
    if generated:
        print(f"admin token:  {tokens.admin}\nworker token: {tokens.workers[0]}", file=sys.stderr, flush=True)
    print(f"add a rollout worker: rl rollout --hub {url} --token <worker token>", file=sys.stderr, flush=True)
    app = create_app(hub)
    # What start-up built (modules, tokenizer, prompts) lives as long as the hub: frozen, no garbage
    # collection scans it again (a full one walked all of it; ~9% of a busy hub's main thread, py-spy).
    gc.collect()
    gc.freeze()
    # Keep idle connections well past a heartbeat interval: with uvicorn's default (5 s, the default
    # heartbeat too) the hub closes a worker's connection just as the worker reuses it, and the
    # request fails with a ReadError (retried, but logged as "hub unavailable").
    keep_alive = max(KEEP_ALIVE_S, int(3 * cfg.hub.heartbeat_interval_s) + 1)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_keep_alive=keep_alive)
    )

    async def main() -> None:
        async def stop_on_request() -> None:
            await hub.shutdown_requested.wait()
            await asyncio.sleep(0.2)  # let the shutdown response go out
            server.should_exit = True

        watcher = asyncio.create_task(stop_on_request())
        try:
            await server.serve(sockets=[sock])
        finally:
            watcher.cancel()
            hub.pool.close()

    try:
        try:
            import uvloop  # uvicorn[standard] brings it: a faster event loop than asyncio's default
        except ImportError:
            asyncio.run(main())
        else:
            uvloop.run(main())
    finally:  # after the loop, whose exit waited for any ledger write still running in a thread
        hub.flush_ledger()
        store.close()
    return 0
