"""The scillm command: serve (loopback rule, readiness), plugins, models, doctor."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from scillm_core.testing import DEV_KEY

SCILLM = str(Path(sys.executable).with_name("scillm"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_plugins_models_and_doctor(tmp_path):
    env = clean_env(tmp_path, DEEPSEEK_API_KEY="sk-doctor-secret-1234", DEEPSEEK_API_BASE="http://127.0.0.1:9/v1")
    plugins = json.loads(subprocess.run([SCILLM, "plugins", "--json"], cwd=tmp_path, env=env, capture_output=True,
                                        text=True, timeout=30, check=True).stdout)
    assert {"chat", "ops", "auth", "openai-compat"} <= {p["name"] for p in plugins}
    models = subprocess.run([SCILLM, "models"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30,
                            check=True).stdout
    assert "text-deepseek" in models and "opencode-go/<model>" in models
    doctor = subprocess.run([SCILLM, "doctor", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60, check=True).stdout
    checks = {c["check"]: c for c in json.loads(doctor)}
    assert checks["provider deepseek"]["ok"] is True
    assert checks["reach deepseek"]["ok"] is False
    assert checks["provider glm"]["ok"] is False and "GLM_API_KEY" in checks["provider glm"]["detail"]
    assert "sk-doctor-secret" not in doctor


def test_serve_tunes_the_garbage_collector_for_a_long_running_process():
    import gc

    from scillm_core.cli import tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] >= 10_000
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
