"""The stack the third-party client tests share (tests/test_clients.py, tests/test_clients_spawned.py): one scillm
server on loopback with two fake upstreams speaking the real wire formats, an OpenAI-compatible one (DeepSeek) and
Anthropic, inside a loopback-only network namespace with every client's tracing and telemetry off, and the helpers
that read what an upstream was sent."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scillm_core.testing import FakeOpenAI, ServerThread, make_app
from scillm_core.testing.fake_anthropic import FakeAnthropic
from scillm_core.testing.netns import loopback_only

DEEPSEEK = "deepseek/deepseek-chat"
CLAUDE = "anthropic/claude-sonnet-4-6"
OPT_OUT = {"OPENAI_AGENTS_DISABLE_TRACING": "1", "LANGCHAIN_TRACING_V2": "false", "LANGSMITH_TRACING": "false",
           "LANGCHAIN_CALLBACKS_BACKGROUND": "false", "OTEL_SDK_DISABLED": "true", "LOGFIRE_SEND_TO_LOGFIRE": "false",
           "DO_NOT_TRACK": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False"}
REPORT = {"city": "Paris", "sunny": True}


@contextlib.contextmanager
def open_world(data_dir: Path) -> Iterator[dict[str, Any]]:
    """``{"server": scillm, DEEPSEEK: its fake, CLAUDE: its fake}``, for a module-scoped fixture."""
    with pytest.MonkeyPatch.context() as env_patch, loopback_only(), FakeOpenAI() as deepseek, \
            FakeAnthropic() as claude:
        for key, value in OPT_OUT.items():
            env_patch.setenv(key, value)
        env = {"DEEPSEEK_API_KEY": "sk-clients-deepseek-0123456789", "DEEPSEEK_API_BASE": deepseek.base_url,
               "ANTHROPIC_API_KEY": "sk-ant-clients-0123456789abcdef", "ANTHROPIC_API_BASE": claude.base_url}
        config = {"plugins": {"disable": ["cache"]}, "resilience": {"max_retries": 0}}
        with ServerThread(make_app(env=env, config=config, data_dir=data_dir)) as server:
            yield {"server": server, DEEPSEEK: deepseek, CLAUDE: claude}


def reset(world: dict[str, Any]) -> ServerThread:
    """Forget what the fakes were sent and still had scripted; the server."""
    for fake in (world[DEEPSEEK], world[CLAUDE]):
        fake.requests.clear()
        fake._script.clear()
    return world["server"]  # type: ignore[no-any-return]


def fake_for(world: dict[str, Any], model: str) -> Any:
    return world[CLAUDE if "claude" in model else DEEPSEEK]


def tool_result_in(body: dict[str, Any]) -> Any:
    """What an upstream request carried back as the tool's result, in its own format."""
    for message in reversed(body["messages"]):
        if message["role"] == "tool":
            return message["content"]
        if message["role"] == "user" and isinstance(message["content"], list):
            content = next(b["content"] for b in message["content"] if b["type"] == "tool_result")
            return content if isinstance(content, str) else "".join(b["text"] for b in content)
    raise AssertionError("no tool result went upstream")


def tool_result_sent(fake: Any) -> Any:
    return tool_result_in(fake.last.body)


def schema_in(body: dict[str, Any]) -> Any:
    """The JSON schema of the structured output an upstream request asked for."""
    if "output_config" in body:
        return body["output_config"]["format"]["schema"]
    return body["response_format"]["json_schema"]["schema"]


def schema_sent(fake: Any) -> Any:
    return schema_in(fake.last.body)
