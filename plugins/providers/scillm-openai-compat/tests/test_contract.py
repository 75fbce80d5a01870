"""Every OpenAI-compatible vendor passes the provider contract against the OpenAI-format fake."""

from __future__ import annotations

from scillm_core.testing.contract import ProviderContract


class OpenAICompatContract(ProviderContract):
    plugin = "openai-compat"


class TestOpenAI(OpenAICompatContract):
    provider, model, upstream_model = "openai", "gpt-4o-mini", "gpt-4o-mini"
    key_env, base_env = "OPENAI_API_KEY", "OPENAI_API_BASE"
    embeddings_model = embeddings_upstream_model = "text-embedding-3-small"


class TestChutes(OpenAICompatContract):
    provider, model, upstream_model = "chutes", "deepseek-ai/DeepSeek-V3.2-TEE", "deepseek-ai/DeepSeek-V3.2-TEE"
    key_env, base_env = "CHUTES_API_KEY", "CHUTES_API_BASE"


class TestDeepSeek(OpenAICompatContract):
    provider, model, upstream_model = "deepseek", "deepseek/deepseek-chat", "deepseek-chat"
    key_env, base_env = "DEEPSEEK_API", "DEEPSEEK_API_BASE"

    def test_image_input(self, client, fake):  # text-only upstream: refused with the part's path, not dropped
        import openai
        import pytest

        from scillm_core.testing.contract import TINY_PNG_URL

        sent = len(fake.requests)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": [
                {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": TINY_PNG_URL}}]}])
        assert "$.messages[0].content[1]" in caught.value.message
        assert len(fake.requests) == sent


class TestGLM(OpenAICompatContract):
    provider, model, upstream_model = "glm", "text-glm", "glm-5.1"
    key_env, base_env = "GLM_API_Key", "GLM_API_BASE"
    embeddings_model, embeddings_upstream_model = "glm/embedding-3", "embedding-3"


class TestMoonshot(OpenAICompatContract):
    provider, model, upstream_model = "moonshot", "moonshot/kimi-k2.6", "kimi-k2.6"
    key_env, base_env = "MOONSHOT_API_KEY", "MOONSHOT_API_BASE"
