"""The scillm command: serve (loopback rule, readiness), plugins, models, doctor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from scillm_core.testing import DEV_KEY, free_port

SCILLM = str(Path(sys.executable).with_name("scillm"))


def clean_env(tmp_path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith(("_API_KEY", "_API_BASE")) and k != "SCILLM_MASTER_KEY"}
    return {**env, "SCILLM_DATA_DIR": str(tmp_path / "data"), **extra}


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_starts_with_zero_configuration(tmp_path, workers):
    port = free_port()
    process = subprocess.Popen([SCILLM, "serve", "--port", str(port), "--workers", str(workers)], cwd=tmp_path,
                               env=clean_env(tmp_path),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/readiness").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, process.stdout.read().decode()
            time.sleep(0.05)
        headers = {"authorization": f"Bearer {DEV_KEY}"}
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers).json()["data"] == []
        response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", headers=headers,
                              json={"model": "deepseek/deepseek-chat", "messages": [{"role": "user", "content": "x"}]})
        assert response.status_code == 400 and "DEEPSEEK_API_KEY" in response.json()["error"]["message"]
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_serve_refuses_a_public_bind_without_a_master_key(tmp_path):
    result = subprocess.run([SCILLM, "serve", "--host", "0.0.0.0", "--port", str(free_port())], cwd=tmp_path,
                            env=clean_env(tmp_path), capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "SCILLM_MASTER_KEY" in result.stderr


def test_a_bad_config_stops_startup_naming_the_key(tmp_path):
    (tmp_path / "scillm.toml").write_text("[server]\nprot = 4001\n")
    result = subprocess.run([SCILLM, "serve", "--port", str(free_port())], cwd=tmp_path, env=clean_env(tmp_path),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unknown key 'prot'" in result.stderr


def test_a_misspelled_provider_table_stops_startup_naming_it(tmp_path):
    (tmp_path / "scillm.toml").write_text('[providers.moonshott]\nbase_url = "https://api.moonshot.ai/v1"\n')
    result = subprocess.run([SCILLM, "serve", "--port", str(free_port())], cwd=tmp_path, env=clean_env(tmp_path),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "unknown provider table [providers.moonshott]" in result.stderr and "moonshot?" in result.stderr
    assert "Traceback" not in result.stderr


def scillm(tmp_path, env, *args, **kw):
    return subprocess.run([SCILLM, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, **kw)


def hermetic(tmp_path, **extra):
    """No keys and no logins from this machine (HOME, Claude and Codex credentials point into tmp_path); the agent
    CLI checks (seconds each) are tested with the runners."""
    return clean_env(tmp_path, HOME=str(tmp_path), SCILLM_CLAUDE_CREDENTIALS=str(tmp_path / "none.json"),
                     SCILLM_CODEX_AUTH=str(tmp_path / "none-auth.json"), OLLAMA_API_BASE="http://127.0.0.1:9",
                     SCILLM_DISABLE_PLUGINS="agent-runners", **extra)


def test_plugins_and_models(tmp_path):
    env = hermetic(tmp_path, DEEPSEEK_API_KEY="sk-doctor-secret-1234")
    plugins = json.loads(scillm(tmp_path, env, "plugins", "--json", check=True).stdout)
    assert {"chat", "ops", "auth", "openai-compat"} <= {p["name"] for p in plugins}
    models = scillm(tmp_path, env, "models", check=True).stdout
    usable, _, waiting = models.partition("Not usable until configured")
    assert "text-deepseek" in usable and "gpt-4o" not in usable
    assert "set OPENAI_API_KEY" in waiting and "gpt-4o" in waiting and "opencode-go/<model>" in models


def test_models_command_and_the_models_endpoint_agree(tmp_path):
    from scillm_core.testing import ServerThread, make_app

    keys = {"DEEPSEEK_API_KEY": "sk-agree-1234567890"}
    listed = json.loads(scillm(tmp_path, hermetic(tmp_path, **keys), "models", "--json", check=True).stdout)
    config_env = {k: v for k, v in hermetic(tmp_path, **keys).items() if k.startswith(("SCILLM_", "OLLAMA_"))}
    with ServerThread(make_app(env={**keys, **config_env}, data_dir=tmp_path / "d")) as server:
        served = httpx.get(server.url + "/v1/models", headers={"authorization": f"Bearer {DEV_KEY}"}).json()
        missing = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {DEV_KEY}"},
                             json={"model": "text-deepsek", "messages": [{"role": "user", "content": "x"}]}).json()
    assert {m["id"] for m in served["data"]} == {m["id"] for m in listed if m["usable"]}
    assert {m["id"]: m["missing"] for m in served["unavailable"]} == \
        {m["id"]: m["missing"] for m in listed if not m["usable"]}
    assert "text-deepseek" in {m["id"] for m in served["data"]}
    assert "`scillm models`" in missing["error"]["message"]  # the 404 points at both


def test_doctor_fails_when_no_provider_is_usable_and_marks_nothing_unconfigured_ok(tmp_path):
    result = scillm(tmp_path, hermetic(tmp_path), "doctor")
    assert result.returncode == 1, result.stdout
    assert "no provider is usable" in result.stdout
    for line in result.stdout.splitlines():
        if line.startswith("[ok"):
            assert "not configured" not in line and "not_configured" not in line and "HTTP 404" not in line, line
    assert "[--  ] claude login: not_configured" in result.stdout


def test_doctor_probes_credentials_and_says_what_answered(tmp_path):
    from scillm_core.testing import FakeOpenAI

    with FakeOpenAI() as fake:
        ok = scillm(tmp_path, hermetic(tmp_path, DEEPSEEK_API_KEY="sk-doctor-secret-1234",
                                       DEEPSEEK_API_BASE=fake.base_url), "doctor")
        assert ok.returncode == 0, ok.stdout
        assert "[ok  ] reach deepseek:" in ok.stdout and "credentials accepted" in ok.stdout
        wrong_path = scillm(tmp_path, hermetic(tmp_path, DEEPSEEK_API_KEY="sk-doctor-secret-1234",
                                               DEEPSEEK_API_BASE=fake.url + "/nothing-here"), "doctor", "--json")
    checks = {c["check"]: c for c in json.loads(wrong_path.stdout)}
    assert checks["reach deepseek"]["ok"] is False and "HTTP 404" in checks["reach deepseek"]["detail"]
    assert wrong_path.returncode == 1  # reachable, but nothing shows the key works: not usable
    refused = scillm(tmp_path, hermetic(tmp_path, DEEPSEEK_API_KEY="sk-doctor-secret-1234",
                                        DEEPSEEK_API_BASE="http://127.0.0.1:9/v1"), "doctor")
    assert refused.returncode == 1 and "[FAIL] reach deepseek" in refused.stdout
    assert "sk-doctor-secret" not in ok.stdout + wrong_path.stdout + refused.stdout


def test_serve_tunes_the_garbage_collector_for_a_long_running_process():
    import gc

    from scillm_core.cli import tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] >= 50_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
