"""A fake Ollama server rendering :class:`Reply` objects in the wire format recorded in ``shared/fixtures/ollama``.

- ``POST /api/chat``: NDJSON (``application/x-ndjson``) by default, one object a line, ``done: false`` content lines,
  tool calls complete in one ``done: false`` line with object ``arguments`` (with ``id`` and ``function.index`` as
  newer servers send them, or without when ``tool_call_ids = False``), then the ``done: true`` line with
  ``done_reason``, nanosecond durations, ``prompt_eval_count`` and ``eval_count``; ``"stream": false`` gives the
  single final object;
- ``"logprobs": true`` (with ``top_logprobs`` k, 0 to 20, else 400 as Ollama says it): each generated line (content
  and thinking; one text piece is one token) carries a top-level ``logprobs`` list ``[{"token", "logprob",
  "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]`` (``top_logprobs`` left out when k is 0, as Ollama's
  ``omitempty`` does); the ``stream: false`` body has every line's entries in one list;
- errors as ``{"error": "..."}`` with the status; a mid-stream failure (``error_after``) is an extra
  ``{"error": "..."}`` line on the HTTP 200 stream; ``models`` (when set) makes unknown models 404
  ``model 'x' not found``;
- ``GET /api/tags`` lists ``tags`` (``tags_delay_s`` slows it down); ``GET /`` and ``GET /api/version`` answer;
- ``POST /api/embed`` with ``{"model", "input": str | [str], "truncate"?, "dimensions"?, "options"?,
  "keep_alive"?}`` -> ``{"model", "embeddings": [[...]], "total_duration", "load_duration", "prompt_eval_count"}``
  (a single string still gets a list of one vector), vectors :func:`~scillm_core.testing.replies.fake_vector` of
  each text; a missing model is 400 ``model is required``, an unknown one (with ``models`` set) 404.
"""

from __future__ import annotations

import asyncio
import secrets
import string
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from scillm_core.testing.fakes import FakeUpstream
from scillm_core.testing.replies import Reply, fake_vector

__all__ = ["FakeOllama"]

_ALPHABET = string.ascii_lowercase + string.digits


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class FakeOllama(FakeUpstream):
    """Ollama at ``{url}`` (``Client(host=fake.url)``)."""

    tool_call_ids = True
    models: tuple[str, ...] | None = None
    wrong_shape_answer = b'{"model": "llama3.2", "message": {"role": "assistant", "content": 5}, "done": true}'
    wrong_shape_event = b'{"model": "llama3.2", "message": {"role": "assistant", "content": 5}, "done": false}\n'
    tags: tuple[str, ...] = ("llama3.2:latest", "qwen3:8b")
    tags_delay_s = 0.0
    embedding_dimensions = 8

    def __init__(self) -> None:
        super().__init__()
        self.tags_requests = 0

    @property
    def base_url(self) -> str:
        return self.url

    def routes(self) -> list[Route]:
        return [Route("/api/chat", self.chat, methods=["POST"]),
                Route("/api/embed", self.embed, methods=["POST"]),
                Route("/api/tags", self.list_tags, methods=["GET"]),
                Route("/api/version", self.version, methods=["GET"]),
                Route("/", self.root, methods=["GET", "HEAD"])]

    async def root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(self, request: Request) -> Response:
        return Response(orjson.dumps({"version": "0.12.6"}), media_type="application/json; charset=utf-8")

    async def list_tags(self, request: Request) -> Response:
        self.tags_requests += 1
        if self.tags_delay_s:
            await asyncio.sleep(self.tags_delay_s)
        return Response(orjson.dumps({"models": [
            {"name": name, "model": name, "modified_at": "2025-10-01T12:00:00.000000000Z", "size": 2019393189,
             "digest": "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72",
             "details": {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                         "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}} for name in self.tags]}),
            media_type="application/json; charset=utf-8")

    @staticmethod
    def _error(status: int, message: Any, headers: dict[str, str] | None = None) -> Response:
        return Response(orjson.dumps(message if isinstance(message, dict) and "error" in message
                                     else {"error": message}),
                        status_code=status, headers=headers, media_type="application/json; charset=utf-8")

    async def _model_call(self, request: Request, not_found: str) -> tuple[dict[str, Any], str, Reply] | Response:
        """Record the request, check its model (400 missing, 404 unknown with ``not_found``), and wait for the
        scripted reply: ``(body, model, reply)``, or the error response to send."""
        recorded = await self.record(request)
        body = recorded.body if isinstance(recorded.body, dict) else {}
        model = body.get("model")
        if not model:
            return self._error(400, "model is required")
        if self.models is not None and model not in self.models:
            return self._error(404, not_found.format(model=model))
        reply = await self.answer()
        if reply.status >= 400:
            error = reply.error
            message = error["message"] if isinstance(error, dict) and "message" in error else error
            return self._error(reply.status, message if message is not None else "upstream failure",
                               dict(reply.headers))
        return body, str(model), reply

    async def chat(self, request: Request) -> Response:
        call = await self._model_call(request, "model '{model}' not found")
        if isinstance(call, Response):
            return call
        body, model, reply = call
        model = reply.model or model
        top = body.get("top_logprobs") or 0
        if not isinstance(top, int) or not 0 <= top <= 20:
            return self._error(400, "top_logprobs must be between 0 and 20")
        lines = list(self.lines(reply, model, top if body.get("logprobs") is True else None))
        if body.get("stream", True) is False:
            if reply.raw is not None:
                return Response(reply.raw, status_code=reply.status, media_type="application/json; charset=utf-8")
            return Response(orjson.dumps(self.merge(lines)), headers=dict(reply.headers),
                            media_type="application/json; charset=utf-8")
        return StreamingResponse(self._ndjson(reply, lines), headers=dict(reply.headers),
                                 media_type="application/x-ndjson")

    async def embed(self, request: Request) -> Response:
        call = await self._model_call(request, 'model "{model}" not found, try pulling it first')
        if isinstance(call, Response):
            return call
        body, model, reply = call
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not all(isinstance(item, str) for item in inputs):
            return self._error(400, "invalid input type")
        size = body.get("dimensions") or self.embedding_dimensions
        return Response(orjson.dumps({
            "model": reply.model or model, "embeddings": [fake_vector(text, size) for text in inputs],
            "total_duration": 14143917, "load_duration": 1019500,
            "prompt_eval_count": sum(max(1, len(text.split())) for text in inputs)}),
            media_type="application/json; charset=utf-8")

    # -- rendering ----------------------------------------------------------------------------------------------

    @staticmethod
    def logprob(token: str, position: int, top: int) -> dict[str, Any]:
        """The deterministic entry of the token at ``position`` (with ``top`` alternatives, itself first)."""
        def one(text: str, logprob: float) -> dict[str, Any]:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        entry = one(token, -0.125 * (position % 8 + 1))
        if top:
            entry["top_logprobs"] = [entry.copy(), *(one(f"alt{k}", entry["logprob"] - k) for k in range(1, top))]
        return entry

    def lines(self, reply: Reply, model: str, logprobs: int | None = None) -> Iterable[dict[str, Any]]:
        """The NDJSON lines of ``reply``; ``logprobs`` (when asked: the ``top_logprobs`` count) adds each generated
        line's ``logprobs``."""
        position = 0

        def line(message: dict[str, Any], token: str | None = None) -> dict[str, Any]:
            nonlocal position
            out = {"model": model, "created_at": _now(), "message": {"role": "assistant", **message}, "done": False}
            if logprobs is not None and token:
                out["logprobs"] = [self.logprob(token, position, logprobs)]
                position += 1
            return out

        if reply.reasoning:
            for i in range(0, len(reply.reasoning), max(1, reply.chunk_size)):
                piece = reply.reasoning[i:i + reply.chunk_size]
                yield line({"content": "", "thinking": piece}, piece)
        for piece in reply.text_pieces():
            yield line({"content": piece}, piece)
        if reply.tool_calls:
            calls = []
            for index, call in enumerate(reply.tool_calls):
                function: dict[str, Any] = {"name": call.name, "arguments": dict(call.arguments)}
                if self.tool_call_ids:
                    calls.append({"id": call.id or "call_" + "".join(secrets.choice(_ALPHABET) for _ in range(8)),
                                  "function": {"index": index, **function}})
                else:
                    calls.append({"function": function})
            yield line({"content": "", "tool_calls": calls})
        yield {"model": model, "created_at": _now(), "message": {"role": "assistant", "content": ""}, "done": True,
               "done_reason": "length" if reply.finish == "length" else "stop", "total_duration": 4883583458,
               "load_duration": 1334875, "prompt_eval_count": reply.prompt_tokens, "prompt_eval_duration": 342546000,
               "eval_count": reply.completion_tokens, "eval_duration": 4535599000}

    @staticmethod
    def merge(lines: list[dict[str, Any]]) -> dict[str, Any]:
        """The ``stream: false`` body: the final line with the whole message (``done_reason`` before ``done``)."""
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        logprobs = [entry for line in lines for entry in line.get("logprobs", ())]
        for line in lines:
            part = line["message"]
            message["content"] += part.get("content", "")
            if part.get("thinking"):
                message["thinking"] = message.get("thinking", "") + part["thinking"]
            if part.get("tool_calls"):
                message.setdefault("tool_calls", []).extend(part["tool_calls"])
        final = lines[-1]
        head = {"model": final["model"], "created_at": final["created_at"], "message": message,
                "done_reason": final["done_reason"], "done": True}
        if logprobs:  # after done_reason, before the metrics, as Ollama's ChatResponse orders them
            head["logprobs"] = logprobs
        return {**head, **{k: v for k, v in final.items() if k not in head}}

    async def _ndjson(self, reply: Reply, lines: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        failure = orjson.dumps(reply.error_event or {"error": "an error was encountered while running the model"}) + \
            b"\n"
        async for line in self.faulty(reply, (orjson.dumps(line) + b"\n" for line in lines),
                                      failure=lambda n: failure, garbage=b'{"model": "broken", "message": \n'):
            yield line
