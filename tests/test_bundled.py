"""Every bundled plugin distribution is installed by the README's command and loads (a missing install step
fails here), and the code base passes its lint and type checks."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from scillm_core.testing import make_app

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = sorted(ROOT.glob("plugins/*/*/pyproject.toml"))


def entry_point_names() -> dict[str, str]:
    names = {}
    for path in BUNDLED:
        project = tomllib.loads(path.read_text())["project"]
        for name in project["entry-points"]["scillm"]:
            names[name] = project["name"]
    return names


def test_every_bundled_plugin_is_installed_and_loaded():
    loaded = {info.name: info for info in make_app().runtime.plugins}
    for name, distribution in entry_point_names().items():
        assert name in loaded, f"{distribution} is not installed: run ./scripts/install"
        assert loaded[name].status == "loaded", (name, loaded[name].reason)
        assert loaded[name].distribution == distribution


@pytest.mark.parametrize("tool", ["ruff", "mypy"])
def test_lint_and_types(tool):
    command = {"ruff": [sys.executable, "-m", "ruff", "check", "scillm_core", "plugins", "contrib", "tests",
                     "bench"],
               "mypy": [sys.executable, "-m", "mypy"]}[tool]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
