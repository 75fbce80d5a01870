"""JSON answers: repair (json-repair) and JSON Schema validation with correction re-asks (``postprocess_json``).

JSON is "asked for" when ``response_format.type`` is ``json_object`` or ``json_schema``, the request header
``x-expect-json`` is ``1``/``true``/``yes``, or the body carries ``json_schema``. Then each choice's text is
stripped of code fences and parsed; invalid JSON is repaired with json-repair (the response says
``json_repaired: true``); an answer that yields no JSON object or array is a 502 ``json_validation_error``.

``json_schema`` (a JSON Schema, or ``{"name", "schema"}`` as in ``response_format``) validates the parsed answer;
on errors the model is re-asked with its answer and the errors appended, up to ``schema_retries`` times (default
from config, 2), through ``ctx.complete``; still invalid -> 422 ``schema_validation_failed`` listing the errors.
Success marks ``schema_validated: true`` (and ``schema_attempts``) in the response.

Streams pass through untouched (nothing can be repaired once sent); ``json_schema`` with ``stream: true`` is a 400
because it could not be validated. Fails closed: a JSON answer that cannot be made valid is an error, never a
silent pass. Config: ``[json] enabled = true``, ``schema_retries = 2``, ``max_schema_retries = 5``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs
import orjson
from attrs import frozen

from scillm_core import ChatRequest, ChatResponse, Message, Runtime, errors, hookimpl, schemas
from scillm_core.jsonio import MAX_DEPTH, JSONTooDeep, depth_problem, loads

if TYPE_CHECKING:
    from scillm_core import CallContext
    from scillm_core.pipeline import ChatResult, ResponseThunk

__all__ = ["JSONConfig", "JSONValidationError", "SchemaValidationFailed", "extract_json"]

TRUTHY = frozenset({"1", "true", "yes", "on"})
MAX_ERRORS = 10
_FENCE = re.compile(r"^\s*```[A-Za-z0-9_-]*[ \t]*\r?\n?(.*?)\r?\n?```\s*$", re.DOTALL)
_INNER_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\r?\n(.*?)\r?\n?```", re.DOTALL)


@frozen(kw_only=True)
class JSONConfig:
    enabled: bool = True
    schema_retries: int = 2
    max_schema_retries: int = 5


class JSONValidationError(errors.UpstreamError):
    """The model was asked for JSON and its answer cannot be repaired into JSON."""

    status = 502
    code = "json_validation_error"
    retryable = False


class SchemaValidationFailed(errors.UpstreamError):
    """The answer still does not match ``json_schema`` after every correction re-ask."""

    status = 422
    type = "invalid_response_error"
    code = "schema_validation_failed"
    retryable = False


def _config(runtime: Runtime) -> JSONConfig:
    return runtime.config.sections.get("json") or JSONConfig()  # type: ignore[no-any-return]


@hookimpl
def scillm_config_sections() -> Mapping[str, type]:
    return {"json": JSONConfig}


@hookimpl
def scillm_health(runtime: Runtime) -> Mapping[str, Any]:
    config = _config(runtime)
    return {"json": {"enabled": config.enabled, "fails": "closed", "schema_retries": config.schema_retries,
                     "streams": "pass-through"}}


# -- parsing and repair --------------------------------------------------------------------------------------------

def strip_fences(text: str) -> str:
    """The JSON inside a Markdown code fence (the whole answer, or the first ```json block in prose)."""
    match = _FENCE.match(text)
    if match:
        return match.group(1).strip()
    inner = _INNER_FENCE.search(text)
    if inner and not text.lstrip().startswith(("{", "[")):
        return inner.group(1).strip()
    return text.strip()


def extract_json(text: str) -> tuple[Any, str, bool]:
    """``(value, json_text, repaired)`` for an answer; raises ``ValueError`` when it holds no JSON object/array."""
    body = strip_fences(text)
    try:
        value = loads(body)
        return value, body, body != text.strip()
    except JSONTooDeep as exc:
        raise ValueError(f"the answer is {exc.msg}") from None
    except orjson.JSONDecodeError:
        pass
    import json_repair

    try:
        value = json_repair.repair_json(body, return_objects=True)
        repaired = orjson.dumps(value).decode()
        if depth_problem(value) is not None:
            raise ValueError
    except (RecursionError, ValueError, TypeError):  # orjson.JSONEncodeError is a TypeError
        raise ValueError(f"the answer is nested deeper than {MAX_DEPTH} levels or cannot be repaired") from None
    if not isinstance(value, dict | list) or (not value and not re.search(r"[\[{]", body)):
        raise ValueError("the answer holds no JSON object or array")
    return value, repaired, True


def _wants_json(request: ChatRequest, ctx: CallContext) -> bool:
    kind = (request.response_format or {}).get("type")
    if kind in ("json_object", "json_schema"):
        return True
    if (ctx.headers.get("x-expect-json") or "").strip().lower() in TRUTHY:
        return True
    return request.scillm.get("json_schema") is not None


def _raw_schema(request: ChatRequest) -> tuple[Any, str] | None:
    """The caller's ``json_schema`` (unwrapped from ``{"name", "schema"}``) and its path, or ``None``."""
    raw = request.scillm.get("json_schema")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise errors.InvalidRequest("json_schema must be a JSON Schema object @ $.json_schema", param="$.json_schema")
    schema, suffix = schemas.unwrap(raw)
    return schema, "$.json_schema" + suffix


def _retries_of(request: ChatRequest, config: JSONConfig) -> int:
    raw = request.scillm.get("schema_retries")
    if raw is None:
        return config.schema_retries
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= config.max_schema_retries:
        raise errors.InvalidRequest(f"schema_retries must be an integer from 0 to {config.max_schema_retries} "
                                    "@ $.schema_retries", param="$.schema_retries")
    return raw


# -- the wrapper ---------------------------------------------------------------------------------------------------

@hookimpl(wrapper=True)
def postprocess_json(request: ChatRequest, ctx: CallContext) -> Any:
    call: ResponseThunk = yield
    config = _config(ctx.runtime)
    if not config.enabled or not isinstance(request, ChatRequest) or not _wants_json(request, ctx):
        return call  # embeddings requests pass through: there is no answer text to repair
    raw_schema = _raw_schema(request)
    retries = _retries_of(request, config)
    if request.stream:
        if raw_schema is not None:
            raise errors.InvalidRequest("json_schema cannot be validated on a streamed answer; send stream: false "
                                        "@ $.json_schema", param="$.json_schema")
        return call

    async def checked() -> ChatResult:
        # the schema is checked (metaschema, references, no fetching) before any upstream call: a bad one is a 400
        schema = None if raw_schema is None else await schemas.check_schema_async(*raw_schema)
        result = await call()
        if not isinstance(result, ChatResponse):
            return result
        response = _repaired(result, ctx, request)
        if schema is None:
            return response
        attempts = 1
        current_request = request
        while True:
            problems = await _validate(response, schema)
            if not problems:
                return attrs.evolve(response, extra={**response.extra, "schema_validated": True,
                                                     "schema_attempts": attempts})
            if attempts > retries:
                route = ctx.route
                raise SchemaValidationFailed(
                    f"the answer does not match json_schema after {attempts} attempt(s): " + "; ".join(problems),
                    provider=route.provider if route else "?", model=route.model if route else request.model,
                    details={"errors": problems, "attempts": attempts})
            current_request = _reask(current_request, response, problems)
            answer = await ctx.complete(current_request)
            assert isinstance(answer, ChatResponse)
            response = _repaired(answer, ctx, request)
            attempts += 1

    return checked


def _repaired(response: ChatResponse, ctx: CallContext, request: ChatRequest) -> ChatResponse:
    choices = []
    repaired_any = False
    for choice in response.choices:
        message = choice.message
        if not message.text and (message.tool_calls or choice.finish_reason == "length"):
            choices.append(choice)  # tool calls; or an exhausted budget, which the surface reports as such
            continue
        try:
            _, text, repaired = extract_json(message.text)
        except ValueError as exc:
            route = ctx.route
            preview = message.text[:120].replace("\n", " ")
            raise JSONValidationError(
                f"JSON was asked for but choice {choice.index} is not JSON and cannot be repaired: {exc} "
                f"(starts with {preview!r})", provider=route.provider if route else "?",
                model=route.model if route else request.model) from None
        repaired_any = repaired_any or repaired
        choices.append(attrs.evolve(choice, message=attrs.evolve(message, content=text)) if repaired else choice)
    if not repaired_any:
        return response
    return attrs.evolve(response, choices=tuple(choices), extra={**response.extra, "json_repaired": True})


async def _validate(response: ChatResponse, validator: Any) -> list[str]:
    problems: list[str] = []
    for choice in response.choices:
        value = loads(choice.message.text) if choice.message.text else None
        found = await schemas.errors_async(validator, value, MAX_ERRORS)
        prefix = f"choice {choice.index}: " if len(response.choices) > 1 else ""
        problems.extend(prefix + p for p in found)
    return problems


def _reask(request: ChatRequest, response: ChatResponse, problems: list[str]) -> ChatRequest:
    correction = ("Your previous answer does not match the required JSON schema. Errors:\n"
                  + "\n".join(f"- {p}" for p in problems)
                  + "\nReply with only the corrected JSON, no prose and no code fences.")
    return attrs.evolve(request, messages=(*request.messages,
                                           Message(role="assistant", content=response.text),
                                           Message(role="user", content=correction)))
