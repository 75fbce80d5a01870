"""The example plugin's own tests, written the way a plugin author would, with scillm's harness."""

from __future__ import annotations

import openai
import scillm_echo

from scillm_core.testing import DEV_KEY, HookRecorder, ServerThread, make_app


def test_echo_answers_and_streams(tmp_path):
    recorder = HookRecorder()
    app = make_app(plugins=[("echo", scillm_echo), ("recorder", recorder)], data_dir=tmp_path)
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0)
        reply = client.chat.completions.create(model="echo/any", messages=[{"role": "user", "content": "hi there"}])
        assert reply.choices[0].message.content == "hi there"
        stream = client.chat.completions.create(model="parrot", stream=True,
                                                messages=[{"role": "user", "content": "one two three"}])
        assert "".join(c.choices[0].delta.content or "" for c in stream) == "one two three"
    routes = [call["route"] for call in recorder.named("route_model")]
    assert [(r.provider, r.model) for r in routes] == [("echo", "any"), ("echo", "parrot")]
    assert len(recorder.named("call_provider")) == 2
