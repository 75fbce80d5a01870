"""TODO: describe the plugin. Every hook is plain ``def``; async work is a returned thunk."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from attrs import frozen

from scillm_core import CallContext, ChatRequest, Route, Runtime, hookimpl


@frozen(kw_only=True)
class MyPluginConfig:
    """The ``[myplugin]`` table of scillm.toml; unknown keys and wrong types stop startup."""

    enabled: bool = True


@hookimpl
def scillm_config_sections() -> dict[str, type]:
    return {"myplugin": MyPluginConfig}


@hookimpl(wrapper=True)
def call_provider(request: ChatRequest, route: Route, ctx: CallContext) -> Generator[None, Any, Any]:
    call = yield  # the inner thunk: calling it performs the upstream call

    async def observed() -> Any:
        result = await call()
        ctx.notes["myplugin"] = "saw the call"
        return result

    return observed


@hookimpl
def scillm_health(runtime: Runtime) -> dict[str, Any]:
    return {"myplugin": {"enabled": True, "fails": "open"}}
