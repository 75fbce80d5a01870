"""The provider contract: what every provider plugin must do, checked through the official ``openai`` client.

Subclass :class:`ProviderContract` in your plugin's tests and set the class attributes; pytest collects the
inherited tests (name the subclass ``Test...``). Override :meth:`base_url` when the base URL your provider expects
differs from ``fake.url`` + its base path, and :meth:`check_upstream` to assert provider-specific request details
(auth headers, translated body). A provider with embeddings sets ``embeddings_model`` (and overrides
:meth:`check_embeddings_upstream` for a non-OpenAI wire); without it the contract checks that embeddings are
refused with a 400 that never reaches the upstream.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import pytest

from scillm_core.testing import (
    DEV_KEY,
    FakeOpenAI,
    FakeUpstream,
    RecordedRequest,
    Reply,
    ServerThread,
    fake_vector,
    make_app,
)

__all__ = ["TINY_PNG_B64", "TINY_PNG_URL", "WEATHER_TOOL", "ProviderContract"]

# A 1x1 PNG, as a data URL in the OpenAI image_url form.
TINY_PNG_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
TINY_PNG_URL = "data:image/png;base64," + TINY_PNG_B64

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class ProviderContract:
    plugin: ClassVar[str]                   # the provider plugin's entry-point name, e.g. "openai-compat"
    provider: ClassVar[str]                 # registry name, e.g. "deepseek"
    model: ClassVar[str]                    # what a client sends, e.g. "deepseek/deepseek-chat"
    upstream_model: ClassVar[str]           # what the fake must receive, e.g. "deepseek-chat"
    key_env: ClassVar[str | None]           # env var with the key (None for keyless providers)
    base_env: ClassVar[str]                 # env var with the base URL
    key: ClassVar[str] = "sk-contract-secret-0123456789abcdef"
    fake_class: ClassVar[type[FakeUpstream]] = FakeOpenAI
    extra_env: ClassVar[dict[str, str]] = {}
    embeddings_model: ClassVar[str | None] = None           # what a client sends for embeddings (None: has none)
    embeddings_upstream_model: ClassVar[str | None] = None  # what the fake must receive

    # -- hooks for subclasses ----------------------------------------------------------------------------------

    def base_url(self, fake: Any) -> str:
        return str(getattr(fake, "base_url", fake.url))

    def env(self, fake: Any) -> dict[str, str]:
        env = {self.base_env: self.base_url(fake), **self.extra_env}
        if self.key_env:
            env[self.key_env] = self.key
        return env

    SURFACES: ClassVar[tuple[str, ...]] = ("chat", "embeddings", "auth", "ops")

    def app(self, env: dict[str, str], data_dir: Any) -> Any:
        """The provider in isolation: the chat surface, auth and this plugin, no middleware (no retries)."""
        return make_app(env=env, data_dir=data_dir, only=(*self.SURFACES, self.plugin))

    def check_upstream(self, request: RecordedRequest, *, stream: bool) -> None:
        """Provider-specific assertions on what reached the upstream; the default checks OpenAI bearer auth."""
        assert request.headers.get("authorization") == f"Bearer {self.key}"
        assert request.body["model"] == self.upstream_model

    def check_embeddings_upstream(self, request: RecordedRequest, texts: list[str]) -> None:
        """What reached the upstream for an embeddings call of ``texts``; default: OpenAI ``/embeddings``."""
        assert request.path.endswith("/embeddings")
        assert request.headers.get("authorization") == f"Bearer {self.key}"
        assert request.body["model"] == self.embeddings_upstream_model
        assert request.body["input"] in (texts, texts[0])

    def check_image(self, request: RecordedRequest) -> None:
        """Assert the image reached the upstream in its wire form; default: OpenAI ``image_url`` passthrough."""
        assert TINY_PNG_URL in str(request.body)

    # -- fixtures -----------------------------------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def fake(cls) -> Iterator[Any]:
        with cls.fake_class() as fake:
            yield fake

    @pytest.fixture(scope="class")
    @classmethod
    def server(cls, fake: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
        contract = cls()
        app = contract.app(contract.env(fake), tmp_path_factory.mktemp("contract"))
        with ServerThread(app) as server:
            yield server

    @pytest.fixture
    def client(self, server: ServerThread) -> Any:
        import openai

        return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=20)

    def _last_upstream(self, fake: Any) -> RecordedRequest:
        assert fake.requests, "the fake upstream received no request"
        return fake.requests[-1]  # type: ignore[no-any-return]

    # -- the contract -------------------------------------------------------------------------------------------

    def test_non_streaming_chat(self, client: Any, fake: Any) -> None:
        fake.script(Reply.say("Hello from upstream."))
        raw = client.chat.completions.with_raw_response.create(
            model=self.model, messages=[{"role": "user", "content": "Say hello"}],
            extra_body={"scillm_metadata": {"item_id": "contract-1"}})
        completion = raw.parse()
        assert completion.choices[0].message.content == "Hello from upstream."
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None and completion.usage.total_tokens > 0
        assert raw.headers["x-scillm-provider"] == self.provider
        assert raw.headers["x-request-id"]
        assert raw.http_response.json()["scillm_metadata"] == {"item_id": "contract-1"}
        upstream = self._last_upstream(fake)
        self.check_upstream(upstream, stream=False)
        assert upstream.headers["user-agent"].startswith("scillm/")
        assert "scillm_metadata" not in str(upstream.body)

    def test_streaming_chat(self, client: Any, fake: Any) -> None:
        fake.script(Reply.say("Streaming works fine."))
        stream = client.chat.completions.create(model=self.model, stream=True,
                                                stream_options={"include_usage": True},
                                                messages=[{"role": "user", "content": "Stream please"}])
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Streaming works fine."
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finishes == ["stop"]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        self.check_upstream(self._last_upstream(fake), stream=True)

    def test_tool_call_round_trip(self, client: Any, fake: Any) -> None:
        fake.script(Reply.call("get_weather", {"city": "Paris"}), Reply.say("It is sunny in Paris."))
        first = client.chat.completions.create(model=self.model, tools=[WEATHER_TOOL],
                                               messages=[{"role": "user", "content": "Weather in Paris?"}])
        call = first.choices[0].message.tool_calls[0]
        assert first.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "get_weather"
        assert call.function.arguments.replace(" ", "") == '{"city":"Paris"}'
        second = client.chat.completions.create(model=self.model, tools=[WEATHER_TOOL], messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}])
        assert second.choices[0].message.content == "It is sunny in Paris."
        assert "sunny" in str(self._last_upstream(fake).body)

    def test_streaming_tool_call(self, client: Any, fake: Any) -> None:
        fake.script(Reply.call("get_weather", {"city": "Oslo"}))
        chunks = list(client.chat.completions.create(model=self.model, tools=[WEATHER_TOOL], stream=True,
                                                     messages=[{"role": "user", "content": "Oslo weather?"}]))
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert calls and calls[0].function.name == "get_weather" and calls[0].id
        arguments = "".join(tc.function.arguments or "" for tc in calls if tc.function)
        assert arguments.replace(" ", "") == '{"city":"Oslo"}'

    def test_image_input(self, client: Any, fake: Any) -> None:
        fake.script(Reply.say("A single pixel."))
        completion = client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": TINY_PNG_URL}}]}])
        assert completion.choices[0].message.content == "A single pixel."
        self.check_image(self._last_upstream(fake))

    def test_upstream_rate_limit_is_429_with_retry_after(self, client: Any, fake: Any) -> None:
        import openai

        fake.script(Reply.fail(429, "Rate limit reached, slow down", type="rate_limit_error",
                               code="rate_limit_exceeded", headers={"retry-after": "7"}))
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.response.headers.get("retry-after") == "7"
        assert self.provider in caught.value.message

    def test_upstream_server_error(self, client: Any, fake: Any) -> None:
        import openai

        fake.script(Reply.fail(500, "The server had an error"))
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code in (502, 503)
        assert self.provider in caught.value.message

    def test_upstream_auth_failure_never_leaks_the_key(self, client: Any, fake: Any) -> None:
        import openai

        fake.script(Reply.fail(401, f"Incorrect API key provided: {self.key}", code="invalid_api_key"))
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": "hi"}])
        assert self.key not in caught.value.response.text
        assert self.provider in caught.value.message

    def test_an_answer_of_the_wrong_shape_is_a_502(self, client: Any, fake: Any) -> None:
        """Well-formed JSON that is not this dialect's answer (a number where a list belongs) is the upstream's
        fault: a 502 naming the provider, never scillm's 500."""
        import openai

        if fake.wrong_shape_answer is None:  # whole answers are read from a stream: its events are checked below
            fake.script(Reply.say("Hello there friend", malformed_at=(2,), garbage=fake.wrong_shape_event))
            answer = client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": "hi"}])
            assert answer.choices[0].message.content == "Hello there friend"
            return
        fake.script(Reply(raw=fake.wrong_shape_answer))
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 502, caught.value.response.text
        error = caught.value.response.json()["error"]
        assert error["code"] == "upstream_bad_response" and self.provider in error["message"]

    def test_a_stream_event_of_the_wrong_shape_is_skipped(self, client: Any, fake: Any) -> None:
        """An event the translation cannot read is skipped like one that is not JSON; the stream goes on."""
        fake.script(Reply.say("Hello there friend", malformed_at=(2,), garbage=fake.wrong_shape_event))
        stream = client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": "hi"}],
                                                stream=True)
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there friend"
        assert any(c.choices and c.choices[0].finish_reason == "stop" for c in chunks)

    def test_nonsense_token_counts_are_not_an_error(self, client: Any, fake: Any) -> None:
        """Usage is the answer's metadata: counts that are no counts (negative, past any answer) never cost the
        answer. scillm counts them 0 (``scillm_core.models.chat.token_count``); an answer passed on in its own
        dialect keeps the upstream's bytes."""
        fake.script(Reply.say("Counted.", prompt_tokens=-5, completion_tokens=1e300,  # type: ignore[arg-type]
                              cached_tokens=1e300))  # type: ignore[arg-type]
        answer = client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "Counted."
        assert answer.usage.prompt_tokens in (0, -5) and answer.usage.completion_tokens in (0, 1e300)

    def test_unconfigured_provider_names_the_variable(self, fake: Any, tmp_path: Any) -> None:
        if not self.key_env:
            self.check_keyless(fake, tmp_path)
            return
        env = {k: v for k, v in self.env(fake).items() if k != self.key_env}
        with ServerThread(self.app(env, tmp_path)) as server:
            response = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {DEV_KEY}"},
                                  json={"model": self.model, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400
        assert self.key_env in response.json()["error"]["message"]

    def check_keyless(self, fake: Any, tmp_path: Any) -> None:
        """A keyless provider (``key_env = None``, e.g. Ollama) is configured with nothing but its base URL: it is
        never reported as missing configuration, and a call with no key in the environment reaches the upstream."""
        env = {k: v for k, v in self.env(fake).items() if k == self.base_env}
        sent = len(fake.requests)
        fake.script(Reply.say("No key needed."))
        with ServerThread(self.app(env, tmp_path)) as server:
            headers = {"authorization": f"Bearer {DEV_KEY}"}
            providers = httpx.get(server.url + "/v1/scillm/providers", headers=headers)
            response = httpx.post(server.url + "/v1/chat/completions", headers=headers,
                                  json={"model": self.model, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "No key needed."
        assert len(fake.requests) == sent + 1
        assert providers.status_code == 200, providers.text  # "ops" is one of SURFACES
        row = next(p for p in providers.json()["providers"] if p["name"] == self.provider)
        assert row["configured"] is True and row["missing"] is None

    # -- embeddings -----------------------------------------------------------------------------------------------

    def test_embeddings_single_input(self, client: Any, fake: Any) -> None:
        if self.embeddings_model is None:
            return self.check_no_embeddings(client, fake)
        text = "The quick brown fox"
        raw = client.embeddings.with_raw_response.create(model=self.embeddings_model, input=text)
        result = raw.parse()  # the SDK asked for base64 (its default) and decoded it
        assert isinstance(raw.http_response.json()["data"][0]["embedding"], str)  # base64 on the wire
        assert [item.embedding for item in result.data] == [fake_vector(text)]
        assert raw.headers["x-scillm-provider"] == self.provider
        assert result.usage.prompt_tokens > 0
        self.check_embeddings_upstream(self._last_upstream(fake), [text])

    def test_embeddings_list_input(self, client: Any, fake: Any) -> None:
        if self.embeddings_model is None:
            return
        texts = ["first document", "second document, longer", "third"]
        result = client.embeddings.create(model=self.embeddings_model, input=texts, encoding_format="float")
        assert [item.index for item in result.data] == [0, 1, 2]
        assert [item.embedding for item in result.data] == [fake_vector(t) for t in texts]
        assert result.usage.total_tokens >= result.usage.prompt_tokens > 0
        self.check_embeddings_upstream(self._last_upstream(fake), texts)

    def test_embeddings_upstream_rate_limit_is_429(self, client: Any, fake: Any) -> None:
        if self.embeddings_model is None:
            return
        import openai

        fake.script(Reply.fail(429, "Rate limit reached, slow down", type="rate_limit_error",
                               code="rate_limit_exceeded", headers={"retry-after": "7"}))
        with pytest.raises(openai.RateLimitError) as caught:
            client.embeddings.create(model=self.embeddings_model, input="hi")
        assert caught.value.response.headers.get("retry-after") == "7"
        assert self.provider in caught.value.message

    def check_no_embeddings(self, client: Any, fake: Any) -> None:
        """A provider without embeddings refuses them with a 400 naming it, and sends nothing upstream."""
        import openai

        sent = len(fake.requests)
        with pytest.raises(openai.BadRequestError) as caught:
            client.embeddings.create(model=self.model, input="hi")
        assert caught.value.code == "embeddings_not_supported"
        assert self.provider in caught.value.message
        assert len(fake.requests) == sent

    def test_unreachable_upstream_is_502(self, tmp_path: Any) -> None:
        env = {**self.extra_env, self.base_env: "http://127.0.0.1:9/v1"}
        if self.key_env:
            env[self.key_env] = self.key
        with ServerThread(self.app(env, tmp_path)) as server:
            response = httpx.post(server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {DEV_KEY}"},
                                  json={"model": self.model, "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "connection_error"
