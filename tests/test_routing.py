"""Routing order (SPEC.md): alias (scillm.toml's, then built-in) -> configured group -> explicit prefix -> name
rules; unknown names get close matches."""

from __future__ import annotations

import pytest

from scillm_core import ChatRequest, Message, errors
from scillm_core.testing import make_app

ENV = {"OPENAI_API_KEY": "k", "DEEPSEEK_API_KEY": "k", "CHUTES_API_KEY": "k", "GLM_API_KEY": "k"}


def route(model: str, config=None, env=ENV):
    app = make_app(env=env, config=config or {})
    runtime = app.runtime
    request = ChatRequest(model=model, messages=(Message(role="user", content="x"),))
    return runtime.hooks.route_model(request, runtime)


@pytest.mark.parametrize(("model", "provider", "upstream"), [
    ("gpt-4o-mini", "openai", "gpt-4o-mini"),
    ("o3-mini", "openai", "o3-mini"),
    ("openai/gpt-5", "openai", "gpt-5"),
    ("deepseek/deepseek-chat", "deepseek", "deepseek-chat"),
    ("text-deepseek", "deepseek", "deepseek-chat"),
    ("text-glm", "glm", "glm-5.1"),
    ("moonshot-text", "moonshot", "kimi-k2.6"),
    ("opencode-go/kimi-k2.6", "opencode-go", "kimi-k2.6"),
    ("deepseek-ai/DeepSeek-V3.2-TEE", "chutes", "deepseek-ai/DeepSeek-V3.2-TEE"),
    ("chutes/Qwen/Qwen3", "chutes", "Qwen/Qwen3"),
])
def test_builtin_routes(model, provider, upstream):
    r = route(model)
    assert (r.provider, r.model, r.requested) == (provider, upstream, model)


def test_alias_wins_over_everything_then_group_then_prefix():
    config = {"aliases": {"gpt-4o": "deepseek/deepseek-chat", "team": "smart"},
              "groups": {"smart": {"models": ["glm/glm-5.1", "deepseek/deepseek-chat"]},
                         "deepseek/deepseek-chat": {"models": ["glm/glm-4.6"]}}}
    r = route("gpt-4o", config)  # alias -> "deepseek/deepseek-chat", which is itself a configured group
    assert (r.provider, r.model, r.group) == ("glm", "glm-4.6", "deepseek/deepseek-chat")
    team = route("team", config)
    assert (team.provider, team.model, team.group, team.requested) == ("glm", "glm-5.1", "smart", "team")
    assert [(f.provider, f.model) for f in team.fallbacks] == [("glm", "glm-4.6")]


def test_a_name_that_is_both_an_alias_and_a_group_routes_as_the_alias():
    config = {"aliases": {"team": "moonshot/kimi-k2.6"},
              "groups": {"team": {"models": ["glm/glm-5.1"]}, "text-deepseek": {"models": ["glm/glm-5.1"]}}}
    team = route("team", config)  # a configured alias beats a configured group of the same name
    assert (team.provider, team.model, team.group) == ("moonshot", "kimi-k2.6", None)
    builtin = route("text-deepseek", config)  # so does a provider's built-in alias
    assert (builtin.provider, builtin.model, builtin.group) == ("deepseek", "deepseek-chat", None)
    aimed = route("text-deepseek", {**config, "aliases": {"text-deepseek": "mine"},
                                     "groups": {"mine": {"models": ["glm/glm-5.1"]}}})
    assert (aimed.provider, aimed.group) == ("glm", "mine")  # the way to put a group behind that name


def test_doctor_names_a_group_that_an_alias_hides():
    from scillm_core.builtin.routing import shadowed_groups

    app = make_app(env=ENV, config={"groups": {"text-glm": {"models": ["deepseek/deepseek-chat"]},
                                               "fine": {"models": ["glm/glm-5.1"]}}})
    assert shadowed_groups(app.runtime) == {"text-glm": "built-in alias of glm -> glm-5.1"}


def test_group_fallbacks_keep_order():
    r = route("g", {"groups": {"g": {"models": ["deepseek/deepseek-chat", "glm/glm-5.1", "gpt-4o"]}}})
    assert [f.deployment for f in r.fallbacks] == ["glm/glm-5.1", "openai/gpt-4o"]


def test_alias_loop_is_a_clear_400():
    with pytest.raises(errors.InvalidRequest, match="alias loop"):
        route("a", {"aliases": {"a": "b", "b": "a"}})


def test_unknown_model_is_404_with_close_matches():
    with pytest.raises(errors.ModelNotFound) as caught:
        route("text-deepsek")
    assert caught.value.status == 404
    assert "text-deepseek" in caught.value.message


def test_unconfigured_claimant_still_routes_so_the_error_names_the_variable():
    r = route("gpt-4o", env={})
    assert r.provider == "openai"
