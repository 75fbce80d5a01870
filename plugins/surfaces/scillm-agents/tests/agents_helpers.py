"""What the standing-agent tests share: a git repository, the scripted fake model (decides from the request, as
codex sends it through scillm to the Codex backend), a scillm server with the agents surface, and SSE reading."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
from scillm_exec import group_members

from scillm_core.testing import Reply, ServerThread, make_app
from scillm_core.testing.fakes import RecordedRequest

MASTER_KEY = "sk-master-SECRET-agents-9876543210"
CALLER = "agents-tests"
PRICING = {"codex/gpt-5.5": {"input": 1.0, "output": 2.0}}  # dollars per million tokens: turns have a cost
PLUGINS = ["agents", "exec", "responses", "codex", "auth", "keys", "budgets", "ops", "metrics", "ui"]


def make_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    run = lambda *a: subprocess.run(["git", *a], cwd=path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q", "-b", "main")
    (path / "hello.txt").write_text("hello world\n")
    run("add", ".")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return path


# -- the scripted model ---------------------------------------------------------------------------------------------
# A turn's directive is the last user message that holds one; tool outputs after it say how far the turn got.
#   REMEMBER <word>   -> "NOTED <word>"
#   RECALL            -> "RECALLED: <every NOTED word in the conversation>"
#   EDIT              -> exec_command sed (hello -> goodbye) in the worktree, then "DONE: edited hello.txt"
#   WAIT <path>       -> exec_command that blocks until <path> exists, then "DONE after wait" (+ steer text seen)
#   HANG              -> the model never answers
#   RUN <command>     -> exec_command <command>, then "RAN: <its output>"

DIRECTIVE = re.compile(r"\b(REMEMBER|RECALL|EDIT|WAIT|HANG|RUN)\b(.*)", re.S)


def user_texts(item: Mapping[str, Any]) -> str:
    if item.get("type", "message") != "message" or item.get("role") != "user":
        return ""
    content = item.get("content")
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text") or "") for p in content or [] if isinstance(p, dict))


def all_text(body: Mapping[str, Any]) -> str:
    return json.dumps(body.get("input") or [])


def responder(request: RecordedRequest) -> Reply | None:
    body = request.body if isinstance(request.body, dict) else {}
    items = [i for i in body.get("input") or [] if isinstance(i, dict)]
    at, directive, argument = -1, "", ""
    for n, item in enumerate(items):
        found = DIRECTIVE.search(user_texts(item))
        if found and "<environment_context>" not in user_texts(item):
            at, directive, argument = n, found.group(1), found.group(2).strip()
    outputs = [i for i in items[at + 1:] if i.get("type") == "function_call_output"]
    later_users = " | ".join(t for i in items[at + 1:] if (t := user_texts(i)))
    tools = {t.get("name") for t in body.get("tools") or []}
    assert "exec_command" in tools, tools

    def shell(cmd: str) -> Reply:
        return Reply.call("exec_command", {"cmd": cmd, "yield_time_ms": 30000}, id=f"call_{time.monotonic_ns()}")

    if directive == "REMEMBER":
        return Reply.say(f"NOTED {argument.split()[0]}")
    if directive == "RECALL":
        return Reply.say("RECALLED: " + " ".join(re.findall(r"NOTED (\w[\w-]*)", all_text(body))))
    if directive == "EDIT":
        if not outputs:
            return shell("sed -i 's/hello world/goodbye world/' hello.txt")
        return Reply.say("DONE: edited hello.txt")
    if directive == "WAIT":
        if not outputs:
            return shell(f"while [ ! -e {argument.split()[0]} ]; do sleep 0.05; done; echo released")
        return Reply.say(f"DONE after wait; later user input: {later_users or 'none'}")
    if directive == "HANG":
        return Reply(hang=True)
    if directive == "RUN":
        if not outputs:
            return shell(argument)
        return Reply.say("RAN: " + str(outputs[-1].get("output")))
    return Reply.say("OK")


# -- scillm ---------------------------------------------------------------------------------------------------------

def start_scillm(data_dir: Path, workers: Mapping[str, Mapping[str, Any]], env: Mapping[str, str],
                 max_live: int = 8) -> ServerThread:
    app = make_app(env={"SCILLM_MASTER_KEY": MASTER_KEY, **env}, data_dir=data_dir, only=PLUGINS,
                   config={"agents": {name: dict(cfg) for name, cfg in workers.items()},
                           "standing_agents": {"max_live": max_live}, "pricing": PRICING,
                           "exec": {"kill_grace_s": 1.0, "heartbeat_s": 0.5}})
    return ServerThread(app).start()


def client(server: ServerThread) -> httpx.Client:
    return httpx.Client(base_url=server.url + "/v1/scillm/agents", timeout=180, headers={
        "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": CALLER})


def events(http: httpx.Client, worker: str, after: int = 0, *,
           until: Callable[[dict[str, Any]], bool] | None = None) -> Iterator[dict[str, Any]]:
    """The worker's SSE event stream from ``after``, as dicts; stops after the first event ``until`` accepts, or at
    the stream's end event (yielded as ``{"type": "end", ...}``)."""
    with http.stream("GET", f"/{worker}/events/stream", params={"after": after}) as response:
        assert response.status_code == 200, response.read()
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                yield event
                if kind == "end" or (until is not None and until(event)):
                    return
                kind = None


def wait_event(http: httpx.Client, worker: str, after: int, predicate: Callable[[dict[str, Any]], bool]
               ) -> dict[str, Any]:
    for event in events(http, worker, after, until=predicate):
        if predicate(event):
            return event
    raise AssertionError(f"{worker}: the event stream ended before the awaited event")


def codex_processes(data_dir: Path) -> list[int]:
    """Live processes (not zombies) whose CODEX_HOME lies under ``data_dir``: the workers' app-servers and
    anything they started."""
    found = []
    marker = f"CODEX_HOME={data_dir}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as fh:
                environ = fh.read()
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in environ and state != b"Z":
            found.append(int(entry.name))
    return found


def run_key_of(pid: int) -> str:
    with open(f"/proc/{pid}/environ", "rb") as fh:
        for entry in fh.read().split(b"\0"):
            if entry.startswith(b"SCILLM_API_KEY="):
                return entry.split(b"=", 1)[1].decode()
    raise AssertionError(f"pid {pid} has no SCILLM_API_KEY")


def no_group_left(pgids: list[int]) -> bool:
    return all(not group_members(pgid) for pgid in pgids)
