"""The child process that runs a third-party environment (rl/envs/third_party.py): its own interpreter and venv.

Run as `python -I third_party_child.py KIND TARGET ARGS_JSON [PATH ...]` with the environments' venv
(`.venv-envs`, scripts/setup.sh): this file imports nothing from scatter-rl (whose `verifiers`
package shares its import name with Prime Intellect's), only the standard library and the
third-party package, by name at run time. It answers one JSON request per stdin line with one JSON
line on stdout; anything the environment prints goes to stderr.

Requests: `{"op": "rows", "size": n, "seed": s}` -> `{"rows": [...]}` (each with `question`: a
string or chat messages), and `{"op": "step", "row": row, "turns": [text, ...]}` ->
`{"messages": [...], "done": bool, "reward": float, "components": {...}}`: the episode of `row`
replayed with the model's turns so far (the environment must be deterministic given its row and
the turns: the hub keeps no object of the child's, so an episode survives a hub or child
restart); `messages` are what the environment says after the last turn, and when `done`, `reward`
and `components` are its rubric's grade. Errors come back as `{"error": "..."}`.

Kinds: `verifiers` (Prime Intellect's Environment format: TARGET is an environment id whose
module has `load_environment(**args)`, or `module:callable`; episodes run through the
environment's own `rollout`, the model's turns fed in by a scripted client, and graded by its
rubric's `score_rollout`) and `textarena` (TARGET a game id such as `GuessTheNumber-v0`, one player;
the grade is the game's reward for the player).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import sys
from typing import Any

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
"""A native tool call in a turn's text, in the Hermes format the chat templates of Qwen2.5, Qwen3 and others
teach: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`."""


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: keep the text ones
        return "".join(p.get("text", "") if isinstance(p, dict) else str(getattr(p, "text", "")) for p in content)
    return "" if content is None else str(content)


def _message(m: Any) -> dict[str, str]:
    d = m if isinstance(m, dict) else m.model_dump()
    return {"role": str(d.get("role", "user")), "content": _text(d.get("content"))}


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(row, default=str))


def tool_calls(text: str, turn: int) -> tuple[str, list[dict[str, str]]]:
    """(the text outside tool calls, the calls as {id, name, arguments JSON}) of turn number `turn`. Ids are
    made from the turn and position, so a replayed episode gets the same ones. A call that does not parse
    is passed on with name "" and its raw text as arguments: the environment answers with its error."""
    calls = []
    for k, found in enumerate(TOOL_CALL.finditer(text)):
        try:
            call = json.loads(found.group(1))
            name, args = str(call["name"]), call.get("arguments", {})
            arguments = args if isinstance(args, str) else json.dumps(args)
        except (ValueError, KeyError, TypeError, AttributeError):
            name, arguments = "", found.group(1)
        calls.append({"id": f"call_{turn}_{k}", "name": name, "arguments": arguments})
    return (TOOL_CALL.sub("", text).strip() if calls else text), calls


def _tool_schemas(defs: list[Any]) -> list[dict[str, Any]]:
    """Tool definitions (vf.Tool or dicts) as the OpenAI function schemas chat templates take (`tools=`)."""
    out = []
    for d in defs:
        d = d if isinstance(d, dict) else d.model_dump()
        fn = {"name": d["name"], "description": d.get("description") or "", "parameters": d.get("parameters") or {}}
        out.append({"type": "function", "function": fn})
    return out


class VerifiersDriver:
    """Prime Intellect's `verifiers` environments (the classic `import verifiers as vf` surface)."""

    def __init__(self, target: str, args: dict[str, Any]):
        self.vf = importlib.import_module("verifiers")
        if ":" in target:
            module, attr = target.split(":", 1)
            self.env = getattr(importlib.import_module(module), attr)(**args)
        else:
            self.env = self.vf.load_environment(target, **args)
        self.client_cls = self._scripted_client()

    def _scripted_client(self):
        """A model client that answers with the hub's turns, in order, and stops when it runs out."""
        client_mod = importlib.import_module("verifiers.clients")
        types = importlib.import_module("verifiers.types")

        class Scripted(client_mod.Client):
            def __init__(self, turns: list[str]):
                super().__init__(None)
                self.turns, self.asked, self.waiting = list(turns), None, asyncio.Event()
                self.served = 0

            def setup_client(self, config):
                return None

            async def to_native_tool(self, tool):
                return tool

            async def to_native_prompt(self, messages):
                return messages, {}

            async def get_native_response(self, prompt, model, sampling_args, tools=None, **kwargs):
                if not self.turns:
                    self.asked = prompt
                    self.waiting.set()
                    await asyncio.Future()  # the episode pauses here for the next turn: cancelled
                self.served += 1
                return self.served - 1, self.turns.pop(0)

            async def raise_from_native_response(self, response):
                return None

            async def from_native_response(self, response):
                turn, text = response
                content, calls = tool_calls(text, turn)
                message = types.ResponseMessage(
                    content=content,
                    tool_calls=[types.ToolCall(**c) for c in calls] or None,
                    finish_reason="tool_calls" if calls else "stop",
                    is_truncated=False,
                )
                return types.Response(id="turn", created=0, model="policy", message=message)

            async def close(self):
                return None

        return Scripted

    def rows(self, size: int, seed: int) -> list[dict[str, Any]]:
        """The dataset's rows; an environment with tools (the environment's `tool_defs`, or a row's
        `info.tool_defs`) gives each row `tools`, the schemas the hub renders into the prompt."""
        out = []
        for i, row in enumerate(self.env.get_dataset(n=size, seed=seed)):
            info = row.get("info")
            defs = (info.get("tool_defs") if isinstance(info, dict) else None) or self.env.tool_defs or []
            row = _json_row(dict(row))
            row.setdefault("example_id", i)
            out.append({"question": [_message(m) for m in row["prompt"]], "vf": row})
            if defs:
                out[-1]["tools"] = _tool_schemas(defs)
        return out

    async def step(self, row: dict[str, Any], turns: list[str]) -> dict[str, Any]:
        client = self.client_cls(turns)
        rollout = asyncio.ensure_future(self.env.rollout(dict(row["vf"]), client, "policy", {}))
        paused = asyncio.ensure_future(client.waiting.wait())
        await asyncio.wait({rollout, paused}, return_when=asyncio.FIRST_COMPLETED)
        if not rollout.done():
            rollout.cancel()
            await asyncio.gather(rollout, return_exceptions=True)
            asked = [_message(m) for m in client.asked]
            last = max((i for i, m in enumerate(asked) if m["role"] == "assistant"), default=len(asked) - 1)
            return {"messages": asked[last + 1 :], "done": False}
        paused.cancel()
        state = rollout.result()
        if state.get("error") is not None:
            raise RuntimeError(f"the environment's rollout failed: {state['error']!r}")
        await self.env.rubric.score_rollout(state)
        metrics = {k: float(v) for k, v in (state.get("metrics") or {}).items() if isinstance(v, (int, float))}
        return {"messages": [], "done": True, "reward": float(state["reward"] or 0.0), "components": metrics}


class TextArenaDriver:
    """TextArena single-player games: the observation after a turn is what the game adds to its history."""

    def __init__(self, target: str, args: dict[str, Any]):
        self.ta = importlib.import_module("textarena")
        self.game, self.args = target, args

    def _play(self, seed: int, turns: list[str]):
        env = self.ta.make(env_id=self.game, **self.args)
        env.reset(num_players=1, seed=seed)
        _, seen = env.get_observation()
        said, done = seen, False
        for turn in turns:
            done, _ = env.step(turn)
            if done:
                break
            _, obs = env.get_observation()
            said, seen = (obs[len(seen) :] if obs.startswith(seen) else obs), obs
        return env, said, done

    def rows(self, size: int, seed: int) -> list[dict[str, Any]]:
        out = []
        for i in range(size):
            game_seed = seed * 1_000_003 + i
            _, first, _ = self._play(game_seed, [])
            out.append({"question": first.strip(), "seed": game_seed})
        return out

    async def step(self, row: dict[str, Any], turns: list[str]) -> dict[str, Any]:
        env, said, done = self._play(int(row["seed"]), turns)
        if not done:
            return {"messages": [{"role": "user", "content": said.strip()}], "done": False}
        rewards, info = env.close()
        reward = float((rewards or {}).get(0, 0.0))
        player = (info or {}).get(0, {})
        components = {"won": float(reward > 0), "invalid_move": float(bool(player.get("invalid_move")))}
        return {"messages": [], "done": True, "reward": reward, "components": components}


DRIVERS = {"verifiers": VerifiersDriver, "textarena": TextArenaDriver}


def main() -> None:
    kind, target, args, *paths = sys.argv[1:]
    sys.path[:0] = paths
    reply = os.fdopen(os.dup(1), "w", buffering=1)  # our replies; the environment's prints go to stderr
    os.dup2(2, 1)
    try:
        driver = DRIVERS[kind](target, json.loads(args))
    except Exception as e:  # noqa: BLE001 - the parent reports it
        reply.write(json.dumps({"error": f"loading {kind} environment {target!r}: {type(e).__name__}: {e}"}) + "\n")
        return
    reply.write(json.dumps({"ready": True}) + "\n")
    loop = asyncio.new_event_loop()
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "rows":
                out: dict[str, Any] = {"rows": driver.rows(int(req["size"]), int(req["seed"]))}
            else:
                out = loop.run_until_complete(driver.step(req["row"], list(req["turns"])))
        except Exception as e:  # noqa: BLE001 - the parent raises it
            out = {"error": f"{type(e).__name__}: {e}"}
        reply.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
