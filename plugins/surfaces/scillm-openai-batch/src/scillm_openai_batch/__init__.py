"""The OpenAI Files and Batch API on scillm's durable batch engine, so an unchanged ``openai`` SDK batch script runs
against scillm: ``POST /v1/files`` (``purpose=batch``), ``GET /v1/files[/{id}[/content]]``, ``DELETE /v1/files/{id}``,
``POST /v1/batches``, ``GET /v1/batches[/{id}]`` and ``POST /v1/batches/{id}/cancel``.

Each batch runs on :mod:`scillm_batch.engine` (stored results, resume after a restart, exactly one result per
request) through the whole pipeline (routing, pools, limits, retries, cache, metrics); see :mod:`.runner`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.types import Message

from scillm_core import (
    Runtime,
    SurfaceRegistry,
    caller_of,
    errors,
    hookimpl,
    identity_of,
    json_response,
    read_json,
    runtime_of,
)
from scillm_core.web import list_page
from scillm_openai_batch.files import ENDPOINTS, FileStore, public
from scillm_openai_batch.runner import BatchRunner, OpenAIBatchConfig

__all__ = ["OpenAIBatchConfig"]

MAX_METADATA = 16


@hookimpl
def scillm_config_sections() -> Mapping[str, type]:
    return {"openai_batch": OpenAIBatchConfig}


@hookimpl
def scillm_register_surfaces(surfaces: SurfaceRegistry, runtime: Runtime) -> None:
    config = runtime.config.sections.get("openai_batch") or OpenAIBatchConfig()
    runner = BatchRunner(runtime=runtime, config=config, files=FileStore(runtime),
                         pools=runtime.config.sections.get("pools") or {})
    runtime.plugin_state["openai-batch"] = runner
    for path, endpoint, methods in (
            ("/v1/files", upload, ["POST"]), ("/v1/files", list_files, ["GET"]),
            ("/v1/files/{file_id}", get_file, ["GET"]), ("/v1/files/{file_id}", delete_file, ["DELETE"]),
            ("/v1/files/{file_id}/content", file_content, ["GET"]),
            ("/v1/batches", create_batch, ["POST"]), ("/v1/batches", list_batches, ["GET"]),
            ("/v1/batches/{batch_id}", get_batch, ["GET"]),
            ("/v1/batches/{batch_id}/cancel", cancel_batch, ["POST"])):
        surfaces.route(path, endpoint, methods, plugin="openai-batch")
    surfaces.on_startup(runner.start)
    surfaces.on_shutdown(runner.stop)


@hookimpl
def scillm_health(runtime: Runtime) -> Mapping[str, Any]:
    runner: BatchRunner | None = runtime.plugin_state.get("openai-batch")
    running = sorted(runner.live) if runner else []
    return {"openai_batch": {"enabled": True, "fails": "closed", "running_here": running,
                             "lease_s": runner.config.lease_s if runner else None}}


def runner_of(request: Request) -> BatchRunner:
    return runtime_of(request).plugin_state["openai-batch"]  # type: ignore[no-any-return]


# -- files ---------------------------------------------------------------------------------------------------------

async def upload(request: Request) -> Response:
    runner = runner_of(request)
    limit = int(runner.config.max_file_mb * 1024 * 1024)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + 64 * 1024:
        raise errors.PayloadTooLarge(f"upload is {declared} bytes; files are limited to {runner.config.max_file_mb:g} "
                                     f"MB ([openai_batch] max_file_mb)")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise errors.InvalidRequest("upload a file as multipart/form-data with fields file and purpose", param="file")
    try:
        form = await Request(request.scope, _bounded(request, limit + 64 * 1024)).form(max_files=1, max_fields=8)
    except HTTPException as exc:  # Starlette's words for a malformed form, too many parts, a part too large
        raise errors.InvalidRequest(f"the upload is not a form scillm takes: {exc.detail} @ file",
                                    param="file") from None
    try:
        purpose = form.get("purpose")
        if purpose != "batch":
            raise errors.InvalidRequest(f"purpose must be 'batch' (the only file purpose scillm serves), not "
                                        f"{purpose!r} @ purpose", param="purpose")
        upload_file = form.get("file")
        if not isinstance(upload_file, UploadFile):
            raise errors.InvalidRequest("the form has no file field @ file", param="file")
        if upload_file.size is not None and upload_file.size > limit:
            raise errors.PayloadTooLarge(f"file is {upload_file.size} bytes; files are limited to "
                                         f"{runner.config.max_file_mb:g} MB ([openai_batch] max_file_mb)")
        doc = await runner.files.save_upload(upload_file.file, _filename(upload_file.filename),
                                             runner.config.max_lines, identity_of(request).owner)
    finally:
        await form.close()
    return json_response(public(doc))


def _filename(raw: str | None) -> str:
    """The name a file is listed and downloaded under: the last component of the name the client gave (it is never
    a path here, but a download would offer ``../../x`` as one); 400 for control characters (NUL, CR, LF) or more
    than 255 characters, which every list and download would repeat."""
    name = (raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    if len(name) > 255 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise errors.InvalidRequest(f"the file's name {errors.quote(name)} must be at most 255 characters, without "
                                    "control characters @ file.filename", param="file.filename")
    return name or "batch.jsonl"


def _bounded(request: Request, limit: int) -> Any:
    """The request's ``receive``, refusing (413) a body that grows past ``limit`` bytes while it streams in."""
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise errors.PayloadTooLarge(f"upload exceeds {limit} bytes ([openai_batch] max_file_mb)")
        return message

    return receive


async def list_files(request: Request) -> Response:
    purpose = request.query_params.get("purpose")
    identity = identity_of(request)  # a key lists its own files
    docs = [public(d) for d in await runner_of(request).files.list()
            if purpose in (None, d["purpose"]) and identity.can_see(d.get("_owner"))]
    return json_response(list_page(request, docs, default_limit=10_000, max_limit=10_000))


async def get_file(request: Request) -> Response:
    return json_response(public(await runner_of(request).files.get_for(request.path_params["file_id"],
                                                                       identity_of(request))))


async def file_content(request: Request) -> Response:
    files = runner_of(request).files
    doc = await files.get_for(request.path_params["file_id"], identity_of(request))
    return FileResponse(files.path(doc["id"]), media_type="application/octet-stream", filename=doc["filename"])


async def delete_file(request: Request) -> Response:
    runner = runner_of(request)
    file_id = request.path_params["file_id"]
    await runner.files.get_for(file_id, identity_of(request))
    active = [batch_id for batch_id, live in runner.live.items() if live.task is not None]
    for batch_id in active:
        if (await runner.get(batch_id))["input_file_id"] == file_id:
            raise errors.Conflict(f"file {errors.quote(file_id)} is the input of batch "
                                  f"{errors.quote(batch_id)}, which is still running",
                                  param="file_id")
    await runner.files.delete(file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})


# -- batches -------------------------------------------------------------------------------------------------------

async def create_batch(request: Request) -> Response:
    runtime = runtime_of(request)
    runner = runner_of(request)
    body = await read_json(request, limit_bytes=1024 * 1024)
    if not isinstance(body, dict):
        raise errors.InvalidRequest("request body must be a JSON object", param="$")
    endpoint = body.get("endpoint")
    if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
        raise errors.InvalidRequest(f"endpoint {errors.quote(endpoint)} is not served; use one of "
                                    f"{', '.join(ENDPOINTS)} @ $.endpoint", param="$.endpoint")
    if body.get("completion_window") != "24h":
        raise errors.InvalidRequest("completion_window must be '24h' @ $.completion_window",
                                    param="$.completion_window")
    metadata = _metadata(body.get("metadata"))
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str):
        raise errors.InvalidRequest("input_file_id must be a file id @ $.input_file_id", param="$.input_file_id")
    identity = identity_of(request)
    input_file = await runner.files.get_for(file_id, identity)  # another key's file is as if it did not exist
    checked = input_file.get("_batch")
    if input_file["purpose"] != "batch" or not checked:
        raise errors.InvalidRequest(f"file {errors.quote(file_id)} was not uploaded with purpose 'batch' @ "
                                    f"$.input_file_id",
                                    param="$.input_file_id")
    if checked["url"] != endpoint:
        raise errors.InvalidRequest(f"the file's requests go to {checked['url']}, not to the batch's endpoint "
                                    f"{endpoint} @ $.endpoint", param="$.endpoint", code="url_mismatch")
    if checked["model"] not in runner.pools:  # a pool's lanes were checked at startup; a model must route now
        try:
            runtime.route(checked["model"])
        except errors.ModelNotFound as exc:
            raise errors.InvalidRequest(f"the file's requests name model {checked['model']!r}, which is not "
                                        f"routable: {exc.message} @ $.input_file_id", param="$.input_file_id",
                                        code="model_not_found") from None
    doc = await runner.create(input_file, endpoint, metadata, caller_of(request), identity)
    return json_response(runner.view(doc))


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_METADATA or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in value.items()):
        raise errors.InvalidRequest(f"metadata must be an object of at most {MAX_METADATA} string values (keys up "
                                    f"to 64 characters, values up to 512) @ $.metadata", param="$.metadata")
    return dict(value)


async def get_batch(request: Request) -> Response:
    runner = runner_of(request)
    return json_response(runner.view(await runner.get_for(request.path_params["batch_id"], identity_of(request))))


async def cancel_batch(request: Request) -> Response:
    runner = runner_of(request)
    batch_id = request.path_params["batch_id"]
    await runner.get_for(batch_id, identity_of(request))
    return json_response(runner.view(await runner.cancel(batch_id)))


async def list_batches(request: Request) -> Response:
    runner = runner_of(request)
    identity = identity_of(request)  # a key lists its own batches
    docs = [doc for _, doc in await runner.runtime.store.scan("openai-batches", limit=1_000_000)
            if identity.can_see(doc.get("_owner"))]
    page = list_page(request, docs, default_limit=20, max_limit=100)
    return json_response({**page, "data": [runner.view(d) for d in page["data"]]})
