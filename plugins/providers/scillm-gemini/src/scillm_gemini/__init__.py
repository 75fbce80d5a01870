"""Google Gemini (AI Studio) through its native ``generateContent`` API."""

from __future__ import annotations

from scillm_core import ProviderRegistry, Runtime, hookimpl
from scillm_gemini.provider import GeminiProvider, api_root, error_from_body
from scillm_gemini.translate import decode_call_id, encode_call_id

__all__ = ["GeminiProvider", "api_root", "decode_call_id", "encode_call_id", "error_from_body"]


@hookimpl
def scillm_register_providers(providers: ProviderRegistry, runtime: Runtime) -> None:
    providers.add(GeminiProvider(runtime.env, runtime.config.provider_settings("gemini")))
