"""Third-party clients people point at scillm, doing what their users do: openai-agents (Responses API and chat
completions), pydantic-ai (OpenAI and Anthropic providers), langchain-openai and langchain-anthropic. Each runs
against one scillm server on loopback with two fake upstreams speaking the real wire formats, an
OpenAI-compatible one (DeepSeek) and Anthropic, so every client is tried on its own dialect's upstream and
across a translation. The module runs in a loopback-only network namespace: no client reaches the internet
(tracing and telemetry are off as well). instructor is not here: its pins conflict with the openai SDK's
(``requirements-test.txt``)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from clients_world import CLAUDE, DEEPSEEK, OPT_OUT, REPORT, fake_for, open_world, reset, schema_sent, tool_result_sent
from pydantic import BaseModel

from scillm_core.testing import DEV_KEY, Reply, ServerThread, ToolCallSpec
from scillm_core.testing.fake_anthropic import FakeAnthropic


class Weather(BaseModel):
    """A weather report."""

    city: str
    sunny: bool


CALLED: list[str] = []  # the cities the tools below were called with


def get_weather(city: str) -> str:
    """The weather in a city."""
    CALLED.append(city)
    return f"sunny in {city}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with open_world(tmp_path_factory.mktemp("clients")) as opened:
        yield opened


@pytest.fixture
def scillm(world: dict[str, Any]) -> ServerThread:
    CALLED.clear()
    return reset(world)


# -- openai-agents --------------------------------------------------------------------------------------------------

def _agent(scillm: ServerThread, api: str, model: str, **kwargs: Any) -> Any:
    from agents import Agent, OpenAIChatCompletionsModel, OpenAIResponsesModel, function_tool, set_tracing_disabled
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    client = AsyncOpenAI(base_url=scillm.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)
    kind = OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel
    return Agent(name="weather", instructions="Be brief.", model=kind(model=model, openai_client=client),
                 tools=[function_tool(get_weather)], **kwargs)


async def _run(agent: Any, prompt: str, stream: bool) -> tuple[Any, list[str]]:
    """The run result and, streamed, the text deltas the run handed out as they came."""
    from agents import Runner

    if not stream:
        return await Runner.run(agent, prompt), []
    result = Runner.run_streamed(agent, prompt)
    deltas = [event.data.delta async for event in result.stream_events()
              if event.type == "raw_response_event" and event.data.type == "response.output_text.delta"]
    return result, deltas


@pytest.mark.parametrize("stream", [False, True], ids=["run", "streamed"])
@pytest.mark.parametrize("model", [DEEPSEEK, CLAUDE], ids=["openai-compatible", "anthropic"])
@pytest.mark.parametrize("api", ["responses", "chat"])
def test_openai_agents_runs_a_function_tool(world, scillm, api, model, stream):
    from agents import ModelSettings

    fake = world[model]
    fake.script(Reply.call("get_weather", {"city": "Paris"}), Reply.say("It is sunny in Paris."))
    agent = _agent(scillm, api, model, model_settings=ModelSettings(include_usage=True))  # chat streams: usage asked
    result, deltas = asyncio.run(_run(agent, "Weather in Paris?", stream))
    assert result.final_output == "It is sunny in Paris."
    assert CALLED == ["Paris"] and tool_result_sent(fake) == "sunny in Paris"
    assert [item.type for item in result.new_items] == ["tool_call_item", "tool_call_output_item",
                                                        "message_output_item"]
    assert result.context_wrapper.usage.requests == 2 and result.context_wrapper.usage.total_tokens == 36
    if stream:
        assert "".join(deltas) == "It is sunny in Paris." and len(deltas) > 1


@pytest.mark.parametrize("model", [DEEPSEEK, CLAUDE], ids=["openai-compatible", "anthropic"])
@pytest.mark.parametrize("api", ["responses", "chat"])
def test_openai_agents_structured_output(world, scillm, api, model):
    fake = world[model]
    fake.script(Reply.call("get_weather", {"city": "Paris"}), Reply.say(json.dumps(REPORT)))
    result, _ = asyncio.run(_run(_agent(scillm, api, model, output_type=Weather), "Weather in Paris?", False))
    assert result.final_output == Weather(**REPORT)
    assert schema_sent(fake)["required"] == ["city", "sunny"] and CALLED == ["Paris"]


@pytest.mark.parametrize("api", ["responses", "chat"])
def test_openai_agents_with_claude_thinking_through_a_tool_loop(world, scillm, api):
    """Reasoning on, Claude calls two tools at once: over the Responses API its signed thinking goes back with the
    tool calls (Anthropic insists); the chat completions model does not send thinking back, so the tool loop's
    second call goes without thinking instead of failing."""
    from agents import ModelSettings
    from openai.types.shared import Reasoning

    claude = world[CLAUDE]
    thought = Reply(reasoning="Two cities: two calls.", tool_calls=(ToolCallSpec("get_weather", {"city": "Paris"}),
                                                                    ToolCallSpec("get_weather", {"city": "Rome"})))
    claude.script(thought, Reply.say("Sunny in both."))
    agent = _agent(scillm, api, CLAUDE, model_settings=ModelSettings(reasoning=Reasoning(effort="low")))
    result, deltas = asyncio.run(_run(agent, "Weather in Paris and Rome?", True))
    assert result.final_output == "".join(deltas) == "Sunny in both." and CALLED == ["Paris", "Rome"]
    assert result.new_items[0].type == "reasoning_item"
    first, second = (request.body for request in claude.requests)
    assert first["thinking"] == {"type": "adaptive"} and first["output_config"] == {"effort": "low"}  # a 4.6 Claude
    turn = second["messages"][1]["content"]
    assert [block["type"] for block in turn[-2:]] == ["tool_use", "tool_use"]
    if api == "responses":
        assert second["thinking"] == first["thinking"]
        assert turn[0] == {"type": "thinking", "thinking": "Two cities: two calls.",
                           "signature": FakeAnthropic.signature(thought)}
    else:
        assert "thinking" not in second and len(turn) == 2


# -- pydantic-ai ----------------------------------------------------------------------------------------------------

def _pydantic_agent(scillm: ServerThread, provider: str, model: str, output_type: Any) -> Any:
    from pydantic_ai import Agent

    if provider == "anthropic":
        from pydantic_ai.models.anthropic import AnthropicModel
        from pydantic_ai.providers.anthropic import AnthropicProvider

        llm: Any = AnthropicModel(model, provider=AnthropicProvider(base_url=scillm.url, api_key=DEV_KEY))
    else:
        from pydantic_ai.models.openai import OpenAIChatModel
        from pydantic_ai.providers.openai import OpenAIProvider

        llm = OpenAIChatModel(model, provider=OpenAIProvider(base_url=scillm.url + "/v1", api_key=DEV_KEY))
    agent = Agent(llm, output_type=output_type, instructions="Be brief.", retries=0)
    agent.tool_plain(get_weather)
    return agent


PYDANTIC_ROUTES = [("openai", DEEPSEEK), ("openai", CLAUDE), ("anthropic", "claude-sonnet-4-6"),
                   ("anthropic", DEEPSEEK)]
PYDANTIC_IDS = ["openai-to-deepseek", "openai-to-claude", "anthropic-to-claude", "anthropic-to-deepseek"]


@pytest.mark.parametrize("stream", [False, True], ids=["run", "run_stream"])
@pytest.mark.parametrize(("provider", "model"), PYDANTIC_ROUTES, ids=PYDANTIC_IDS)
def test_pydantic_ai_tool_then_structured_output(world, scillm, provider, model, stream):
    """pydantic-ai's default structured output is a ``final_result`` tool the model calls."""
    fake = fake_for(world, model)
    fake.script(Reply.call("get_weather", {"city": "Paris"}), Reply.call("final_result", REPORT))
    agent = _pydantic_agent(scillm, provider, model, Weather)

    async def go() -> tuple[Any, list[Any]]:
        if not stream:
            return (await agent.run("Weather in Paris?")).output, []
        async with agent.run_stream("Weather in Paris?") as result:
            partial = [output async for output in result.stream_output()]
            return await result.get_output(), partial

    output, partial = asyncio.run(go())
    assert output == Weather(**REPORT) and CALLED == ["Paris"] and tool_result_sent(fake) == "sunny in Paris"
    assert {tool.get("name") or tool["function"]["name"] for tool in fake.last.body["tools"]} == \
        {"get_weather", "final_result"}
    if stream:
        assert partial[-1] == Weather(**REPORT)


@pytest.mark.parametrize(("provider", "model"), PYDANTIC_ROUTES, ids=PYDANTIC_IDS)
def test_pydantic_ai_streams_text(world, scillm, provider, model):
    fake = fake_for(world, model)
    fake.script(Reply.say("It is sunny in Paris."))
    agent = _pydantic_agent(scillm, provider, model, str)

    async def go() -> tuple[list[str], Any]:
        async with agent.run_stream("Weather in Paris?") as result:
            return [delta async for delta in result.stream_text(delta=True, debounce_by=None)], result.usage

    deltas, usage = asyncio.run(go())
    assert "".join(deltas) == "It is sunny in Paris." and len(deltas) > 1
    assert usage.input_tokens == 11 and usage.output_tokens == 7


@pytest.mark.parametrize(("provider", "model"), [("openai", DEEPSEEK), ("anthropic", "claude-sonnet-4-6")],
                         ids=["openai-to-deepseek", "anthropic-to-claude"])
def test_pydantic_ai_native_structured_output(world, scillm, provider, model):
    from pydantic_ai import NativeOutput

    fake = fake_for(world, model)
    fake.script(Reply.say(json.dumps(REPORT)))
    output = _pydantic_agent(scillm, provider, model, NativeOutput(Weather)).run_sync("Weather in Paris?").output
    assert output == Weather(**REPORT) and schema_sent(fake)["required"] == ["city", "sunny"]


# -- LangChain ------------------------------------------------------------------------------------------------------

def _chat_model(scillm: ServerThread, kind: str, model: str, **kwargs: Any) -> Any:
    if kind == "anthropic":
        from langchain_anthropic import ChatAnthropic

        return ChatAnthropic(model=model, base_url=scillm.url, api_key=DEV_KEY, max_retries=0, **kwargs)
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model=model, base_url=scillm.url + "/v1", api_key=DEV_KEY, max_retries=0,
                      use_responses_api=kind == "openai-responses", **kwargs)


LANGCHAIN_ROUTES = [("openai", DEEPSEEK), ("openai", CLAUDE), ("openai-responses", CLAUDE),
                    ("anthropic", "claude-sonnet-4-6"), ("anthropic", DEEPSEEK)]
LANGCHAIN_IDS = ["openai-to-deepseek", "openai-to-claude", "openai-responses-to-claude", "anthropic-to-claude",
                 "anthropic-to-deepseek"]


@pytest.mark.parametrize(("kind", "model"), LANGCHAIN_ROUTES, ids=LANGCHAIN_IDS)
def test_langchain_invoke_and_stream(world, scillm, kind, model):
    fake = fake_for(world, model)
    fake.script(Reply.say("Hello there, from scillm.", prompt_tokens=20, completion_tokens=5),
                Reply.say("Hello there, from scillm.", prompt_tokens=20, completion_tokens=5))
    llm = _chat_model(scillm, kind, model, stream_usage=True)
    message = llm.invoke("hi")
    assert message.text == "Hello there, from scillm."
    assert message.usage_metadata["input_tokens"] == 20 and message.usage_metadata["output_tokens"] == 5
    chunks = list(llm.stream("hi"))
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert whole.text == "Hello there, from scillm." and len([c for c in chunks if c.text]) > 1
    assert whole.usage_metadata["total_tokens"] == 25
    assert fake.last.body["stream"] is True


@pytest.mark.parametrize("stream", [False, True], ids=["invoke", "stream"])
@pytest.mark.parametrize(("kind", "model"), LANGCHAIN_ROUTES, ids=LANGCHAIN_IDS)
def test_langchain_bind_tools_and_the_tool_loop(world, scillm, kind, model, stream):
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool

    fake = fake_for(world, model)
    fake.script(Reply.call("get_weather", {"city": "Paris"}), Reply.say("Sunny in Paris."))
    weather = tool(get_weather)
    llm = _chat_model(scillm, kind, model).bind_tools([weather])
    history: list[Any] = [HumanMessage("Weather in Paris?")]
    if stream:
        chunks = list(llm.stream(history))
        ai = chunks[0]
        for chunk in chunks[1:]:
            ai += chunk
    else:
        ai = llm.invoke(history)
    assert [(call["name"], call["args"]) for call in ai.tool_calls] == [("get_weather", {"city": "Paris"})]
    history += [ai, weather.invoke(ai.tool_calls[0])]
    assert llm.invoke(history).text == "Sunny in Paris."
    assert CALLED == ["Paris"] and tool_result_sent(fake) == "sunny in Paris"


# the openai SDK's own parse of a json_schema answer warns as it stores the parsed object on its message model
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
@pytest.mark.parametrize(("kind", "model"), LANGCHAIN_ROUTES, ids=LANGCHAIN_IDS)
def test_langchain_with_structured_output(world, scillm, kind, model, method):
    fake = fake_for(world, model)
    reply = Reply.call("Weather", REPORT) if method == "function_calling" else Reply.say(json.dumps(REPORT))
    fake.script(reply, reply)
    structured = _chat_model(scillm, kind, model).with_structured_output(Weather, method=method)
    assert structured.invoke("Weather in Paris?") == Weather(**REPORT)
    assert list(structured.stream("Weather in Paris?"))[-1] == Weather(**REPORT)
    if method == "json_schema":
        assert schema_sent(fake)["required"] == ["city", "sunny"]
    else:
        tools = fake.last.body["tools"]
        assert [t.get("name") or t["function"]["name"] for t in tools] == ["Weather"]


def test_the_module_set_every_telemetry_opt_out(world):
    assert all(os.environ.get(key) == value for key, value in OPT_OUT.items())
