"""Docs examples are tested: included code matches its file, and the config example is valid."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from scillm_core.testing import make_app

ROOT = Path(__file__).resolve().parents[1]
INCLUDE = re.compile(r"<!-- include: (?P<path>\S+) -->\n```\w*\n(?P<body>.*?)```", re.S)


@pytest.mark.parametrize("doc", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_included_code_matches_its_file(doc):
    for match in INCLUDE.finditer(doc.read_text()):
        assert (ROOT / match["path"]).read_text() == match["body"], f"{doc.name}: {match['path']} is out of date"


def test_config_example_is_valid():
    text = (ROOT / "docs" / "config.md").read_text()
    example = re.search(r"```toml\n(.*?)```", text, re.S)[1]
    app = make_app(config=tomllib.loads(example))
    config = app.runtime.config
    assert config.groups["reviewers"].models[0] == "glm/glm-5.1"
    assert config.provider_settings("deepseek").timeout_s == 300
    declared = app.runtime.providers["local-vllm"].describe()
    assert declared["declared"] is True and declared["prefixes"] == ["vllm/"]
    assert declared["key_env"] == ["LOCAL_VLLM_KEY"]
