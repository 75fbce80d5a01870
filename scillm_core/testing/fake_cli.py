#!/usr/bin/env python3
"""A tiny stand-in for an agent CLI. Its behaviour comes from the first line of the prompt (stdin, else the last
argument), a JSON object: {"mode": ..., ...}. It prints JSON events the way the CLI it is named after does."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

name = os.path.basename(sys.argv[0])
raw = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
if not raw.strip():
    raw = sys.argv[-1]
spec = json.loads(raw.splitlines()[0]) if raw.strip().startswith("{") else {"mode": "ok", "text": raw}
mode = spec.get("mode", "ok")


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def final(text):
    if name == "codex":
        emit({"type": "item.completed", "item": {"id": "item_0", "type": "agent_message", "text": text}})
        emit({"type": "turn.completed", "usage": {}})
    elif name == "claude":
        emit({"type": "result", "subtype": "success", "is_error": False, "result": text})
    elif name == "opencode":
        emit({"type": "text", "part": {"type": "text", "text": text}})
    elif name == "pi":
        emit({"type": "agent_end", "messages": [{"role": "assistant", "content": [{"type": "text", "text": text}]}]})
    else:
        emit({"type": "final", "text": text})


def record_pids(extra=()):
    with open(os.path.join(os.getcwd(), "pids.json"), "w") as fh:
        json.dump({"pid": os.getpid(), "pgid": os.getpgid(0), "children": list(extra)}, fh)


emit({"type": "start", "name": name, "argv": sys.argv[1:]})
if mode == "ok":
    final(spec.get("text", "done"))
elif mode == "env":
    files = {}
    for root, _, names in os.walk(os.environ.get("HOME", "/nonexistent")):
        for n in names:
            path = os.path.join(root, n)
            try:
                files[path] = open(path).read()[:20000]
            except OSError:
                pass
    emit({"type": "env", "env": dict(os.environ), "files": files, "stdin": raw})
    final("env dumped")
elif mode == "call":
    base = os.environ.get("ANTHROPIC_BASE_URL") or spec["base"]
    key = os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("SCILLM_API_KEY")
    out = {}
    chat = {"model": spec["model"], "messages": [{"role": "user", "content": "hi"}]}
    calls = [("/v1/chat/completions", chat), ("/v1/scillm/exec", {"profile": "llm-call", "prompt": "x"})]
    calls += [(path, None) for path in spec.get("get", [])]  # GET routes to try with the run key
    for path, body in calls:
        req = urllib.request.Request(base + path, data=None if body is None else json.dumps(body).encode(),
                                     method="GET" if body is None else "POST", headers={
            "authorization": f"Bearer {key}", "content-type": "application/json", "x-caller-skill": "child"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                out[path] = [resp.status, json.loads(resp.read())]
        except urllib.error.HTTPError as exc:
            out[path] = [exc.code, json.loads(exc.read())]
    emit({"type": "calls", "calls": out})
    final(out["/v1/chat/completions"][1]["choices"][0]["message"]["content"])
elif mode in ("sleep", "idle"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stubborn CLI: only SIGKILL ends it
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", stubborn])
    record_pids([child.pid])
    emit({"type": "working"})
    while True:
        time.sleep(0.2)
        if mode == "sleep":
            sys.stdout.write(json.dumps({"type": "tick"}) + "\n")  # busy: never idle
            sys.stdout.flush()
elif mode == "huge":
    big = "x" * (spec.get("mb", 5) * 1024 * 1024)
    emit({"type": "blob", "data": big})
    sys.stdout.write("y" * 300000 + "\n")
    sys.stdout.flush()
    sys.stderr.write("e" * 200000 + "\n")
    final("after huge lines")
elif mode == "write":  # a CLI that ignores its sandbox flag and writes wherever it likes
    writes = {}
    for path in spec["paths"]:
        path = os.path.expandvars(path)
        try:
            with open(path, "w") as fh:
                fh.write("written by a CLI that ignores its sandbox\n")
            writes[path] = "written"
        except OSError as exc:
            writes[path] = exc.strerror
    emit({"type": "writes", "writes": writes})
    final("tried to write")
elif mode == "leak":
    # prints the run key across a read boundary: the first 64 KiB read ends in the middle of it
    key = os.environ.get("SCILLM_API_KEY") or os.environ.get("ANTHROPIC_API_KEY") or ""
    if spec.get("key_file"):  # where a secret-scanning test learns the key it must not find
        with open(spec["key_file"], "w") as fh:
            fh.write(key)
    half = len(key) // 2
    for stream in (sys.stdout, sys.stderr):
        stream.write("x" * (65536 - half) + key[:half])
        stream.flush()
    time.sleep(0.3)
    for stream in (sys.stdout, sys.stderr):
        stream.write(key[half:] + " <- the run key\n")
        stream.flush()
    final("leaked " + key)
elif mode == "fail":
    sys.stderr.write("fake failure\n")
    sys.exit(3)
elif mode == "events":  # the given events as they are, well-formed JSON of whatever shape
    for event in spec.get("events", []):
        emit(event)
