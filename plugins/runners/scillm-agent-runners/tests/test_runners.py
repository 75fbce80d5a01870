"""The real runners driven with a fake CLI binary (fake_cli.py installed under each CLI's name): environment
scrubbing, isolated config pointed at scillm, opt-outs, sandbox flags, final-answer extraction; llm-call; doctor."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import scillm_core.testing
from scillm_core.testing import FakeOpenAI, Reply, ServerThread, make_app

PROVIDER_SECRET = "sk-provider-SECRET-runners-0123456789"
MASTER_KEY = "sk-master-SECRET-runners-9876543210"
FAKE = Path(scillm_core.testing.__file__).with_name("fake_cli.py")  # the harness's scripted fake CLI
BINARIES = {"codex-exec": "codex", "claude-print": "claude", "opencode-run": "opencode", "pi": "pi"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    bin_dir = tmp_path_factory.mktemp("bin")
    for name in BINARIES.values():
        shim = bin_dir / name
        shim.write_text(f"#!{sys.executable}\n" + FAKE.read_text())
        shim.chmod(0o755)
    root = tmp_path_factory.mktemp("root")
    data = tmp_path_factory.mktemp("data")
    # secrets in the server's own process environment too: none may reach a child
    old = {k: os.environ.get(k) for k in ("OPENAI_API_KEY", "SCILLM_MASTER_KEY")}
    os.environ["OPENAI_API_KEY"], os.environ["SCILLM_MASTER_KEY"] = PROVIDER_SECRET, MASTER_KEY
    try:
        with FakeOpenAI() as fake:
            app = make_app(env={"OPENAI_API_KEY": PROVIDER_SECRET, "OPENAI_API_BASE": fake.url + "/v1",
                                "SCILLM_MASTER_KEY": MASTER_KEY}, data_dir=data,
                           config={"exec": {"allowed_roots": [str(root)], "kill_grace_s": 0.5},
                                   "agent_runners": {"bin_dir": str(bin_dir), "default_model": "openai/fake-model"}},
                           only=["exec", "agent-runners", "auth", "chat", "responses", "messages", "openai-compat"])
            with ServerThread(app) as server:
                client = httpx.Client(base_url=server.url, timeout=60, headers={
                    "authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "runner-tests"})
                yield {"client": client, "root": root, "fake": fake, "url": server.url, "bin": bin_dir, "app": app}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(env: dict[str, Any], profile: str, prompt: str, **body: Any) -> dict[str, Any]:
    response = env["client"].post("/v1/scillm/exec", json={
        "profile": profile, "prompt": prompt, "cwd": str(env["root"]), "wait": True, **body})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def events_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(result["artifacts"]["events_jsonl"]).read_text().splitlines()]


@pytest.mark.parametrize("profile", list(BINARIES))
def test_final_answer_extracted(env: dict[str, Any], profile: str) -> None:
    result = run(env, profile, json.dumps({"mode": "ok", "text": "the answer"}))
    assert result["status"] == "completed" and result["final_text"] == "the answer" and result["exit_code"] == 0


@pytest.mark.parametrize(("profile", "event"), [
    ("codex-exec", {"type": "turn.failed", "error": "a string where codex has an object"}),
    ("pi", {"type": "agent_end", "messages": 5})])
def test_a_final_event_of_the_wrong_shape_fails_the_run_as_the_clis_fault(env: dict[str, Any], profile: str,
                                                                            event: dict[str, Any]) -> None:
    result = run(env, profile, json.dumps({"mode": "events", "events": [event]}))
    assert result["status"] == "failed"
    assert result["error"].startswith(f"{BINARIES[profile]}'s output is not in its format (")


@pytest.mark.parametrize("profile", list(BINARIES))
@pytest.mark.parametrize("sandbox", ["read-only", "workspace-write"])
def test_child_env_config_and_sandbox(env: dict[str, Any], profile: str, sandbox: str) -> None:
    result = run(env, profile, '{"mode": "env"}', sandbox=sandbox)
    assert result["status"] == "completed"
    dump = next(e for e in events_of(result) if e["type"] == "env")["event"]
    child, files = dump["env"], dump["files"]
    argv = next(e for e in events_of(result) if e["type"] == "start")["event"]["argv"]
    blob = json.dumps(dump)
    # no provider key, no master key, nothing inherited from the server's environment
    assert PROVIDER_SECRET not in blob and MASTER_KEY not in blob
    assert not {"OPENAI_API_KEY", "SCILLM_MASTER_KEY", "OPENAI_API_BASE"} & set(child)
    assert child["HOME"].startswith("/tmp/") and not Path(child["HOME"]).exists()  # removed after the run
    # the per-run key was there (redacted in artifacts) and the endpoint is this scillm
    assert "[redacted]" in blob and "sk-scillm-run-" not in Path(result["artifacts"]["events_jsonl"]).read_text()
    if profile == "codex-exec":
        config = next(v for k, v in files.items() if k.endswith("config.toml"))
        assert f'base_url = "{env["url"]}/v1"' in config and 'env_key = "SCILLM_API_KEY"' in config
        assert 'wire_api = "responses"' in config and "[analytics]\nenabled = false" in config
        # the commands codex runs never see the run key, and it writes no snapshot of its environment
        assert '[shell_environment_policy]\nexclude = ["SCILLM_API_KEY"]' in config
        assert argv[argv.index("shell_snapshot") - 1] == "--disable"
        assert argv[argv.index("-s") + 1] == sandbox and argv[-1] == "-" and "plugins" in argv
        assert child["SCILLM_API_KEY"] == "[redacted]" and child["CODEX_HOME"].startswith(child["HOME"])
        assert dump["stdin"] == '{"mode": "env"}'  # the prompt came on stdin
    elif profile == "claude-print":
        assert child["ANTHROPIC_BASE_URL"] == env["url"] and child["ANTHROPIC_API_KEY"] == "[redacted]"
        assert child["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1" and child["DISABLE_AUTOUPDATER"] == "1"
        tools = argv[argv.index("--tools") + 1]
        mode = argv[argv.index("--permission-mode") + 1]
        expected = (True, "acceptEdits") if sandbox == "workspace-write" else (False, "default")
        assert ("Edit" in tools, mode) == expected
        assert "Bash" not in tools and "--bare" in argv and dump["stdin"].startswith('{"mode": "env"}')
    elif profile == "opencode-run":
        config = json.loads(child["OPENCODE_CONFIG_CONTENT"])
        assert config["provider"]["scillm"]["options"] == {"baseURL": env["url"] + "/v1",
                                                           "apiKey": "{env:SCILLM_API_KEY}"}
        assert config["permission"]["edit"] == ("allow" if sandbox == "workspace-write" else "deny")
        assert config["permission"]["bash"] == "deny" and "ask" not in config["permission"].values()
        for flag in ("OPENCODE_DISABLE_MODELS_FETCH", "OPENCODE_DISABLE_AUTOUPDATE", "OPENCODE_DISABLE_LSP_DOWNLOAD"):
            assert child[flag] == "1"
        assert config["autoupdate"] is False and config["share"] == "disabled"
    else:
        models = json.loads(next(v for k, v in files.items() if k.endswith("models.json")))
        assert models["providers"]["scillm"]["baseUrl"] == env["url"] + "/v1"
        assert models["providers"]["scillm"]["apiKey"] == "SCILLM_API_KEY"
        assert child["PI_OFFLINE"] == "1" and child["PI_TELEMETRY"] == "0"
        tools = argv[argv.index("--tools") + 1].split(",")
        assert ("edit" in tools) == (sandbox == "workspace-write") and "bash" not in tools
    for path in Path(result["artifacts"]["run_dir"]).iterdir():
        assert PROVIDER_SECRET not in path.read_text() and MASTER_KEY not in path.read_text()


def test_missing_cli_is_a_failed_run_naming_the_fix(env: dict[str, Any], tmp_path: Path) -> None:
    (env["bin"] / "pi").rename(env["bin"] / "pi.off")
    try:
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = "/nonexistent"
        result = run(env, "pi", '{"mode": "ok"}')
    finally:
        os.environ["PATH"] = path
        (env["bin"] / "pi.off").rename(env["bin"] / "pi")
    assert result["status"] == "failed" and "install-agent-clis" in result["error"]


def test_llm_call_node_through_scillm(env: dict[str, Any]) -> None:
    env["fake"].script(Reply.say('{"ok": true}'))
    result = run(env, "llm-call", "say ok", output_schema={"type": "object", "required": ["ok"]})
    assert result["status"] == "completed" and result["result"] == {"ok": True}
    assert env["fake"].last.headers["authorization"] == f"Bearer {PROVIDER_SECRET}"
    assert env["fake"].last.json["response_format"]["type"] == "json_schema"


def test_doctor_reports_clis(env: dict[str, Any]) -> None:
    runtime = env["app"].runtime
    checks = {c["check"]: c for c in runtime.hooks.doctor(runtime)}
    codex = checks["agent CLI codex (codex-exec)"]
    assert codex["ok"] is True and str(env["bin"] / "codex") in codex["detail"]
    assert {"agent CLI opencode (opencode-run)", "agent CLI pi (pi)", "agent CLI claude (claude-print)"} <= set(checks)
    assert PROVIDER_SECRET not in json.dumps(list(checks.values()))


def test_codex_config_is_valid_toml_for_any_model_name() -> None:
    """The model name went into config.toml as a JSON string: an emoji became a surrogate-pair escape TOML refuses,
    and DEL stayed bare (TOML forbids it), so codex could not read its config and the run failed."""
    import tomllib

    from scillm_agent_runners.clis import codex_config

    for model in ("gpt-5", "emoji-\U0001f600", "del\x7fname", 'quote"back\\slash', "tab\tnew\nline"):
        text = codex_config(model, "http://127.0.0.1:4001", "read-only")
        assert "\x7f" not in text
        assert tomllib.loads(text)["model"] == model
