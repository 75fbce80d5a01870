"""Files for tests and benchmarks, built in memory: small valid PDFs and ZIPs, and the hostile ones file handling
must refuse (a PDF content-stream bomb, a zip whose entries overlap)."""

from __future__ import annotations

import base64
import io
import struct
import zipfile
import zlib
from typing import Any

__all__ = ["data_url", "file_part", "make_pdf", "make_zip", "overlapping_zip", "pdf_bomb"]

_HEAD = [b"<< /Type /Catalog /Pages 2 0 R >>", b"", b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
_PAGE = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
         b"/Contents %d 0 R >>")


def _pdf(objects: list[bytes], pages: list[int]) -> bytes:
    """Objects 1..n with page objects ``pages``; the page tree (object 2) and the xref offsets are filled in."""
    objects = list(objects)
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % p for p in pages), len(pages))
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.writelines(b"%010d 00000 n \n" % offset for offset in offsets)
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF with one line of Helvetica text per page."""
    objects = list(_HEAD)
    for text in pages:
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")
        stream = b"BT /F1 12 Tf 72 720 Td (" + escaped + b") Tj ET"
        objects += [_PAGE % (len(objects) + 2), b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream)]
    return _pdf(objects, [4 + 2 * i for i in range(len(pages))])


def pdf_bomb(pages: int = 20, content_mib: int = 2) -> bytes:
    """A few KB of PDF whose pages all share one compressed content stream of ``content_mib`` MiB of text
    operators: text extraction parses it once per page (about 5 s of CPU per page for pypdf)."""
    operators = b"BT /F1 1 Tf 0 0 Td (a) Tj ET\n"
    packed = zlib.compress(operators * (content_mib * (1 << 20) // len(operators)), 9)
    objects = [*_HEAD, b"<< /Length %d /Filter /FlateDecode >>\nstream\n%s\nendstream" % (len(packed), packed)]
    objects += [_PAGE % 4] * pages
    return _pdf(objects, [5 + i for i in range(pages)])


def make_zip(entries: list[tuple[str, bytes]], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression) as archive:
        for name, data in entries:
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return out.getvalue()


def overlapping_zip(entries: int = 64, size: int = 1 << 20) -> bytes:
    """A ~4 KB zip whose ``entries`` directory records all point at one compressed block of ``size`` bytes."""
    one = make_zip([("a.txt", b"a" * size)])
    directory_at, end_at = one.index(b"PK\x01\x02"), one.index(b"PK\x05\x06")
    directory = one[directory_at:end_at] * entries
    end = bytearray(one[end_at:])
    struct.pack_into("<HHII", end, 8, entries, entries, len(directory), directory_at)
    return one[:directory_at] + directory + bytes(end)


def data_url(media: str, data: bytes) -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def file_part(media: str, data: bytes, filename: str | None = None) -> dict[str, Any]:
    """A chat ``file`` content part (wire form) carrying ``data``."""
    file: dict[str, Any] = {"file_data": data_url(media, data)}
    if filename:
        file["filename"] = filename
    return {"type": "file", "file": file}
