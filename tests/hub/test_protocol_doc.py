"""docs/protocol.md's list of routes is the app's: a route added, removed or renamed fails here."""

from __future__ import annotations

import re
from pathlib import Path

from fastapi.routing import APIRoute

from rl.config import load_config
from rl.hub.data import PromptSet
from rl.hub.routes import create_app
from rl.hub.service import Hub
from rl.hub.state import HubState
from rl.wire.tokens import Tokens

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
ROUTE_LINE = re.compile(r"^(GET|HEAD|POST|PUT|PATCH|DELETE)\s+(/\S*)", re.MULTILINE)


def normalised(path: str) -> str:
    """Path parameters by position only: the doc writes `{id}` where the app names `{worker_id}`."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def documented_routes() -> set[tuple[str, str]]:
    text = PROTOCOL.read_text()
    listing = text.split("The routes and their models", 1)[1].split("```")[1]  # the first code block after it
    return {(method, normalised(path)) for method, path in ROUTE_LINE.findall(listing)}


def served_routes(tmp_path) -> set[tuple[str, str]]:
    cfg = load_config(None, [])
    prompts = PromptSet(rows=[{"question": "q", "answer": "a"}], prompt_ids=[[1, 2]], skipped_too_long=0)
    state = HubState(cfg, prompts, vocab_size=50)
    hub = Hub(cfg, state, pool=None, tokenizer=None, policy_dir=tmp_path / "policy", tokens=Tokens("admin", ["w"]))
    app = create_app(hub)
    return {
        (method, normalised(route.path))
        for route in app.routes
        if isinstance(route, APIRoute)  # FastAPI's own /openapi.json, /docs, /redoc: described in the text
        for method in route.methods
    }


def test_every_route_the_app_serves_is_documented_and_no_other(tmp_path):
    served, documented = served_routes(tmp_path), documented_routes()
    assert len(served) >= 20
    assert served - documented == set(), "routes missing from docs/protocol.md"
    assert documented - served == set(), "routes in docs/protocol.md that the app does not serve"
