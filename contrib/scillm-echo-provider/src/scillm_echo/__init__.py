"""An example provider: ``echo/<anything>`` answers with the last user message, streamed word by word."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from scillm_core import (
    CallContext,
    ChatChunk,
    ChatRequest,
    ChatResponse,
    Choice,
    ChunkChoice,
    Delta,
    Message,
    Provider,
    ProviderRegistry,
    Route,
    Runtime,
    Usage,
    hookimpl,
)


class EchoProvider(Provider):
    name = "echo"
    family = "example"
    prefixes = ("echo/",)
    aliases = {"parrot": "parrot"}

    def known_models(self) -> list[str]:
        return ["echo/any"]

    @staticmethod
    def answer(request: ChatRequest) -> str:
        last_user = next((m for m in reversed(request.messages) if m.role == "user"), None)
        return last_user.text if last_user else ""

    async def complete(self, request: ChatRequest, route: Route, ctx: CallContext) -> ChatResponse:
        text = self.answer(request)
        words = len(text.split())
        return ChatResponse(id=f"echo-{uuid.uuid4().hex[:12]}", model=route.model, created=int(time.time()),
                            choices=(Choice(message=Message(role="assistant", content=text), finish_reason="stop"),),
                            usage=Usage(prompt_tokens=words, completion_tokens=words, total_tokens=2 * words))

    async def stream(self, request: ChatRequest, route: Route, ctx: CallContext) -> AsyncIterator[ChatChunk]:
        text = self.answer(request)
        chunk_id = f"echo-{uuid.uuid4().hex[:12]}"

        async def chunks() -> AsyncIterator[ChatChunk]:
            yield ChatChunk(id=chunk_id, model=route.model, choices=(ChunkChoice(delta=Delta(role="assistant")),))
            for i, word in enumerate(text.split(" ")):
                piece = word if i == 0 else " " + word
                yield ChatChunk(id=chunk_id, model=route.model, choices=(ChunkChoice(delta=Delta(content=piece)),))
            yield ChatChunk(id=chunk_id, model=route.model,
                            choices=(ChunkChoice(delta=Delta(), finish_reason="stop"),))

        return chunks()


@hookimpl
def scillm_register_providers(providers: ProviderRegistry, runtime: Runtime) -> None:
    providers.add(EchoProvider())
