"""Helpers for the weight-mirror tests: a real nginx caching in front of a hub, and a mirror that lies.

`start_nginx` runs the shipped example config (configs/nginx/weights-cache.conf, the text
docs/operations.md shows) with only its addresses and cache path replaced, wrapped in a
minimal main config in a temp dir. `CorruptingMirror` relays blobs from the hub and damages
each (a byte flipped, halves swapped, or cut short): what a broken or hostile mirror looks like to a worker.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from helpers.hub import ROOT
from helpers.net import free_port

NGINX_CONF = ROOT / "configs" / "nginx" / "weights-cache.conf"
EXAMPLE_HUB = "server trainer.example:8000;"
EXAMPLE_SCHEME = "https://scatter_rl_hub"
EXAMPLE_LISTEN = "listen 8080;"
EXAMPLE_CACHE = "/var/cache/nginx/scatter-rl"


def nginx_binary() -> str:
    """Path of nginx; skips the test when it is missing, fails instead under CI (CI=true)."""
    path = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if path is None:
        reason = "nginx is not installed (scripts/setup.sh installs it as root; or apt-get install nginx-light)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI must run this test")
        pytest.skip(reason)
    return path


def render_site_config(hub_url: str, port: int, cache_dir: Path) -> str:
    """The example config with this test's hub (plain http on loopback), listen address and cache directory."""
    text = NGINX_CONF.read_text()
    for example in (EXAMPLE_LISTEN, EXAMPLE_CACHE, EXAMPLE_HUB):
        assert text.count(example) == 1, example
    hub = httpx.URL(hub_url)
    return (
        text.replace(EXAMPLE_LISTEN, f"listen 127.0.0.1:{port};")
        .replace(EXAMPLE_HUB, f"server {hub.host}:{hub.port};")
        .replace(EXAMPLE_SCHEME, f"{hub.scheme}://scatter_rl_hub")
        .replace(EXAMPLE_CACHE, str(cache_dir))
    )


@dataclass
class Nginx:
    proc: subprocess.Popen
    url: str
    root: Path

    def access_log(self) -> list[str]:
        return (self.root / "access.log").read_text().splitlines()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_nginx(root: Path, hub_url: str, port: int | None = None) -> Nginx:
    """nginx in the foreground with the example site config; returns once it accepts connections."""
    binary = nginx_binary()
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    (root / "site.conf").write_text(render_site_config(hub_url, port, root / "cache"))
    # As root, nginx's workers would switch to an unprivileged user that cannot enter pytest's tmp dirs.
    user = "user root;\n" if os.geteuid() == 0 else ""
    (root / "nginx.conf").write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"  access_log {root}/access.log;\n"
        f"  client_body_temp_path {root}/body;\n  proxy_temp_path {root}/proxy;\n"
        f"  include {root}/site.conf;\n"
        "}\n"
    )
    proc = subprocess.Popen(  # noqa: S603
        [binary, "-p", str(root), "-e", str(root / "error.log"), "-c", str(root / "nginx.conf")],
        stdout=subprocess.DEVNULL,
        stderr=open(root / "stderr.log", "ab"),  # noqa: SIM115
    )
    nginx = Nginx(proc, f"http://127.0.0.1:{port}", root)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (root / "stderr.log").read_text() + (root / "error.log").read_text()
            raise RuntimeError(f"nginx exited with {proc.returncode}:\n{log[-3000:]}")
        try:
            httpx.get(f"{nginx.url}/", timeout=1.0)
            return nginx
        except httpx.HTTPError:
            time.sleep(0.1)
    nginx.stop()
    raise RuntimeError("nginx did not start")


class CorruptingMirror:
    """A mirror of `/v1/blobs/` that relays each blob from the hub, damaged as `mode` says.

    flip: one byte flipped; reorder: the two halves swapped (right size, wrong order);
    truncate: the full Content-Length announced, half the bytes sent, connection closed.
    """

    MODES = ("flip", "reorder", "truncate")

    def __init__(self, hub_url: str, mode: str = "flip") -> None:
        assert mode in self.MODES
        self.hub_url, self.mode = hub_url.rstrip("/"), mode
        self.requests: list[str] = []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                mirror.requests.append(self.path)
                auth = {"Authorization": self.headers["Authorization"]} if self.headers["Authorization"] else {}
                upstream = httpx.get(mirror.hub_url + self.path, headers=auth, timeout=30.0)
                body, half = upstream.content, len(upstream.content) // 2
                send = body
                if upstream.status_code == 200 and body:
                    if mirror.mode == "flip":
                        send = body[:half] + bytes([body[half] ^ 0xFF]) + body[half + 1 :]
                    elif mirror.mode == "reorder":
                        send = body[half:] + body[:half]
                    else:
                        send = body[:half]
                self.send_response(upstream.status_code)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                self.wfile.write(send)
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CorruptingMirror:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
