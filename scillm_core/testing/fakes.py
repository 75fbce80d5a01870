"""Fake upstreams that speak real wire formats over loopback, scripted with :class:`Reply` objects.

:class:`FakeUpstream` is the base (request log, script queue, thread server); :class:`FakeOpenAI` speaks OpenAI
chat completions exactly as recorded in ``shared/fixtures/openai`` (role chunk first, fragmentary tool-call
arguments, finish chunk, the ``choices: []`` usage chunk only with ``include_usage``, ``data: [DONE]``), plus the
OpenAI-compatible variants (keep-alive comments, usage inside the finish chunk, whole tool calls, FastAPI
``{"detail"}`` errors). Other provider plugins subclass :class:`FakeUpstream` for their own format.
"""

from __future__ import annotations

import array
import asyncio
import base64
import itertools
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import orjson
from attrs import frozen
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from scillm_core.testing.replies import Reply, fake_vector
from scillm_core.testing.server import ServerThread

__all__ = ["FakeOpenAI", "FakeUpstream", "RecordedRequest"]


@frozen
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: Mapping[str, str]
    body: Any
    raw: bytes = b""  # the body's bytes as they arrived

    @property
    def json(self) -> Any:
        return self.body


class FakeUpstream:
    """Base fake: records every request, answers from a script (then from ``default``), runs in a thread."""

    default: Reply = Reply(text="Hello from the fake.")
    #: Well-formed JSON of the wrong shape for the dialect (a number where an object or list belongs): a whole
    #: answer (``Reply(raw=...)``), and one stream event in the dialect's framing (``Reply(garbage=...)``).
    wrong_shape_answer: bytes | None = b'{"choices": 5}'  # None: whole answers come as streams too
    wrong_shape_event: bytes = b'data: {"choices": 5}\n\n'

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._script: list[Reply] = []
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.server: ServerThread | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    # -- scripting ----------------------------------------------------------------------------------------------

    def script(self, *replies: Reply) -> FakeUpstream:
        with self._lock:
            self._script.extend(replies)
        return self

    #: Optional ``fn(recorded_request) -> Reply | None`` consulted before the script (answer by content).
    responder: Callable[[RecordedRequest], Reply | None] | None = None

    def next_reply(self, request: RecordedRequest | None = None) -> Reply:
        if self.responder is not None and request is not None:
            reply = self.responder(request)
            if reply is not None:
                return reply
        with self._lock:
            return self._script.pop(0) if self._script else self.default

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    def next_id(self) -> int:
        return next(self._ids)

    # -- serving ------------------------------------------------------------------------------------------------

    def routes(self) -> list[Route]:
        raise NotImplementedError

    def app(self) -> Starlette:
        return Starlette(routes=self.routes())

    def start(self) -> FakeUpstream:
        self.server = ServerThread(self.app()).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self.server is not None, "fake not started"
        return self.server.url

    async def record(self, request: Request) -> RecordedRequest:
        raw = await request.body()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
        recorded = RecordedRequest(request.method, request.url.path, request.url.query,
                                   {k.lower(): v for k, v in request.headers.items()}, body, raw)
        self.requests.append(recorded)
        return recorded

    async def answer(self, request: RecordedRequest | None = None) -> Reply:
        """The next reply (see :meth:`next_reply`) after its scripted wait, counted in ``in_flight`` meanwhile."""
        reply = self.next_reply(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self.pause(reply)
        finally:
            self.in_flight -= 1
        return reply

    async def pause(self, reply: Reply) -> None:
        if reply.hang:
            await asyncio.sleep(3600)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)

    @staticmethod
    async def faulty(reply: Reply, events: Iterable[bytes], *, failure: Callable[[int], bytes], garbage: bytes,
                     terminal: bytes = b"") -> AsyncIterator[bytes]:
        """A stream body: the encoded ``events``, then ``terminal`` (the dialect's end marker), with the faults
        ``reply`` scripts: ``first_chunk_delay_s`` before the first event; before event ``n`` the connection drops
        (``cut_after``: what the client had not read yet may be lost with it, as with a real reset), the body ends
        cleanly (``end_after``), goes silent (``stall_after``), an error event ``failure(n)`` ends the stream
        (``error_after``) or ``garbage`` comes first (``malformed_at``); ``no_terminal`` leaves the marker out."""
        if reply.first_chunk_delay_s:
            await asyncio.sleep(reply.first_chunk_delay_s)
        for n, event in enumerate(events):
            if reply.cut_after is not None and n >= reply.cut_after:
                raise ConnectionAbortedError("fake upstream cut the stream")  # uvicorn drops the connection
            if reply.end_after is not None and n >= reply.end_after:
                return
            if reply.stall_after is not None and n >= reply.stall_after:
                await asyncio.sleep(3600)  # until the client goes away
            if reply.error_after is not None and n >= reply.error_after:
                yield failure(n)
                return
            if n in reply.malformed_at:
                yield reply.garbage or garbage
            yield event
        if terminal and not reply.no_terminal:
            yield terminal


def sse(payload: Any) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else orjson.dumps(payload)) + b"\n\n"


def float32_base64(vector: list[float]) -> str:
    """OpenAI's ``encoding_format: "base64"``: the vector as little-endian float32 bytes, base64-encoded."""
    values = array.array("f", vector)
    if sys.byteorder == "big":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode()


class FakeOpenAI(FakeUpstream):
    """OpenAI chat completions and embeddings at ``{url}/v1``.

    ``POST /v1/embeddings`` answers like OpenAI: ``{"object": "list", "data": [{"object": "embedding", "index",
    "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}``, each vector :func:`fake_vector` of its
    input (``dimensions`` long when asked, else :attr:`embedding_dimensions`), base64 float32 when
    ``encoding_format`` is ``"base64"``; a malformed ``input`` is OpenAI's 400.

    With :attr:`wants_reasoning_back` it is a thinking model that wants its reasoning back in a tool loop, as Kimi's
    are: an assistant turn with tool calls but no ``reasoning_content`` is Moonshot's 400.
    """

    base_path = "/v1"
    embedding_dimensions = 8
    wants_reasoning_back = False

    @property
    def base_url(self) -> str:
        return self.url + self.base_path

    def routes(self) -> list[Route]:
        return [Route(f"{self.base_path}/chat/completions", self.chat, methods=["POST"]),
                Route(f"{self.base_path}/embeddings", self.embeddings, methods=["POST"]),
                Route(f"{self.base_path}/models", self.models, methods=["GET"])]

    @staticmethod
    def _error(status: int, message: str, *, type: str | None = "invalid_request_error", param: str | None = None,
               code: str | None = None, headers: Mapping[str, str] | None = None) -> Response:
        return Response(orjson.dumps({"error": {"message": message, "type": type, "param": param, "code": code}}),
                        status_code=status, headers=dict(headers or {}), media_type="application/json")

    async def embeddings(self, request: Request) -> Response:
        recorded = await self.record(request)
        body = recorded.body if isinstance(recorded.body, dict) else {}
        if not isinstance(body.get("model"), str):
            return self._error(400, "you must provide a model parameter")
        inputs = body.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or any(item in ("", []) for item in inputs):
            return self._error(400, "'$.input' is invalid. Please check the API reference: "
                                    "https://platform.openai.com/docs/api-reference.")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            return self._error(400, f"'{fmt}' is not one of ['float', 'base64'] - 'encoding_format'")
        reply = await self.answer(recorded)
        headers = {"x-request-id": f"req_fake{self.next_id()}", "openai-processing-ms": "21", **reply.headers}
        if reply.status >= 400:
            error = reply.error if isinstance(reply.error, dict) else {"message": str(reply.error)}
            return self._error(reply.status, error.get("message", "upstream failure"), type=error.get("type"),
                               code=error.get("code"), headers=headers)
        size = body.get("dimensions") or self.embedding_dimensions
        data = []
        for index, item in enumerate(inputs):
            vector = fake_vector(item, size)
            data.append({"object": "embedding", "index": index,
                         "embedding": float32_base64(vector) if fmt == "base64" else vector})
        tokens = sum(len(item) if isinstance(item, list) else len(item.split()) for item in inputs)
        return Response(orjson.dumps({"object": "list", "data": data, "model": reply.model or body["model"],
                                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
                        headers=headers, media_type="application/json")

    async def models(self, request: Request) -> Response:
        return Response(orjson.dumps({"object": "list", "data": [
            {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]}),
            media_type="application/json")

    async def chat(self, request: Request) -> Response:
        recorded = await self.record(request)
        reply = await self.answer(recorded)
        body = recorded.body if isinstance(recorded.body, dict) else {}
        if self.wants_reasoning_back and any(
                isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls")
                and not m.get("reasoning_content") for m in body.get("messages") or ()):
            reply = Reply.fail(400, "thinking is enabled but reasoning_content is missing in assistant tool call "
                                    "message at index 1", type="invalid_request_error")
        model = reply.model or body.get("model") or "fake-model"
        headers = {"x-request-id": f"req_fake{self.next_id()}", "openai-processing-ms": "12",
                   "openai-version": "2020-10-01", **reply.headers}
        if reply.raw is not None and not body.get("stream"):
            return Response(reply.raw, status_code=reply.status, headers=headers, media_type="application/json")
        if reply.status >= 400:
            error = reply.error
            payload = error if not isinstance(error, dict) or "message" not in error else {
                "error": {"message": error["message"], "type": error.get("type"), "param": None,
                          "code": error.get("code")}}
            return Response(orjson.dumps(payload), status_code=reply.status, headers=headers,
                            media_type="application/json")
        completion_id = f"chatcmpl-fake{self.next_id()}"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(self._events(reply, completion_id, model, include_usage), headers=headers,
                                     media_type="text/event-stream; charset=utf-8")
        return Response(orjson.dumps(self.completion(reply, completion_id, model)), headers=headers,
                        media_type="application/json")

    # -- rendering ----------------------------------------------------------------------------------------------

    @staticmethod
    def usage(reply: Reply) -> dict[str, Any]:
        return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                "total_tokens": reply.prompt_tokens + reply.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": reply.cached_tokens, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                              "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}}

    def completion(self, reply: Reply, completion_id: str, model: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text or None, "refusal": None,
                                   "annotations": []}
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": call.id or f"call_fake{i}", "type": "function",
                 "function": {"name": call.name, "arguments": orjson.dumps(call.arguments).decode()}}
                for i, call in enumerate(reply.tool_calls)]
        return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish}],
                "usage": self.usage(reply), "service_tier": "default", "system_fingerprint": "fp_fake"}

    def chunks(self, reply: Reply, completion_id: str, model: str, include_usage: bool) -> Iterable[dict[str, Any]]:
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
            out: dict[str, Any] = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                                   "model": model, "service_tier": "default", "system_fingerprint": "fp_fake",
                                   "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                "finish_reason": finish}]}
            if include_usage:
                out["usage"] = None
            out.update(extra)
            return out

        if reply.tool_calls and not reply.text:
            yield chunk({"role": "assistant", "content": None, "refusal": None})
        else:
            yield chunk({"role": "assistant", "content": "", "refusal": None})
        if reply.reasoning:
            for i in range(0, len(reply.reasoning), max(1, reply.chunk_size)):
                yield chunk({"reasoning_content": reply.reasoning[i:i + reply.chunk_size]})
        for piece in reply.text_pieces():
            yield chunk({"content": piece})
        for index, call in enumerate(reply.tool_calls):
            call_id = call.id or f"call_fake{index}"
            arguments = orjson.dumps(call.arguments).decode()
            if reply.whole_tool_call:
                yield chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                             "function": {"name": call.name, "arguments": arguments}}]})
                continue
            yield chunk({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                         "function": {"name": call.name, "arguments": ""}}]})
            for i in range(0, len(arguments), 6):
                yield chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments[i:i + 6]}}]})
        if reply.usage_in_finish:
            yield chunk({}, reply.finish, usage=self.usage(reply))
            return
        yield chunk({}, reply.finish)
        if include_usage:
            yield {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "service_tier": "default", "system_fingerprint": "fp_fake", "choices": [],
                   "usage": self.usage(reply)}

    async def _events(self, reply: Reply, completion_id: str, model: str, include_usage: bool) -> AsyncIterator[bytes]:
        if reply.keepalive:
            yield b": keep-alive\n\n: keep-alive\n\n"
        events = (sse(payload) for payload in self.chunks(reply, completion_id, model, include_usage))
        failure = sse(reply.error_event or {"error": {"message": "upstream failed mid-stream", "type": "server_error",
                                                      "code": None}})
        async for event in self.faulty(reply, events, failure=lambda n: failure, terminal=b"data: [DONE]\n\n",
                                       garbage=b'data: {"id": "chatcmpl-broken", "choices": [{"delta": {\n\n'):
            yield event
