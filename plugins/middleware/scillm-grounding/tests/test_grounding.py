"""Grounding end to end: official openai client -> scillm -> FakeOpenAI."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from scillm_grounding.scorer import score

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, make_app

KEY = "sk-grounding-secret-0123456789abcdef"
MODEL = "gpt-4o-mini"
SOURCE = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
          "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. The tower is "
          "330 metres tall, about the same height as an 81-storey building. It was the tallest man-made structure in "
          "the world until the Chrysler Building in New York City was finished in 1930.")
GROUNDED = ("The Eiffel Tower stands on the Champ de Mars in Paris. Gustave Eiffel's company designed and built it "
            "from 1887 to 1889. The tower is 330 metres tall.")
HALLUCINATED = ("The Eiffel Tower was painted gold by Napoleon in 1750. The tower is 450 metres tall. "
                "Bananas are an excellent source of potassium for athletes.")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake  # type: ignore[misc]


def env_for(fake: FakeOpenAI) -> dict[str, str]:
    return {"OPENAI_API_KEY": KEY, "OPENAI_API_BASE": fake.base_url}


@pytest.fixture(scope="module")
def server(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    with ServerThread(make_app(env=env_for(fake), data_dir=tmp_path_factory.mktemp("grounding"))) as server:
        yield server


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)


def ask(client: openai.OpenAI, question: str, **extra: Any) -> tuple[Any, dict[str, Any]]:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": question}], extra_body=extra)
    completion = raw.parse()
    return completion, {"headers": raw.headers, **(completion.model_extra or {})}


def test_grounded_answer_verifies_first_time(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say(GROUNDED))
    sent = len(fake.requests)
    completion, extra = ask(client, "Tell me about the Eiffel Tower (1).", source=SOURCE)
    assert completion.choices[0].message.content == GROUNDED
    assert extra["grounding_verified"] is True and extra["grounding_attempts"] == 1
    assert 0.7 <= extra["grounding_score"] <= 1 and extra["grounding_ungrounded"] == []
    assert len(fake.requests) == sent + 1
    upstream = fake.last.body
    assert "source" not in upstream and SOURCE not in str(upstream)  # scillm's own field never goes upstream
    assert extra["headers"]["x-scillm-grounding-verified"] == "true"
    assert float(extra["headers"]["x-scillm-grounding-score"]) == pytest.approx(extra["grounding_score"], abs=1e-3)


def test_ungrounded_answer_is_re_asked_and_the_second_verifies(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say(HALLUCINATED), Reply.say(GROUNDED))
    sent = len(fake.requests)
    completion, extra = ask(client, "Tell me about the Eiffel Tower (2).", source=[SOURCE])
    assert completion.choices[0].message.content == GROUNDED
    assert extra["grounding_verified"] is True and extra["grounding_attempts"] == 2
    assert len(fake.requests) == sent + 2
    retry = fake.last.body["messages"]
    assert [m["role"] for m in retry] == ["user", "assistant", "user"]
    assert retry[1]["content"] == HALLUCINATED
    correction = retry[2]["content"]
    assert "- The tower is 450 metres tall." in correction and "Napoleon" in correction
    assert SOURCE in correction  # the model had not seen the source: the correction quotes it


def test_exhausted_retries_report_unverified_with_the_ungrounded_sentences(client: openai.OpenAI,
                                                                          fake: FakeOpenAI) -> None:
    fake.script(Reply.say(HALLUCINATED), Reply.say(HALLUCINATED), Reply.say(HALLUCINATED))
    sent = len(fake.requests)
    completion, extra = ask(client, f"Using this text: {SOURCE} -- describe the tower (3).", source=SOURCE)
    assert len(fake.requests) == sent + 3  # the first answer and grounding_retries=2 re-asks
    assert completion.choices[0].message.content == HALLUCINATED
    assert extra["grounding_verified"] is False and extra["grounding_attempts"] == 3
    assert extra["grounding_score"] < 0.7
    assert "The tower is 450 metres tall." in extra["grounding_ungrounded"]
    assert any("Bananas" in s for s in extra["grounding_ungrounded"])
    assert SOURCE not in fake.last.body["messages"][-1]["content"]  # already in the conversation: not repeated
    assert extra["headers"]["x-scillm-grounding-verified"] == "false"


def test_a_failed_re_ask_keeps_the_first_answer_unverified(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say(HALLUCINATED), Reply.fail(400, "context too long", code="context_length_exceeded"))
    completion, extra = ask(client, "Tower facts (6)?", source=SOURCE)
    assert completion.choices[0].message.content == HALLUCINATED
    assert extra["grounding_verified"] is False and extra["grounding_attempts"] == 1
    assert "re-ask failed" in extra["grounding_reason"] and extra["grounding_ungrounded"]


def test_threshold_and_retries_per_request(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say(HALLUCINATED))
    sent = len(fake.requests)
    _, extra = ask(client, "Tower facts (4)?", source=SOURCE, grounding_retries=0)
    assert len(fake.requests) == sent + 1 and extra["grounding_attempts"] == 1
    assert extra["grounding_verified"] is False
    fake.script(Reply.say(HALLUCINATED))
    _, extra = ask(client, "Tower facts (5)?", source=SOURCE, grounding_threshold=0.0)
    assert extra["grounding_verified"] is True and extra["grounding_threshold"] == 0.0


@pytest.mark.parametrize("source, answer, reason", [("", GROUNDED, "the source is empty"),
                                                    ([], GROUNDED, "the source is empty"),
                                                    (SOURCE, "", "the answer is empty")])
def test_unscorable_never_passes_silently(client: openai.OpenAI, fake: FakeOpenAI, source: Any, answer: str,
                                          reason: str) -> None:
    fake.script(Reply.say(answer))
    sent = len(fake.requests)
    _, extra = ask(client, f"Unscorable {reason} {len(str(source))}?", source=source)
    assert extra["grounding_verified"] is False and extra["grounding_score"] is None
    assert extra["grounding_reason"] == reason and extra["grounding_attempts"] == 1
    assert len(fake.requests) == sent + 1  # nothing to correct: no re-ask


def test_bad_grounding_fields_are_400(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    sent = len(fake.requests)
    for extra, param in (({"source": 5}, "$.source"), ({"source": ["ok", 3]}, "$.source"),
                         ({"source": SOURCE, "grounding_threshold": 2}, "$.grounding_threshold"),
                         ({"source": SOURCE, "grounding_retries": -1}, "$.grounding_retries")):
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, "bad", **extra)
        assert caught.value.response.json()["error"]["param"] == param
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True,
                                       extra_body={"source": SOURCE})
    assert caught.value.response.json()["error"]["code"] == "grounding_needs_non_streaming"
    assert len(fake.requests) == sent


def test_no_source_no_grounding_fields(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("plain"))
    _, extra = ask(client, "plain question")
    assert not any(key.startswith("grounding") for key in extra)
    assert "x-scillm-grounding-verified" not in extra["headers"]


def test_health_and_switch(server: ServerThread, fake: FakeOpenAI, tmp_path: Any) -> None:
    auth = {"authorization": f"Bearer {DEV_KEY}"}
    state = httpx.get(server.url + "/v1/scillm/health", headers=auth).json()["middleware"]["grounding"]
    assert state["enabled"] is True and state["fails"] == "open" and state["threshold"] == 0.7
    app = make_app(env=env_for(fake), data_dir=tmp_path, config={"grounding": {"enabled": False}})
    with ServerThread(app) as off:
        client = openai.OpenAI(base_url=off.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
        fake.script(Reply.say(HALLUCINATED))
        _, extra = ask(client, "switched off", source=SOURCE)
        assert "grounding_verified" not in extra
        assert httpx.get(off.url + "/v1/scillm/health", headers=auth).json()["middleware"]["grounding"][
            "enabled"] is False


def test_scorer_catches_wrong_numbers_and_invented_names() -> None:
    assert score("The tower is 330 metres tall.", [SOURCE], 0.7).ungrounded == ()
    assert score("The tower is 1,000 metres tall.", [SOURCE], 0.7).ungrounded == ("The tower is 1,000 metres tall.",)
    report = score("It was designed by Leonardo da Vinci.", [SOURCE], 0.7)
    assert report.score is not None and report.score < 0.5
    assert score("Sure.", [SOURCE], 0.7).reason == "the answer has no checkable statement"
