"""Gemini passes the provider contract against the Gemini-format fake (native wire forms asserted)."""

from __future__ import annotations

from typing import Any

from scillm_core.testing import RecordedRequest
from scillm_core.testing.contract import TINY_PNG_B64, ProviderContract
from scillm_core.testing.fake_gemini import FakeGemini


class TestGemini(ProviderContract):
    plugin = "gemini"
    provider, model, upstream_model = "gemini", "gemini-2.5-flash", "gemini-2.5-flash"
    key_env, base_env = "GEMINI_API_KEY", "GEMINI_API_BASE"
    key = "AIzaContractSecret0123456789abcdefghij"
    fake_class = FakeGemini
    embeddings_model = embeddings_upstream_model = "gemini-embedding-001"

    def check_upstream(self, request: RecordedRequest, *, stream: bool) -> None:
        assert request.headers.get("x-goog-api-key") == self.key
        assert "authorization" not in request.headers
        method = "streamGenerateContent" if stream else "generateContent"
        assert request.path == f"/v1beta/models/{self.upstream_model}:{method}"
        assert request.query == ("alt=sse" if stream else "")
        assert request.body["contents"][0]["role"] == "user"
        assert "model" not in request.body and "messages" not in request.body

    def check_embeddings_upstream(self, request: RecordedRequest, texts: list[str]) -> None:
        assert request.headers.get("x-goog-api-key") == self.key
        assert request.path == f"/v1beta/models/{self.embeddings_upstream_model}:batchEmbedContents"
        assert request.body == {"requests": [{"model": f"models/{self.embeddings_upstream_model}",
                                              "content": {"parts": [{"text": text}]}} for text in texts]}

    def check_image(self, request: RecordedRequest) -> None:
        parts = request.body["contents"][0]["parts"]
        assert parts == [{"text": "What is in this image?"},
                         {"inlineData": {"mimeType": "image/png", "data": TINY_PNG_B64}}]


class TestGeminiPrefixAndVersionedBase(TestGemini):
    """``gemini/<m>`` routes here, and a base that already names the API version is used as is."""

    model = "gemini/gemini-3-flash-preview"
    upstream_model = "gemini-3-flash-preview"
    embeddings_model = "gemini/gemini-embedding-001"

    def base_url(self, fake: Any) -> str:
        return fake.url + "/v1beta"
