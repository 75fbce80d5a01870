"""Ollama passes the provider contract against the Ollama-format fake (native /api/chat wire forms asserted)."""

from __future__ import annotations

from scillm_core.testing import RecordedRequest
from scillm_core.testing.contract import TINY_PNG_B64, ProviderContract
from scillm_core.testing.fake_ollama import FakeOllama


class TestOllama(ProviderContract):
    plugin = "ollama"
    provider, model, upstream_model = "ollama", "llama3.2:latest", "llama3.2:latest"
    key_env, base_env = None, "OLLAMA_API_BASE"
    fake_class = FakeOllama
    embeddings_model, embeddings_upstream_model = "ollama/nomic-embed-text", "nomic-embed-text"

    def check_upstream(self, request: RecordedRequest, *, stream: bool) -> None:
        assert request.method == "POST" and request.path == "/api/chat"
        assert "authorization" not in request.headers
        assert request.body["model"] == self.upstream_model
        assert request.body["stream"] is stream  # always explicit: Ollama streams by default
        assert all(isinstance(m["content"], str) for m in request.body["messages"])

    def check_embeddings_upstream(self, request: RecordedRequest, texts: list[str]) -> None:
        assert request.method == "POST" and request.path == "/api/embed"
        assert request.body == {"model": self.embeddings_upstream_model,
                                "input": texts[0] if len(texts) == 1 else texts}

    def check_image(self, request: RecordedRequest) -> None:
        assert request.body["messages"][0] == {"role": "user", "content": "What is in this image?",
                                               "images": [TINY_PNG_B64]}

