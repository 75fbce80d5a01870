"""Request parameters that ask for something in the answer, and the provider capability that delivers each.

A request that goes upstream as sent needs none of this: the upstream judges its own dialect. A translated one is
checked against the deployment each attempt calls (core's dispatch, :func:`check_asks`): a parameter that asks for
something the route cannot deliver (``logprobs: true``, audio out, ``n: 3`` where only one choice comes back) is a
400 ``unsupported_parameter`` naming ``$.<param>``, the provider and the model, before anything is sent. A value
that asks for nothing (``logprobs: false``, ``n: 1``, ``modalities: ["text"]``) and a mere hint (``prediction``,
``seed``, ``user``) are accepted, and a translation without a counterpart drops them. The table in
``docs/providers.md`` lists every parameter and where it goes.

Chat parameters are read where the chat model keeps them (``n``, and ``extra`` for those it does not model), so a
request from any surface (chat, batch items, runners) is checked alike. A surface whose dialect has asks the chat
model cannot carry (Anthropic's ``mcp_servers``, server tools, document ``citations``; the Responses API's hosted
tools) lists them in ``request.scillm["asks"]``: a mapping of JSON path to capability.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from scillm_core import errors
from scillm_core.models.chat import ChatRequest

__all__ = ["AS_SENT", "CHAT_ASKS", "HOSTED", "check_asks"]


def _off(value: Any) -> bool:
    return value is None or value is False or value == 0


def _absent(value: Any) -> bool:
    return value is None


def _text_only(value: Any) -> bool:
    return value is None or (isinstance(value, list) and all(kind == "text" for kind in value))


#: OpenAI chat parameter -> (capability that delivers it, whether a value asks for nothing)
CHAT_ASKS: Mapping[str, tuple[str, Callable[[Any], bool]]] = {
    "logprobs": ("logprobs", _off),
    "top_logprobs": ("logprobs", _off),
    "modalities": ("audio_output", _text_only),
    "audio": ("audio_output", _absent),
    "web_search_options": ("web_search", _absent),
    "functions": ("functions", lambda value: not value),  # the legacy form of tools: asks for function_call
}
#: ``n`` (modelled, not in ``extra``): more than one choice
CHOICES = "choices"
#: What an OpenAI-compatible upstream gets as sent (the upstream judges): every capability above.
AS_SENT = frozenset({*(capability for capability, _ in CHAT_ASKS.values()), CHOICES})


#: A capability no translated route has, named by this prefix and the tool's type: a tool OpenAI's Responses API
#: runs itself (``file_search``, ``code_interpreter``, ``mcp``, ...), which only a Responses upstream taking the
#: body as sent delivers.
HOSTED = "hosted:"

#: what each capability delivers, for the error message (surfaces' own capabilities included)
DELIVERS: Mapping[str, str] = {
    "logprobs": "token log probabilities", "audio_output": "audio output", "web_search": "a web search",
    "functions": "legacy function calling (use tools)", CHOICES: "more than one choice",
    "server_tools": "a tool the provider runs or defines itself (server tools, code execution containers)",
    "mcp_servers": "MCP servers the provider connects to",
    "citations": "citations of the documents it was given (Anthropic's citations)",
    "custom_tools": "a custom tool (free-form input, a grammar), which only a Responses upstream takes",
    "allowed_tools": "a choice restricted to some of the tools (allowed_tools)"}


def check_asks(request: ChatRequest, capabilities: frozenset[str], provider: str, model: str) -> None:
    """Raise :class:`~scillm_core.errors.UnsupportedParameter` for the first parameter of ``request`` that asks for
    something ``capabilities`` lack. A set lookup over the keys present: a plain request costs three tests."""
    asks: Mapping[str, str] | None = request.scillm.get("asks")
    if asks:  # first: they name the client's own fields (a Responses top_logprobs is chat's logprobs too)
        for path, capability in asks.items():
            if capability not in capabilities:
                _refuse(path, capability, provider, model)
    extra = request.extra
    if extra:
        present = CHAT_ASKS.keys() & extra.keys()
        if present:
            for key in sorted(present):
                capability, idle = CHAT_ASKS[key]
                if capability not in capabilities and not idle(extra[key]):
                    _refuse(f"$.{key}", capability, provider, model)
    if request.n is not None and request.n != 1 and CHOICES not in capabilities:
        _refuse("$.n", CHOICES, provider, model)


def _refuse(path: str, capability: str, provider: str, model: str) -> None:
    raise errors.UnsupportedParameter(
        f"{path[2:]} asks for {_delivers(capability)}, which provider {provider!r} cannot deliver "
        f"for model {model!r}; "
        f"remove it or route to a model that has it (GET /v1/scillm/providers lists capabilities) @ {path}",
        param=path, details={"error_code": "unsupported_parameter", "provider": provider, "model": model})


def _delivers(capability: str) -> str:
    if capability.startswith(HOSTED):
        return f"the hosted tool {capability[len(HOSTED):]!r}, which OpenAI's Responses API runs itself"
    return DELIVERS.get(capability, capability)
