"""Files: JSONL on disk under the data dir, their metadata in the state store, batch input checked line by line.

Uploading a ``purpose=batch`` file checks every line (in a worker thread, never on the event loop) and refuses the
file with a 400 naming the first bad line: not JSON, no string ``custom_id``, a ``custom_id`` seen before, a method
other than ``POST``, a url scillm does not serve, a ``body`` without a string ``model``, or lines that disagree on
the url or the model (one batch, one endpoint, one model or pool). Request bodies themselves are checked when each
request runs, and a bad one becomes its own line in the error file, as OpenAI does.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import orjson
from attrs import frozen

from scillm_core import Identity, Runtime, errors, require_visible
from scillm_core.identity import MASTER_OWNER
from scillm_core.jsonio import JSONTooDeep, loads
from scillm_core.upstream import excerpt

__all__ = ["ENDPOINTS", "BatchLine", "FileStore", "InputFile", "check_batch_file"]

FILES_NS = "openai-files"
#: What a batch line's ``url`` (and a batch's ``endpoint``) may be: the request kind the engine runs for it.
ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings"}
MAX_CUSTOM_ID = 512
_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")


class BatchFileError(errors.InvalidRequest):
    """A batch file refused at upload; ``code`` is OpenAI's name for the problem."""


@frozen
class BatchLine:
    number: int  # 1-based line number in the file
    custom_id: str
    body: Mapping[str, Any]


@frozen
class InputFile:
    """What a batch needs from its checked input file."""

    url: str
    model: str
    lines: int


def _refuse(number: int, message: str, code: str, where: str = "") -> BatchFileError:
    param = f"line {number}" + (f" {where}" if where else "")
    return BatchFileError(f"batch file line {number}: {message} @ {param}", param=param, code=code)


def check_batch_file(source: IO[bytes], max_lines: int) -> InputFile:
    """Check every line of a batch input file (see the module docstring); raise :class:`BatchFileError`."""
    url = model = None
    seen: dict[str, int] = {}
    count = 0
    for number, line in _lines(source):
        count += 1
        if count > max_lines:
            raise _refuse(number, f"more than {max_lines} requests in one batch file", "too_many_tasks")
        try:
            request = loads(line)
        except JSONTooDeep as exc:
            raise _refuse(number, f"this line is {exc.msg}", "invalid_json_line") from None
        except orjson.JSONDecodeError:
            raise _refuse(number, "this line is not valid JSON", "invalid_json_line") from None
        if not isinstance(request, dict):
            raise _refuse(number, "each line must be a JSON object", "invalid_request")
        custom_id = request.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            raise _refuse(number, f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID} characters",
                          "invalid_request", "$.custom_id")
        if custom_id in seen:
            raise _refuse(number, f"custom_id {custom_id!r} is a duplicate of line {seen[custom_id]}; each request "
                                  f"needs its own", "duplicate_custom_id", "$.custom_id")
        seen[custom_id] = number
        if request.get("method") != "POST":
            raise _refuse(number, f"method must be \"POST\", not {request.get('method')!r}", "invalid_request",
                          "$.method")
        line_url = request.get("url")
        if not isinstance(line_url, str) or line_url not in ENDPOINTS:  # (an array or object is no endpoint)
            raise _refuse(number, f"url {excerpt(repr(line_url), 100)} is not served; use one of "
                                  f"{', '.join(ENDPOINTS)}", "invalid_url", "$.url")
        body = request.get("body")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
            raise _refuse(number, "body must be an object with a string model", "invalid_request", "$.body.model")
        if url is None:
            url, model = line_url, body["model"]
        elif line_url != url:
            raise _refuse(number, f"url {line_url!r} differs from line 1's {url!r}; one batch, one endpoint",
                          "url_mismatch", "$.url")
        elif body["model"] != model:
            raise _refuse(number, f"model {body['model']!r} differs from line 1's {model!r}; one batch, one model "
                                  f"(or one pool)", "model_mismatch", "$.body.model")
    if url is None or model is None:
        raise BatchFileError("the batch file has no requests (one JSON object per line) @ file", param="file",
                             code="empty_file")
    return InputFile(url=url, model=model, lines=count)


def read_batch_lines(path: Path) -> list[BatchLine]:
    """The lines of a checked input file (blocking: call it in a thread)."""
    with path.open("rb") as source:
        return [BatchLine(number, (request := orjson.loads(line))["custom_id"], request["body"])
                for number, line in _lines(source)]


def _lines(source: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their 1-based numbers; 400 for text that is not UTF-8."""
    for number, raw in enumerate(source, start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            raise _refuse(number, "this line is not UTF-8 text", "invalid_json_line") from None
        yield number, line


class FileStore:
    """Files by id: content at ``{data_dir}/openai-files/{id}.jsonl``, metadata in the state store."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.root = runtime.config.data_dir / "openai-files"

    def path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl"

    @staticmethod
    def new_id() -> str:
        return "file-" + secrets.token_hex(12)

    async def get(self, file_id: str) -> dict[str, Any]:
        """The file's metadata (the OpenAI file object); 404 naming it when there is none."""
        doc = await self.runtime.store.get(FILES_NS, file_id) if _FILE_ID.match(file_id) else None
        if doc is None:
            raise errors.NotFound(f"no file {errors.quote(file_id)}", param="file_id")
        return doc

    async def get_for(self, file_id: str, identity: Identity) -> dict[str, Any]:
        """:meth:`get` for a caller: 404 as well when the file belongs to another key."""
        doc = await self.get(file_id)
        require_visible(identity, doc.get("_owner"), f"file {errors.quote(file_id)}")
        return doc

    async def save_upload(self, source: IO[bytes], filename: str, max_lines: int,
                          owner: str = MASTER_OWNER) -> dict[str, Any]:
        """Check and store an uploaded batch input file; returns its file object."""
        file_id = self.new_id()
        path = self.path(file_id)

        def check_and_copy() -> tuple[InputFile, int]:
            source.seek(0)
            checked = check_batch_file(source, max_lines)
            source.seek(0)
            return checked, _write_atomically(path, iter(lambda: source.read(1 << 20), b""))

        checked, size = await asyncio.to_thread(check_and_copy)
        doc = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()), "filename": filename,
               "purpose": "batch", "status": "processed", "status_details": None, "expires_at": None,
               "_batch": {"url": checked.url, "model": checked.model, "lines": checked.lines}, "_owner": owner}
        await self.runtime.store.put(FILES_NS, file_id, doc)
        return doc

    async def save_output(self, lines: list[bytes], filename: str, owner: str = MASTER_OWNER) -> dict[str, Any]:
        """Store a batch's output or error file (one JSON document per line)."""
        file_id = self.new_id()
        size = await asyncio.to_thread(_write_atomically, self.path(file_id), iter(lines))
        doc = {"id": file_id, "object": "file", "bytes": size, "created_at": int(time.time()),
               "filename": filename, "purpose": "batch_output", "status": "processed", "status_details": None,
               "expires_at": None, "_owner": owner}
        await self.runtime.store.put(FILES_NS, file_id, doc)
        return doc

    async def delete(self, file_id: str) -> None:
        await self.get(file_id)
        await self.runtime.store.delete(FILES_NS, file_id)
        await asyncio.to_thread(self.path(file_id).unlink, missing_ok=True)

    async def list(self) -> list[dict[str, Any]]:
        return [doc for _, doc in await self.runtime.store.scan(FILES_NS, limit=1_000_000)]


def _write_atomically(path: Path, chunks: Iterator[bytes]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    size = 0
    with partial.open("wb") as out:
        for chunk in chunks:
            out.write(chunk)
            size += len(chunk)
        out.flush()
        os.fsync(out.fileno())
    partial.replace(path)
    return size


def public(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A stored object as clients see it (scillm's own bookkeeping, keys starting with ``_``, left out)."""
    return {k: v for k, v in doc.items() if not k.startswith("_")}
