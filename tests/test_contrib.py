"""A third-party provider built into a fresh virtual environment beside scillm is discovered and serves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import venv
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)  # a pip install into a new venv; slow on a busy 2-core machine
def test_example_provider_in_a_fresh_venv(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", str(ROOT), str(ROOT / "plugins/surfaces/scillm-chat"),
                    str(ROOT / "plugins/middleware/scillm-auth"), str(ROOT / "contrib/scillm-echo-provider")],
                   check=True, timeout=600, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    scillm = env_dir / "bin" / "scillm"
    listing = subprocess.run([scillm, "plugins"], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "echo" in listing and "scillm-echo-provider" in listing

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([scillm, "serve", "--port", str(port)], cwd=tmp_path,
                              env={**os.environ, "SCILLM_DATA_DIR": str(tmp_path / "data")},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                      headers={"authorization": "Bearer sk-dev-proxy-123"},
                                      json={"model": "echo/demo", "messages": [{"role": "user", "content": "ping"}]})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, server.stdout.read().decode()
                time.sleep(0.1)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "ping"
        assert response.headers["x-scillm-provider"] == "echo"
    finally:
        server.terminate()
        server.wait(timeout=15)
    assert sys.prefix != str(env_dir)
