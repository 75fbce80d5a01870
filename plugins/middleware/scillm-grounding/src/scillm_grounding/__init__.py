"""Grounding middleware (``postprocess_json``): a chat request with ``source`` (text or list of texts) gets its
answer scored against the source (method: :mod:`scillm_grounding.scorer`), is re-asked with the ungrounded
sentences while the score is below ``grounding_threshold`` (default 0.7, up to ``grounding_retries``, default 2),
and the response reports, at its top level:

- ``grounding_score`` (0-1, ``null`` when it could not score), ``grounding_verified`` (score >= threshold),
  ``grounding_attempts`` (answers generated), ``grounding_ungrounded`` (sentences below the threshold),
  ``grounding_threshold``, and ``grounding_reason`` when it could not score (empty answer or source, a tool-call
  answer, a scorer failure). It never reports verified without a score.

Of several attempts the best-scoring answer is returned (the latest on ties). Headers
``x-scillm-grounding-score`` / ``-verified`` are put in ``ctx.notes["headers"]`` for surfaces that send them.
Streaming requests with ``source`` are refused (400): a stream cannot be scored before it is sent.
Fails open: a scorer failure still serves the answer, marked ``grounding_verified: false`` with the reason.
Switch it off with ``[grounding] enabled = false``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from attrs import frozen

from scillm_core import CallContext, ChatRequest, ChatResponse, Message, Runtime, errors, hookimpl
from scillm_grounding.scorer import Report, score

__all__ = ["GroundingConfig"]

MAX_RETRIES = 5
THREAD_CHARS = 50_000           # score bigger inputs in a worker thread
SOURCE_IN_CORRECTION = 20_000   # characters of source quoted in a correction message


@frozen(kw_only=True)
class GroundingConfig:
    """The ``[grounding]`` table: defaults for requests that do not set their own."""

    enabled: bool = True
    threshold: float = 0.7
    retries: int = 2
    max_source_chars: int = 2_000_000


def _config(runtime: Runtime) -> GroundingConfig:
    return runtime.config.sections.get("grounding") or GroundingConfig()  # type: ignore[no-any-return]


@hookimpl
def scillm_config_sections() -> Mapping[str, type]:
    return {"grounding": GroundingConfig}


@hookimpl
def scillm_health(runtime: Runtime) -> dict[str, Any]:
    cfg = _config(runtime)
    return {"grounding": {"enabled": cfg.enabled, "fails": "open",
                          "on_failure": "answer served with grounding_verified=false and grounding_reason",
                          "threshold": cfg.threshold, "retries": cfg.retries,
                          "method": "rapidfuzz token_set_ratio / content-word coverage + number and name check"}}


@hookimpl(wrapper=True)
def postprocess_json(request: ChatRequest, ctx: CallContext) -> Any:
    call = yield
    cfg = _config(ctx.runtime)
    if not cfg.enabled or not isinstance(request, ChatRequest) or "source" not in request.scillm:
        return call

    async def grounded() -> Any:
        sources, threshold, retries = _params(request, cfg)
        result = await call()
        if not isinstance(result, ChatResponse):  # defensive: streams were refused in _params
            return result
        attempts = 1
        best: tuple[ChatResponse, Report] | None = None
        current = result
        failure: str | None = None
        while True:
            report = await _score(current, sources, threshold, cfg)
            if best is None or best[1].score is None or (report.score or 0) >= (best[1].score or 0):
                best = (current, report)
            if report.score is None or report.verified(threshold) or attempts > retries:
                break
            try:
                retry = await ctx.complete(_correction(request, current, report, sources))
            except errors.ScillmError as exc:  # fail open: keep the best answer so far, say why it stopped
                failure = f"the re-ask failed ({exc.code}); returning the best answer so far"
                break
            if not isinstance(retry, ChatResponse):
                break
            current = retry
            attempts += 1
        response, report = best
        if failure and not report.reason:
            report = attrs.evolve(report, reason=failure)
        fields: dict[str, Any] = {"grounding_score": report.score, "grounding_verified": report.verified(threshold),
                                  "grounding_attempts": attempts, "grounding_threshold": threshold,
                                  "grounding_ungrounded": list(report.ungrounded)}
        if report.reason:
            fields["grounding_reason"] = report.reason
        headers = ctx.notes.setdefault("headers", {})
        headers["x-scillm-grounding-verified"] = "true" if fields["grounding_verified"] else "false"
        headers["x-scillm-grounding-score"] = "" if report.score is None else f"{report.score:.3f}"
        return attrs.evolve(response, extra={**response.extra, **fields})

    return grounded


def _params(request: ChatRequest, cfg: GroundingConfig) -> tuple[list[str], float, int]:
    """Validate the request's grounding fields (400 naming the field on bad input)."""
    raw = request.scillm.get("source")
    if isinstance(raw, str):
        sources = [raw]
    elif isinstance(raw, list) and all(isinstance(s, str) for s in raw):
        sources = list(raw)
    else:
        raise errors.InvalidRequest("source must be a string or an array of strings @ $.source", param="$.source",
                                    code="invalid_source")
    if sum(len(s) for s in sources) > cfg.max_source_chars:
        raise errors.PayloadTooLarge(f"source is longer than {cfg.max_source_chars} characters @ $.source",
                                     param="$.source", code="source_too_large")
    threshold = request.scillm.get("grounding_threshold", cfg.threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
        raise errors.InvalidRequest("grounding_threshold must be a number from 0 to 1 @ $.grounding_threshold",
                                    param="$.grounding_threshold")
    retries = request.scillm.get("grounding_retries", cfg.retries)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise errors.InvalidRequest(f"grounding_retries must be an integer from 0 to {MAX_RETRIES} "
                                    f"@ $.grounding_retries", param="$.grounding_retries")
    if request.stream:
        raise errors.InvalidRequest("grounding (source) needs a non-streaming request: the answer is scored before "
                                    "it is sent; set stream to false @ $.stream", param="$.stream",
                                    code="grounding_needs_non_streaming")
    return sources, float(threshold), retries


async def _score(response: ChatResponse, sources: Sequence[str], threshold: float, cfg: GroundingConfig) -> Report:
    message = response.choices[0].message if response.choices else None
    if message is None:
        return Report(score=None, reason="the response has no choices")
    answer = message.text
    if not answer.strip() and message.tool_calls:
        return Report(score=None, reason="the answer is a tool call, not text")
    try:
        if len(answer) + sum(len(s) for s in sources) > THREAD_CHARS:
            return await asyncio.to_thread(score, answer, sources, threshold)
        return score(answer, sources, threshold)
    except Exception as exc:
        return Report(score=None, reason=f"the scorer failed ({type(exc).__name__})")


def _correction(request: ChatRequest, response: ChatResponse, report: Report, sources: Sequence[str]) -> ChatRequest:
    listed = "\n".join(f"- {sentence}" for sentence in report.ungrounded) or "- (the answer as a whole)"
    text = ("Some statements in your answer are not supported by the source:\n" + listed +
            "\nRewrite your whole answer using only facts stated in the source; leave out anything the source does "
            "not say.")
    conversation = "\n".join(m.text for m in request.messages)
    source = "\n\n".join(sources)
    if source.strip() and source.strip()[:200] not in conversation:
        quoted = source if len(source) <= SOURCE_IN_CORRECTION else source[:SOURCE_IN_CORRECTION] + "\n[...]"
        text += f"\n\nSource:\n<<<\n{quoted}\n>>>"
    answer = Message(role="assistant", content=response.text)
    return attrs.evolve(request, messages=(*request.messages, answer, Message(role="user", content=text)))
