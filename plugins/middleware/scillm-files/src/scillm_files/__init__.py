"""Files middleware (``preprocess_files``): image data URLs and ``file`` parts carrying PDF, ZIP, text or images.

- ``image_url`` data URLs: base64 and image type checked, size limited (http(s) URLs pass unchanged).
- PDF: routes whose providers all read PDFs (capability ``"pdf"``, fallbacks included) get the part unchanged;
  others get the pypdf-extracted text as one text part with ``--- page N ---`` markers. Encrypted (password) and
  malformed PDFs are refused.
- ZIP: one part per entry (text -> text part headed by the entry name, image -> image data URL part, PDF -> as
  above); limits on entry count, per-entry and total uncompressed size and compression ratio (the entry's and the
  whole archive's), checked while inflating in memory; entries that overlap are refused; entry names are never
  trusted and nothing touches the filesystem; nested archives and encrypted entries are refused.
- Budgets: the text extracted from one request's files (``max_text_mb``), a PDF's decompressed page content
  (``max_pdf_content_mb``) and the CPU one file may take (``max_file_cpu_s``).

Every refusal is a 400 (413 for sizes, 422 for files too costly to process) whose ``code`` says why and whose
``param`` says where, e.g. ``$.messages[0].content[1]``. The work runs in the plugin's own worker processes
(:mod:`scillm_files.pool`) under the request's deadline; a worker is killed when its file runs past its budget or
its caller leaves. Fails closed: a file it cannot vouch for never reaches a provider. Switch it off with
``[files] enabled = false``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from attrs import define, field, frozen
from scillm_fileparse.extract import FileRejected, Item, Limits, Target, handle_image

from scillm_core import (
    CallContext,
    ChatRequest,
    FileData,
    FilePart,
    ImagePart,
    ImageUrl,
    Message,
    Runtime,
    SurfaceRegistry,
    TextPart,
    errors,
    hookimpl,
)
from scillm_core.models import Part
from scillm_files.pool import CpuBudgetExceeded, FilePool, WorkerCrashed

__all__ = ["FilesConfig"]

MIB = 1 << 20
INLINE_BYTES = 256 * 1024  # smaller image data URLs are checked on the event loop; larger ones in a worker


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
    max_pdf_content_mb: float = 16.0   # decompressed page content one PDF's text extraction may parse
    max_text_mb: float = 8.0           # text extracted from one request's files, in total (MiB of characters)
    max_file_cpu_s: float = 20.0       # CPU one file may take in its worker (413/422 past it, worker killed)
    workers: int = 2                   # worker processes (started on first use); more files wait their turn
    worker_memory_mb: float = 1024.0   # address space of one worker; a file that needs more is refused

    def limits(self) -> Limits:
        return Limits(file_bytes=int(self.max_file_mb * MIB), zip_entries=self.max_zip_entries,
                      zip_total_bytes=int(self.max_zip_total_mb * MIB),
                      zip_entry_bytes=int(self.max_zip_entry_mb * MIB), max_ratio=self.max_compression_ratio,
                      pdf_pages=self.max_pdf_pages, pdf_content_bytes=int(self.max_pdf_content_mb * MIB),
                      text_chars=int(self.max_text_mb * MIB))


@define
class _State:
    pool: FilePool
    processed: int = 0
    rejected: int = 0
    in_flight: int = 0
    by_code: dict[str, int] = field(factory=dict)


def _config(runtime: Runtime) -> FilesConfig:
    return runtime.config.sections.get("files") or FilesConfig()  # type: ignore[no-any-return]


def _state(runtime: Runtime) -> _State:
    state = runtime.plugin_state.get("files")
    if state is None:
        cfg = _config(runtime)
        state = runtime.plugin_state["files"] = _State(FilePool(max(1, cfg.workers), cfg.worker_memory_mb))
    return state  # type: ignore[no-any-return]


@hookimpl
def scillm_config_sections() -> Mapping[str, type]:
    return {"files": FilesConfig}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    async def stop_workers() -> None:
        state = runtime.plugin_state.get("files")
        if state is not None:
            await state.pool.close()

    surfaces.on_shutdown(stop_workers)


@hookimpl
def scillm_health(runtime: Runtime) -> dict[str, Any]:
    cfg = _config(runtime)
    state = _state(runtime)  # no worker starts before the first file
    return {"files": {
        "enabled": cfg.enabled, "fails": "closed",
        "limits": {k: v for k, v in attrs.asdict(cfg).items() if k not in ("enabled", "workers")},
        "workers": state.pool.snapshot(), "processed": state.processed, "rejected": state.rejected,
        "rejected_by_code": dict(state.by_code), "in_flight": state.in_flight}}


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
        return request  # the common case: nothing to do, no routing, no worker
    runtime = ctx.runtime
    state = _state(runtime)
    limits = cfg.limits()
    text_left = limits.text_chars
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
                if isinstance(part, ImagePart) and len(part.image_url.url) <= INLINE_BYTES:
                    items = [handle_image(part.image_url.url, limits)]
                elif isinstance(part, ImagePart):
                    items = await _in_worker(state, cfg, ctx, where, ("image", part.image_url.url, limits))
                else:
                    assert isinstance(part, FilePart)
                    # routing runs here on the event loop, never in the worker
                    task = ("file", part.file.file_data, part.file.filename,
                            attrs.evolve(limits, text_chars=text_left), target())
                    items = await _in_worker(state, cfg, ctx, where, task)
            except FileRejected as exc:
                state.rejected += 1
                state.by_code[exc.code] = state.by_code.get(exc.code, 0) + 1
                kind = errors.PayloadTooLarge if exc.status == 413 else errors.InvalidRequest
                raise kind(f"{exc.message} @ {where}", param=where, code=exc.code,
                           status=exc.status if exc.status not in (400, 413) else None) from None
            text_left -= sum(len(item[1]) for item in items if item[0] == "text")
            derived = [_part(item, part) for item in items]
            marker = getattr(part, "cache_control", None)
            if marker and derived and derived[-1] is not part:  # a cache breakpoint stays where it was: last
                derived[-1] = attrs.evolve(derived[-1], cache_control=marker)
            parts.extend(derived)
            state.processed += 1
        messages.append(message if tuple(parts) == message.content else attrs.evolve(message, content=tuple(parts)))
    if all(new is old for new, old in zip(messages, request.messages, strict=True)):
        return request  # checked and left as they were: the request (and its native body) goes on unchanged
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


async def _in_worker(state: _State, cfg: FilesConfig, ctx: CallContext, where: str,
                     task: tuple[Any, ...]) -> list[Item]:
    """Run ``task`` in a file worker within the request's deadline; the worker dies with a cancelled request."""
    state.in_flight += 1
    try:
        async with asyncio.timeout(ctx.remaining()):
            answer = await state.pool.run(task, cfg.max_file_cpu_s)
    except TimeoutError:
        raise errors.DeadlineExceeded(f"request timeout reached while processing the file @ {where}",
                                      param=where) from None
    except CpuBudgetExceeded:
        raise FileRejected("file_too_complex", f"processing the file took more than {cfg.max_file_cpu_s:g}s of CPU "
                                               f"([files] max_file_cpu_s); it was stopped", status=422) from None
    except WorkerCrashed:
        raise FileRejected("unprocessable_file", "the file crashed the worker processing it", status=422) from None
    finally:
        state.in_flight -= 1
    if answer[0] == "rejected":
        raise FileRejected(answer[1], answer[2], status=answer[3])
    items: list[Item] = answer[1]
    return items


def _part(item: Item, original: Part) -> Part:
    kind = item[0]
    if kind == "keep":
        return original
    if kind == "text":
        return TextPart(text=item[1])
    if kind == "image":
        detail = original.image_url.detail if isinstance(original, ImagePart) else None
        return ImagePart(image_url=ImageUrl(url=item[1], detail=detail))
    return FilePart(file=FileData(file_data=item[1], filename=item[2]))
