"""Providers that speak OpenAI chat completions: OpenAI, Chutes, DeepSeek, GLM (Z.ai), Moonshot, and servers of
your own declared as ``[providers.NAME] kind = "openai-compatible"`` (vLLM, SGLang, llama.cpp, LM Studio,
OpenRouter, a company proxy).

OpenCode Go's chat models use :class:`OpenAICompatProvider` too, from the ``scillm-opencode-go`` plugin."""

from __future__ import annotations

from collections.abc import Mapping

from scillm_core import ConfigError, ProviderRegistry, Runtime, hookimpl
from scillm_core.config import ProviderSettings
from scillm_core.models import REASONING_CONTENT
from scillm_openai_compat.provider import CompatSpec, OpenAICompatProvider, conversation_id, parse_error_body

__all__ = ["KIND", "SPECS", "CompatSpec", "OpenAICompatProvider", "conversation_id", "declared_spec",
           "parse_error_body"]

#: The ``kind`` of a ``[providers.NAME]`` table this plugin turns into a provider.
KIND = "openai-compatible"
DECLARED_RULE_ORDER = 10  # an explicit model list is the most specific claim there is


def _openai_name(model: str) -> bool:
    return model.startswith(("gpt-", "o1", "o3", "o4", "chatgpt-", "text-embedding-"))


def _reasoning_model(model: str) -> bool:
    return model.startswith(("o1", "o3", "o4", "gpt-5"))


SPECS: tuple[CompatSpec, ...] = (
    CompatSpec(name="openai", family="openai", key_env=("OPENAI_API_KEY",), base_env="OPENAI_API_BASE",
               default_base="https://api.openai.com/v1", prefixes=("openai/",), rule=_openai_name, rule_order=30,
               models=("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-5", "gpt-5-mini", "o3", "o4-mini",
                       "text-embedding-3-small", "text-embedding-3-large"),
               completion_tokens_models=_reasoning_model, responses_env="OPENAI_API_RESPONSES",
               capabilities=frozenset({"streaming", "tools", "images", "pdf", "json_mode", "json_schema",
                                       "embeddings"})),
    CompatSpec(name="deepseek", family="openai", key_env=("DEEPSEEK_API_KEY", "DEEPSEEK_API"),
               base_env="DEEPSEEK_API_BASE", default_base="https://api.deepseek.com/v1", prefixes=("deepseek/",),
               aliases={"text-deepseek": "deepseek-chat"},
               models=("deepseek/deepseek-chat", "deepseek/deepseek-reasoner"),
               string_content=True, capabilities=frozenset({"streaming", "tools", "json_mode", REASONING_CONTENT})),
    CompatSpec(name="glm", family="openai", key_env=("GLM_API_KEY", "GLM_API_Key"), base_env="GLM_API_BASE",
               default_base="https://api.z.ai/api/paas/v4", prefixes=("glm/",), aliases={"text-glm": "glm-5.1"},
               models=("glm/glm-5.1", "glm/glm-4.6", "glm/glm-4.5v", "glm/embedding-3"),
               capabilities=frozenset({"streaming", "tools", "images", "json_mode", "embeddings", REASONING_CONTENT})),
    CompatSpec(name="moonshot", family="openai", key_env=("MOONSHOT_API_KEY",), base_env="MOONSHOT_API_BASE",
               default_base="https://api.moonshot.ai/v1", prefixes=("moonshot/",),
               aliases={"moonshot-text": "kimi-k2.6"}, models=("moonshot/kimi-k2.6", "moonshot/kimi-k2-0905-preview"),
               max_temperature=1.0, capabilities=frozenset({"streaming", "tools", "images", "json_mode",
                                                            REASONING_CONTENT})),
    # Chutes takes any Org/Model name no prefix claimed, so its rule runs last.
    CompatSpec(name="chutes", family="openai", key_env=("CHUTES_API_KEY", "CHUTES_API_TOKEN"),
               base_env="CHUTES_API_BASE", default_base="https://llm.chutes.ai/v1", prefixes=("chutes/",),
               rule=lambda model: "/" in model, rule_order=900,
               models=("deepseek-ai/DeepSeek-V3.2-TEE", "moonshotai/Kimi-K2.6-TEE", "zai-org/GLM-5.1-TEE"),
               capabilities=frozenset({"streaming", "tools", "images", "json_mode", REASONING_CONTENT})),
)


def declared_spec(name: str, settings: ProviderSettings) -> CompatSpec:
    """The spec of a server declared in ``[providers.NAME]`` (``kind = "openai-compatible"``)."""
    where = f"[providers.{name}]"
    if any(spec.name == name for spec in SPECS):
        raise ConfigError(f"{where} declares a server under the name of the built-in provider {name!r}; give it a "
                          f"name of its own (e.g. {name}-local) and route to it by that name's prefix")
    if not settings.base_url:
        raise ConfigError(f"{where}: base_url is required for a provider of your own (the URL before "
                          f"/chat/completions, e.g. http://127.0.0.1:8000/v1) at providers.{name}.base_url")
    if not settings.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}: base_url must start with http:// or https://, not {settings.base_url!r} at "
                          f"providers.{name}.base_url")
    prefix = f"{name}/" if settings.prefix is None else settings.prefix
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    if not prefix and not settings.models:
        raise ConfigError(f"{where}: with prefix = \"\" give models = [...] (the names it serves), or nothing routes "
                          f"to it")
    served = frozenset(settings.models)
    # reasoning text goes back as the thinking models such servers run want it (others ignore the key)
    capabilities = {"streaming", "tools", "images", "json_mode", "json_schema", REASONING_CONTENT}
    if settings.embeddings is not False:
        capabilities.add("embeddings")
    return CompatSpec(name=name, family="openai", key_env=(settings.key_env,) if settings.key_env else (),
                      base_env="", default_base=settings.base_url, prefixes=(prefix,) if prefix else (),
                      rule=served.__contains__ if served else None, rule_order=DECLARED_RULE_ORDER,
                      models=settings.models, capabilities=frozenset(capabilities), declared=True)


@hookimpl
def scillm_register_providers(providers: ProviderRegistry, runtime: Runtime) -> None:
    for spec in SPECS:
        providers.add(OpenAICompatProvider(spec, runtime.env, runtime.config.provider_settings(spec.name)))
    providers.kinds.add(KIND)
    tables: Mapping[str, ProviderSettings] = runtime.config.sections.get("providers") or {}
    for name, settings in tables.items():
        if settings.kind == KIND:
            providers.add(OpenAICompatProvider(declared_spec(name, settings), runtime.env, settings))
