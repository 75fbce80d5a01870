"""Request fields shared by serve runs and transport nodes: the agent profile (never a chat model), the model, the
timeout, and OpenCode permission rules."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from scillm_exec import check_fields

from scillm_core import errors
from scillm_core.pipeline import check_model

if TYPE_CHECKING:
    from scillm_core import Runtime
    from scillm_opencode.serve import Server

__all__ = ["bad", "check_agent_shape", "check_object", "check_rules", "resolve_agent", "resolve_model", "run_fields",
           "seconds", "text"]

AGENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ACTIONS = ("allow", "ask", "deny")


def bad(message: str, where: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(f"{message} @ {where}", param=where)


def check_object(body: Any, known: set[str], where: str = "$") -> dict[str, Any]:
    """A JSON object with no field outside ``known``."""
    if not isinstance(body, dict):
        raise bad("expected a JSON object", where)
    check_fields(body, known, where)
    return body


def run_fields(body: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """A request's optional ``run_id`` and ``scillm_metadata`` (echoed, never sent to a model)."""
    from scillm_opencode.records import RUN_ID

    run_id = body.get("run_id")
    if run_id is not None and (not isinstance(run_id, str) or not RUN_ID.match(run_id)):
        raise bad(f"run_id must match {RUN_ID.pattern}", "$.run_id")
    metadata = body.get("scillm_metadata", {})
    if not isinstance(metadata, dict):
        raise bad("scillm_metadata must be an object", "$.scillm_metadata")
    return run_id, metadata


def _chat_model(agent: str, where: str) -> errors.InvalidRequest:
    return bad(f"agent {agent!r} is a chat model, not an OpenCode agent profile: put it in \"model\" and name a "
               f"profile in \"agent\" (build, plan, ...)", where)


def check_agent_shape(agent: Any, where: str) -> str:
    """Cheap checks before any server is asked: a string, and not a model name such as ``opencode-go/kimi-k2.6``."""
    if not isinstance(agent, str) or not agent:
        raise bad("agent must be a non-empty string naming an OpenCode agent profile (build, plan, ...)", where)
    if "/" in agent or ":" in agent:
        raise _chat_model(agent, where)
    if not AGENT.match(agent):
        raise bad(f"agent {agent!r} is not a valid profile name ({AGENT.pattern})", where)
    return agent


async def resolve_agent(server: Server, agent: str, runtime: Runtime, where: str) -> str:
    """The agent if the server has it (its list is fetched once per server start, again only on a miss)."""
    profiles = await server.profiles()
    if agent not in profiles:
        profiles = await server.profiles(refresh=True)
    if agent in profiles:
        return agent
    try:
        runtime.route(agent)
    except errors.ScillmError:
        has = ", ".join(profiles[:50]) + (f" and {len(profiles) - 50} more" if len(profiles) > 50 else "")
        raise bad(f"unknown agent {agent!r}; the OpenCode server has: {has}", where) from None
    raise _chat_model(agent, where)


async def resolve_model(server: Server, model: str | None, where: str) -> dict[str, str] | None:
    """``{providerID, modelID}`` for a prompt. A name the server's ``scillm`` provider lists is taken as a scillm
    model (``deepseek/deepseek-chat``), else ``provider/model`` as the server knows it."""
    if model is None:
        return None
    if not isinstance(model, str) or not model:
        raise bad("model must be a non-empty string", where)
    check_model(model, where)  # named in the answer and the run's record: a 1 MB name is a 400, not echoed
    models = await server.models()
    if model in models.get("scillm", []):
        return {"providerID": "scillm", "modelID": model}
    provider, _, name = model.partition("/")
    if name and name in models.get(provider, []):
        return {"providerID": provider, "modelID": name}
    known = [f"{p}/{m}" if p != "scillm" else m for p, names in models.items() for m in names]
    offers = ", ".join(known[:50]) + (f" and {len(known) - 50} more" if len(known) > 50 else "")
    raise bad(f"model {model!r} is not offered by the OpenCode server (it offers: {offers or 'none'}; "
              "list more in opencode.models)", where)


def seconds(value: Any, where: str, *, default: float, limit: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise bad("must be a positive number of seconds", where)
    if value > limit:
        raise bad(f"is {value}; the limit is {limit:g}", where)
    return float(value)


def text(value: Any, where: str, *, required: bool = False, limit: int = 1 << 20) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise bad("must be a non-empty string", where)
    if len(value) > limit:
        raise bad(f"is {len(value)} characters; the limit is {limit}", where)
    return value


def check_rules(value: Any, where: str) -> list[dict[str, str]]:
    """OpenCode session permission rules ``[{permission, pattern, action}]`` (``ask`` makes the session wait for an
    answer through the permission endpoint)."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > 100:
        raise bad("permission must be an array of {permission, pattern, action} rules (at most 100)", where)
    rules = []
    for i, rule in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(rule, dict) or set(rule) - {"permission", "pattern", "action"}:
            raise bad("a rule is {permission, pattern, action}", at)
        permission, pattern, action = rule.get("permission"), rule.get("pattern", "*"), rule.get("action")
        if not isinstance(permission, str) or not re.match(r"^[a-z_*]{1,40}$", permission):
            raise bad(f"permission must name an OpenCode permission (edit, bash, read, ...), got {permission!r}",
                      f"{at}.permission")
        if not isinstance(pattern, str) or not pattern or len(pattern) > 500:
            raise bad("pattern must be a non-empty string", f"{at}.pattern")
        if action not in ACTIONS:
            raise bad(f"action must be one of {', '.join(ACTIONS)}, got {action!r}", f"{at}.action")
        rules.append({"permission": permission, "pattern": pattern, "action": action})
    return rules
