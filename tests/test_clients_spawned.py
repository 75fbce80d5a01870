"""Clients that run as processes of their own, doing what their users do: the Vercel AI SDK (``ai`` with its OpenAI
provider over the Responses API and over chat completions, its OpenAI-compatible provider, and its Anthropic
provider on ``/v1/messages``) and the official ``openai`` and ``@anthropic-ai/sdk`` packages for node, as scripts in
``tests/clients`` run from the versions pinned in ``tools/js-clients`` (``scripts/install-js-clients``), and
LiteLLM's Python SDK, run from ``bench/.venv-litellm`` (its pins conflict with the test venv's ``openai``;
``bench/run --setup-only --proxies litellm``). ``scripts/install --test`` installs both; a missing install fails
these tests. One process per client and route runs that route's scenarios in turn against the stack of
``clients_world``: one scillm server, an OpenAI-compatible fake (DeepSeek) and an Anthropic fake, in a
loopback-only network namespace."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clients_world import CLAUDE, DEEPSEEK, REPORT, fake_for, open_world, reset, schema_in, tool_result_in

from scillm_core.testing import DEV_KEY, Reply, ServerThread, ToolCallSpec
from scillm_core.testing.fake_anthropic import FakeAnthropic

SCRIPTS = Path(__file__).parent / "clients"
JS_CLIENTS = Path(__file__).resolve().parents[1] / "tools" / "js-clients"
HELLO = "Hello there, from scillm."
CALL = (Reply.call("get_weather", {"city": "Paris"}), Reply.say("Sunny in Paris."))
TOO_LONG = (Reply.fail(400, "prompt is too long", type="invalid_request_error"),)


def too_long(model: str) -> str:
    """The message a client shows for the upstream's 400 (TOO_LONG): the upstream's own, naming where it came from."""
    return ("anthropic (claude-sonnet-4-6)" if "claude" in model else "deepseek (deepseek-chat)") + \
        ": prompt is too long"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with open_world(tmp_path_factory.mktemp("js-clients")) as opened:
        yield opened


@pytest.fixture
def scillm(world: dict[str, Any]) -> ServerThread:
    return reset(world)


def drive(world: dict[str, Any], command: list[str], plan: dict[str, tuple[Reply, ...]], model: str = "",
          **config: Any) -> dict[str, tuple[Any, list[Any]]]:
    """Run ``plan``'s scenarios (``name``, or ``name@model`` for another model than ``model``) in one process of
    ``command``, each answered by its replies in turn: for each, what the client handed back and the bodies its
    upstream received."""
    jobs = [(key, *key.split("@", 1)) if "@" in key else (key, key, model) for key in plan]
    for key, _, job_model in jobs:
        fake_for(world, job_model).script(*plan[key])
    args = {"base_url": world["server"].url, "api_key": DEV_KEY, "scenarios": jobs, **config}
    proc = subprocess.run([*command, json.dumps(args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "SCILLM_JS_CLIENTS": str(JS_CLIENTS)}, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    failed = {key: result for key, result in out.items() if "error" in result}
    assert not failed, json.dumps(failed, indent=1)
    results: dict[str, tuple[Any, list[Any]]] = {}
    seen = {DEEPSEEK: 0, CLAUDE: 0}
    for key, _, job_model in jobs:
        upstream, n = CLAUDE if "claude" in job_model else DEEPSEEK, len(plan[key])
        start = seen[upstream]
        results[key] = (out[key]["value"], [request.body for request in world[upstream].requests[start:start + n]])
        seen[upstream] += n
    assert {upstream: len(world[upstream].requests) for upstream in seen} == seen  # no retries, no extra calls
    return results


def node(script: str) -> list[str]:
    return ["node", str(SCRIPTS / script)]


# -- Vercel AI SDK --------------------------------------------------------------------------------------------------

AI_SDK_ROUTES = [("openai", DEEPSEEK), ("openai", CLAUDE), ("openai-chat", DEEPSEEK), ("openai-chat", CLAUDE),
                 ("openai-compatible", DEEPSEEK), ("openai-compatible", CLAUDE), ("anthropic", "claude-sonnet-4-6"),
                 ("anthropic", DEEPSEEK)]
AI_SDK_IDS = ["openai-responses-to-deepseek", "openai-responses-to-claude", "openai-chat-to-deepseek",
              "openai-chat-to-claude", "openai-compatible-to-deepseek", "openai-compatible-to-claude",
              "anthropic-to-claude", "anthropic-to-deepseek"]


@pytest.mark.parametrize(("provider", "model"), AI_SDK_ROUTES, ids=AI_SDK_IDS)
def test_vercel_ai_sdk(world, scillm, provider, model):
    hello = Reply.say(HELLO, prompt_tokens=20, completion_tokens=5)
    # the Anthropic provider asks models it does not know for structured output with a forced ``json`` tool
    json_tool = provider == "anthropic" and "claude" not in model
    report = Reply.call("json", REPORT) if json_tool else Reply.say(json.dumps(REPORT))
    thought = Reply(reasoning="Two cities.", tool_calls=(ToolCallSpec("get_weather", {"city": "Paris"}),
                                                        ToolCallSpec("get_weather", {"city": "Rome"})))
    plan = {"generate": (hello,), "stream": (hello,), "tools": CALL, "stream_tools": CALL, "object": (report,),
            "stream_output": (report,), "conversation": (Reply.say("One."), Reply.say("Two.")),
            "reasoning_tools": (thought, Reply.say("Sunny in both.")), "error": TOO_LONG}
    ran = drive(world, node("ai_sdk.mjs"), plan, model, provider=provider)

    generated, _ = ran["generate"]
    assert generated["text"] == HELLO and generated["finish"] == "stop"
    assert generated["usage"] == {"input": 20, "output": 5, "total": 25}

    streamed, (body,) = ran["stream"]
    assert "".join(streamed["deltas"]) == streamed["text"] == HELLO and len(streamed["deltas"]) > 1
    assert streamed["usage"] == {"input": 20, "output": 5, "total": 25} and streamed["finish"] == "stop"
    assert body["stream"] is True

    for name in ("tools", "stream_tools"):
        looped, (first, second) = ran[name]
        assert looped["text"] == "Sunny in Paris.", name
        assert [(step["calls"], step["results"]) for step in looped["steps"]] == \
            [([["get_weather", {"city": "Paris"}]], ["sunny in Paris"]), ([], [])], name
        assert looped["usage"] == {"input": 22, "output": 14, "total": 36}, name
        assert [tool.get("name") or tool["function"]["name"] for tool in first["tools"]] == ["get_weather"]
        assert tool_result_in(second) == "sunny in Paris", name
    parts = ran["stream_tools"][0]["parts"]
    assert parts[:2] == [["tool-call", "get_weather", {"city": "Paris"}], ["tool-result", "sunny in Paris"]]
    assert "".join(part[1] for part in parts[2:]) == "Sunny in Paris." and len(parts) > 3

    talk, (_, second) = ran["conversation"]
    assert talk["texts"] == ["One.", "Two."]
    history = [(m["role"], m["content"] if isinstance(m["content"], str) else m["content"][0]["text"])
               for m in second["messages"]]
    assert history == [("user", "hi"), ("assistant", "One."), ("user", "and again?")]

    # reasoning through a tool loop: the OpenAI provider's chat model reads no reasoning_content; Claude gets its
    # signed thinking back from the clients that send it (over the Responses API: the reasoning item, by reference)
    # and thinking goes off for the rest of the loop from the others
    reasoned, (first, second) = ran["reasoning_tools"]
    assert reasoned["text"] == "Sunny in both." and reasoned["calls"] == [["Paris", "Rome"], []]
    assert reasoned["reasoning"] == [None if provider == "openai-chat" else "Two cities.", None]
    turn = second["messages"][1]
    if "claude" in model:
        if provider == "anthropic":  # the budget as the client set it; reasoning_effort is a 4.6 Claude's effort
            assert first["thinking"] == {"type": "enabled", "budget_tokens": 1024}
        else:
            assert first["thinking"] == {"type": "adaptive"} and first["output_config"] == {"effort": "low"}
        if provider in ("openai", "anthropic"):
            assert second["thinking"] == first["thinking"]
            assert turn["content"][0] == {"type": "thinking", "thinking": "Two cities.",
                                          "signature": FakeAnthropic.signature(thought)}
        else:
            assert "thinking" not in second and [b["type"] for b in turn["content"]] == ["tool_use", "tool_use"]
    else:
        assert first["reasoning_effort"] == second["reasoning_effort"] == "low"
        # DeepSeek's thinking mode wants its reasoning back in a tool loop: it gets what the client carried back
        # (the AI SDK's Anthropic provider sends back no thinking without a signature, which DeepSeek's has not)
        assert turn.get("reasoning_content") == (None if provider in ("openai-chat", "anthropic") else "Two cities.")

    failed, _ = ran["error"]
    assert failed == {"name": "AI_APICallError", "status": 400, "retryable": False, "message": too_long(model)}

    obj, (object_body,) = ran["object"]
    output, (streamed_body,) = ran["stream_output"]
    assert obj["object"] == output["output"] == output["partial"][-1] == REPORT
    for body in (object_body, streamed_body):
        if json_tool:
            assert [tool["function"]["name"] for tool in body["tools"]] == ["json"]
            assert body["tools"][0]["function"]["parameters"]["required"] == ["city", "sunny"]
            assert body["tool_choice"] == "required" and body["parallel_tool_calls"] is False  # Anthropic's "any"
        else:
            assert schema_in(body)["required"] == ["city", "sunny"]


# -- the official openai and @anthropic-ai/sdk packages -------------------------------------------------------------

@pytest.mark.parametrize("model", [DEEPSEEK, CLAUDE], ids=["to-deepseek", "to-claude"])
def test_openai_node(world, scillm, model):
    hello = Reply.say(HELLO, prompt_tokens=20, completion_tokens=5)
    report = Reply.say(json.dumps(REPORT))
    plan = {"chat": (hello,), "chat_stream": (hello,), "chat_tools": CALL, "chat_parse": (report,),
            "error": TOO_LONG, "responses": (hello,), "responses_stream": (hello,), "responses_tools": CALL,
            "responses_parse": (report,)}
    ran = drive(world, node("openai_sdk.mjs"), plan, model)

    chat, _ = ran["chat"]
    assert chat["text"] == HELLO and chat["finish"] == "stop"
    assert chat["usage"]["prompt_tokens"] == 20 and chat["usage"]["completion_tokens"] == 5
    streamed, (body,) = ran["chat_stream"]
    assert "".join(streamed["deltas"]) == HELLO and len(streamed["deltas"]) > 1 and streamed["finish"] == "stop"
    assert streamed["usage"]["total_tokens"] == 25 and body["stream"] is True
    for name in ("chat_tools", "responses_tools"):
        looped, (_, second) = ran[name]
        assert looped["calls"] == [["get_weather", {"city": "Paris"}]] and looped["text"] == "Sunny in Paris.", name
        assert tool_result_in(second) == "sunny in Paris", name
    assert ran["chat_tools"][0]["finish"] == "tool_calls"
    for name in ("chat_parse", "responses_parse"):
        parsed, (body,) = ran[name]
        assert parsed["parsed"] == REPORT and schema_in(body)["required"] == ["city", "sunny"], name
    assert ran["error"][0] == {"name": "BadRequestError", "status": 400, "type": "invalid_request_error",
                               "message": "400 " + too_long(model)}

    response, _ = ran["responses"]
    assert response["text"] == HELLO and response["status"] == "completed"
    assert response["usage"]["input_tokens"] == 20 and response["usage"]["output_tokens"] == 5
    streamed, (body,) = ran["responses_stream"]
    assert "".join(streamed["deltas"]) == streamed["text"] == HELLO and len(streamed["deltas"]) > 1
    assert streamed["usage"]["total_tokens"] == 25 and body["stream"] is True


@pytest.mark.parametrize("model", ["claude-sonnet-4-6", DEEPSEEK], ids=["to-claude", "to-deepseek"])
def test_anthropic_node(world, scillm, model):
    hello = Reply.say(HELLO, prompt_tokens=20, completion_tokens=5)
    ran = drive(world, node("anthropic_sdk.mjs"), {"create": (hello,), "stream": (hello,), "tools": CALL,
                                                   "error": TOO_LONG}, model)

    created, _ = ran["create"]
    assert created["text"] == HELLO and created["stop"] == "end_turn"
    assert created["usage"]["input_tokens"] == 20 and created["usage"]["output_tokens"] == 5
    streamed, (body,) = ran["stream"]
    assert "".join(streamed["deltas"]) == streamed["text"] == HELLO and len(streamed["deltas"]) > 1
    assert streamed["usage"]["input_tokens"] == 20 and streamed["usage"]["output_tokens"] == 5
    assert streamed["stop"] == "end_turn" and body["stream"] is True
    looped, (_, second) = ran["tools"]
    assert looped["calls"] == [["get_weather", {"city": "Paris"}]] and looped["stop"] == "tool_use"
    assert looped["text"] == "Sunny in Paris." and looped["second_stop"] == "end_turn"
    assert tool_result_in(second) == "sunny in Paris"
    assert ran["error"][0] == {"name": "BadRequestError", "status": 400, "type": "invalid_request_error",
                               "message": too_long(model)}


# -- LiteLLM's Python SDK -------------------------------------------------------------------------------------------

LITELLM_PYTHON = Path(__file__).resolve().parents[1] / "bench" / ".venv-litellm" / "bin" / "python"
LITELLM_ROUTES = [f"openai/{DEEPSEEK}", f"openai/{CLAUDE}", "anthropic/claude-sonnet-4-6", f"anthropic/{DEEPSEEK}"]


def test_litellm_sdk(world, scillm):
    """One process for every route: importing litellm takes seconds."""
    hello = Reply.say(HELLO, prompt_tokens=20, completion_tokens=5)
    plan = {f"{name}@{model}": replies for model in LITELLM_ROUTES
            for name, replies in [("completion", (hello,)), ("stream", (hello,)), ("tools", CALL),
                                  ("astream_tools", CALL), ("error", TOO_LONG)]}
    ran = drive(world, [str(LITELLM_PYTHON), str(SCRIPTS / "litellm_client.py")], plan)
    for model in LITELLM_ROUTES:
        done, _ = ran[f"completion@{model}"]
        assert done == {"text": HELLO, "finish": "stop", "usage": {"prompt": 20, "completion": 5, "total": 25}}, model
        streamed, (body,) = ran[f"stream@{model}"]
        assert "".join(streamed.pop("deltas")) == HELLO and body["stream"] is True, model
        assert streamed == done, model
        for name in ("tools", "astream_tools"):
            looped, (_, second) = ran[f"{name}@{model}"]
            assert looped == {"calls": [["get_weather", {"city": "Paris"}]], "finish": "tool_calls",
                              "text": "Sunny in Paris."}, (name, model)
            assert tool_result_in(second) == "sunny in Paris", (name, model)
        # litellm tells a context overflow by the message's wording: Anthropic's on its anthropic/ route; on its
        # openai/ route only OpenAI's own ("This model's maximum context length is"), whatever the error's code
        failed, _ = ran[f"error@{model}"]
        kind = "ContextWindowExceededError" if model.startswith("anthropic/") else "BadRequestError"
        assert failed["name"] == kind and failed["status"] == 400 and too_long(model) in failed["message"], model
