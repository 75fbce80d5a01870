"""LiteLLM's Python SDK as a client of scillm (run by tests/test_clients_spawned.py with bench/.venv-litellm's
python, as its pins conflict with the test venv's openai SDK): litellm.completion and acompletion, plain, streamed
with a tool, and failing, on its ``openai/<model>`` route (api_base = scillm's /v1) and its ``anthropic/<model>`` route
(api_base = scillm's root, spoken to on /v1/messages). Reads [[key, scenario, model], ...] like harness.mjs and
prints {key: {value} | {error}} as JSON."""

import asyncio
import json
import sys

import litellm

litellm.suppress_debug_info = True  # else a failure prints a feedback banner on stdout, where the results go

TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


def where(config, model):
    base = config["base_url"] + ("/v1" if model.startswith("openai/") else "")
    return {"model": model, "api_base": base, "api_key": config["api_key"], "num_retries": 0, "timeout": 20}


def usage(u):
    return {"prompt": u.prompt_tokens, "completion": u.completion_tokens, "total": u.total_tokens}


def completion(config, model):
    r = litellm.completion(messages=[{"role": "user", "content": "hi"}], **where(config, model))
    return {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason, "usage": usage(r.usage)}


def stream(config, model):
    chunks = list(litellm.completion(messages=[{"role": "user", "content": "hi"}], stream=True,
                                     stream_options={"include_usage": True}, **where(config, model)))
    whole = litellm.stream_chunk_builder(chunks)
    return {"deltas": [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content],
            "text": whole.choices[0].message.content, "finish": whole.choices[0].finish_reason,
            "usage": usage(whole.usage)}


def error(config, model):
    try:
        litellm.completion(messages=[{"role": "user", "content": "hi"}], **where(config, model))
    except Exception as e:  # litellm's exception for the status (BadRequestError, ...), which is no APIError
        return {"name": type(e).__name__, "status": getattr(e, "status_code", None), "message": str(e)}
    return None


def _loop(first):
    """The tool calls of a first answer, its finish reason, and the history that carries their results back."""
    message = first.choices[0].message
    calls = [[call.function.name, json.loads(call.function.arguments)] for call in message.tool_calls or []]
    history = [*QUESTION, message.model_dump(exclude_none=True)]
    history += [{"role": "tool", "tool_call_id": call.id, "content": f"sunny in {args['city']}"}
                for call, (_, args) in zip(message.tool_calls or [], calls, strict=True)]
    return calls, first.choices[0].finish_reason, history


def tools(config, model):
    first = litellm.completion(messages=QUESTION, tools=[TOOL], **where(config, model))
    calls, finish, history = _loop(first)
    second = litellm.completion(messages=history, tools=[TOOL], **where(config, model))
    return {"calls": calls, "finish": finish, "text": second.choices[0].message.content}


async def astream_tools(config, model):
    chunks = [c async for c in await litellm.acompletion(messages=QUESTION, tools=[TOOL], stream=True,
                                                         **where(config, model))]
    calls, finish, history = _loop(litellm.stream_chunk_builder(chunks))
    second = await litellm.acompletion(messages=history, tools=[TOOL], **where(config, model))
    return {"calls": calls, "finish": finish, "text": second.choices[0].message.content}


async def run(name, config, model):
    result = globals()[name](config, model)
    return await result if asyncio.iscoroutine(result) else result


async def main():
    config = json.loads(sys.argv[1])
    out = {}
    for key, name, model in config["scenarios"]:
        try:
            out[key] = {"value": await run(name, config, model)}
        except Exception as e:  # reported to the test, which fails naming it
            out[key] = {"error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(out))


asyncio.run(main())
