"""Files middleware (``preprocess_files``): image data URLs and ``file`` parts carrying PDF, ZIP, text or images.

- ``image_url`` data URLs: base64 and image type checked, size limited (http(s) URLs pass unchanged).
- PDF: routes whose providers all read PDFs (capability ``"pdf"``, fallbacks included) get the part unchanged;
  others get the pypdf-extracted text as one text part with ``--- page N ---`` markers. Encrypted (password) and
  malformed PDFs are refused.
- ZIP: one part per entry (text -> text part headed by the entry name, image -> image data URL part, PDF -> as
  above); limits on entry count, per-entry and total uncompressed size and compression ratio, checked while
  inflating in memory; entry names are never trusted and nothing touches the filesystem; nested archives and
  encrypted entries are refused.

Every refusal is a 400 (413 for sizes) whose ``code`` says why and whose ``param`` says where, e.g.
``$.messages[0].content[1]``. CPU work runs in worker threads bounded by a semaphore. Fails closed: a file it
cannot vouch for never reaches a provider. Switch it off with ``[files] enabled = false``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs
from attrs import define, field, frozen

from scillm_core import CallContext, ChatRequest, FilePart, ImagePart, Message, Runtime, errors, hookimpl
from scillm_core.models import Part
from scillm_files.extract import FileRejected, Limits, Target, handle_file, handle_image

__all__ = ["FilesConfig"]

T = TypeVar("T")
MIB = 1 << 20
INLINE_BYTES = 256 * 1024  # smaller image data URLs are checked on the event loop; larger ones in a thread


@frozen(kw_only=True)
class FilesConfig:
    """The ``[files]`` table."""

    enabled: bool = True
    max_file_mb: float = 32.0          # decoded size of one image or file part
    max_zip_entries: int = 1000
    max_zip_total_mb: float = 64.0     # uncompressed, all entries of one archive
    max_zip_entry_mb: float = 32.0     # uncompressed, one entry
    max_compression_ratio: float = 100.0
    max_pdf_pages: int = 500           # for text extraction
    workers: int = 2                   # concurrent CPU-heavy jobs (pypdf, inflate) per app

    def limits(self) -> Limits:
        return Limits(file_bytes=int(self.max_file_mb * MIB), zip_entries=self.max_zip_entries,
                      zip_total_bytes=int(self.max_zip_total_mb * MIB),
                      zip_entry_bytes=int(self.max_zip_entry_mb * MIB), max_ratio=self.max_compression_ratio,
                      pdf_pages=self.max_pdf_pages)


@define
class _State:
    semaphore: asyncio.Semaphore
    processed: int = 0
    rejected: int = 0
    in_flight: int = 0
    by_code: dict[str, int] = field(factory=dict)


def _config(runtime: Runtime) -> FilesConfig:
    return runtime.config.sections.get("files") or FilesConfig()  # type: ignore[no-any-return]


def _state(runtime: Runtime) -> _State:
    state = runtime.plugin_state.get("files")
    if state is None:
        state = runtime.plugin_state["files"] = _State(asyncio.Semaphore(max(1, _config(runtime).workers)))
    return state  # type: ignore[no-any-return]


@hookimpl
def scillm_config_sections() -> Mapping[str, type]:
    return {"files": FilesConfig}


@hookimpl
def scillm_health(runtime: Runtime) -> dict[str, Any]:
    cfg = _config(runtime)
    state = runtime.plugin_state.get("files")
    return {"files": {
        "enabled": cfg.enabled, "fails": "closed",
        "limits": {k: v for k, v in attrs.asdict(cfg).items() if k not in ("enabled", "workers")},
        "workers": cfg.workers,
        "processed": state.processed if state else 0, "rejected": state.rejected if state else 0,
        "rejected_by_code": dict(state.by_code) if state else {}, "in_flight": state.in_flight if state else 0}}


@hookimpl(wrapper=True)
def preprocess_files(request: ChatRequest, ctx: CallContext) -> Any:
    call = yield
    cfg = _config(ctx.runtime)
    if not cfg.enabled:
        return call

    async def with_files() -> ChatRequest:
        return await _process(await call(), ctx, cfg)

    return with_files


def _needs_work(part: Part) -> bool:
    if isinstance(part, ImagePart):
        return part.image_url.url.startswith("data:")
    return isinstance(part, FilePart) and bool(part.file.file_data)


async def _process(request: ChatRequest, ctx: CallContext, cfg: FilesConfig) -> ChatRequest:
    if not any(isinstance(m.content, tuple) and any(_needs_work(p) for p in m.content) for m in request.messages):
        return request  # the common case: nothing to do, no routing, no thread
    runtime = ctx.runtime
    state = _state(runtime)
    limits = cfg.limits()
    target = _target_of(request, ctx)
    messages: list[Message] = []
    for i, message in enumerate(request.messages):
        if not isinstance(message.content, tuple) or not any(_needs_work(p) for p in message.content):
            messages.append(message)
            continue
        parts: list[Part] = []
        for j, part in enumerate(message.content):
            if not _needs_work(part):
                parts.append(part)
                continue
            where = f"$.messages[{i}].content[{j}]"
            try:
                if isinstance(part, ImagePart):
                    if len(part.image_url.url) <= INLINE_BYTES:
                        parts.append(handle_image(part, limits))
                    else:
                        parts.append(await _in_thread(state, handle_image, part, limits))
                else:
                    assert isinstance(part, FilePart)
                    # routing runs here on the event loop, never in the worker thread
                    parts.extend(await _in_thread(state, handle_file, part, limits, target()))
            except FileRejected as exc:
                state.rejected += 1
                state.by_code[exc.code] = state.by_code.get(exc.code, 0) + 1
                kind = errors.PayloadTooLarge if exc.status == 413 else errors.InvalidRequest
                raise kind(f"{exc.message} @ {where}", param=where, code=exc.code) from None
            state.processed += 1
        messages.append(attrs.evolve(message, content=tuple(parts)))
    return attrs.evolve(request, messages=tuple(messages))


def _target_of(request: ChatRequest, ctx: CallContext) -> Callable[[], Target]:
    """What the serving route takes, resolved once and only when a PDF or ZIP needs to know. A route reads PDFs
    or images only when its provider and every fallback do (a fallback must be able to take the same request)."""
    resolved: list[Target] = []

    def target() -> Target:
        if not resolved:
            runtime = ctx.runtime
            route = runtime.hooks.route_model(request, runtime)
            capabilities = [runtime.providers[r.provider].capabilities if r.provider in runtime.providers
                            else frozenset() for r in (route, *route.fallbacks)]
            resolved.append(Target(pdf=all("pdf" in c for c in capabilities),
                                   images=all("images" in c for c in capabilities)))
        return resolved[0]

    return target


async def _in_thread(state: _State, fn: Callable[..., T], *args: Any) -> T:
    async with state.semaphore:
        state.in_flight += 1
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            state.in_flight -= 1
