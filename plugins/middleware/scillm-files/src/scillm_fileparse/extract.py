"""Pure, synchronous file handling (run in scillm-files' worker processes): data URLs, images, PDF validation and
text extraction, ZIP expansion. Nothing here touches the filesystem or imports scillm_core (a worker stays small
and starts fast); every size is counted while reading, never taken from a header. Results are plain tuples
(:data:`Item`) the plugin turns into parts. Failures raise :class:`FileRejected` with a stable ``code``; the plugin
adds the JSON path."""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import logging
import re
import stat
import zipfile
from typing import Any

from attrs import frozen

__all__ = ["KEEP", "FileRejected", "Item", "Limits", "Target", "TextBudget", "decode_data_url", "expand_zip",
           "handle_file", "handle_image", "pdf_parts"]

#: One resulting part: ``("keep",)`` (the part as sent), ``("text", text)``, ``("image", data_url)`` or
#: ``("file", data_url, filename)``.
Item = tuple[Any, ...]
KEEP: Item = ("keep",)

IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/gif": "GIF", "image/webp": "WebP"}
ZIP_TYPES = {"application/zip", "application/x-zip-compressed", "application/x-zip", "multipart/x-zip"}
TEXT_EXTENSIONS = frozenset("""txt md markdown rst csv tsv json jsonl ndjson yaml yml toml ini cfg conf xml html htm
css js mjs cjs ts tsx jsx py pyi rb go rs java kt kts scala c h cc cpp hpp cs swift m php pl sh bash zsh fish ps1
bat sql r jl lua ex exs erl hs ml clj dart vue svelte tex bib log env properties gradle make mk cmake dockerfile
gitignore editorconfig svg""".split())
SKIPPED_PREFIXES = ("__MACOSX/",)
SKIPPED_NAMES = frozenset({".DS_Store", "Thumbs.db"})
RATIO_FLOOR = 256 << 10        # ratios are judged once the archive (or an entry) has inflated past 256 KiB
CHUNK = 1 << 16
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

logging.getLogger("pypdf").setLevel(logging.ERROR)  # malformed input is reported to the client, not logged


class FileRejected(Exception):
    """A file the middleware refuses; ``status`` 400 or 413, ``code`` a stable machine-readable reason."""

    def __init__(self, code: str, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@frozen(kw_only=True)
class Limits:
    file_bytes: int
    zip_entries: int
    zip_total_bytes: int
    zip_entry_bytes: int
    max_ratio: float
    pdf_pages: int
    pdf_content_bytes: int   # decompressed page content a PDF's text extraction may parse
    text_chars: int          # extracted text the request may still take


class TextBudget:
    """Extracted text left for the request; taking more than is left is a 413."""

    def __init__(self, chars: int) -> None:
        self.left = chars
        self.limit = chars

    def take(self, text: str) -> str:
        self.left -= len(text)
        if self.left < 0:
            raise FileRejected("text_too_large", "the text extracted from the request's files passes the limit of "
                                                 f"{_mb(self.limit)} left for this request ([files] max_text_mb)",
                               status=413)
        return text


@frozen(kw_only=True)
class Target:
    """What the serving route(s) can take."""

    pdf: bool
    images: bool


# -- data URLs ------------------------------------------------------------------------------------------------------

def decode_data_url(url: str, limit: int, what: str) -> tuple[str, bytes]:
    """``(media_type, data)`` from ``data:<type>[;params];base64,<data>`` (plain base64 is sniffed)."""
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        if not sep:
            raise FileRejected("invalid_data_url", f"{what} is not a valid data URL (no ',' after the media type)")
        params = [p.strip().lower() for p in header.split(";")]
        media = params[0] or "text/plain"
        if "base64" not in params[1:]:
            raise FileRejected("invalid_data_url", f"{what} must be a base64 data URL (data:{media};base64,...)")
    else:
        media, payload = "", url
    _check_size(len(payload) * 3 // 4 - 2, limit, what)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        try:
            data = base64.b64decode(re.sub(r"\s+", "", payload), validate=True)
        except (binascii.Error, ValueError):
            raise FileRejected("invalid_base64", f"{what} is not valid base64") from None
    _check_size(len(data), limit, what)
    return media, data


def _check_size(size: int, limit: int, what: str) -> None:
    if size > limit:
        raise FileRejected("file_too_large", f"{what} is {_mb(size)} decoded; the limit is {_mb(limit)}", status=413)


def _mb(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB" if size >= 1 << 20 else f"{size} bytes"


def sniff(data: bytes) -> str | None:
    """The media type the bytes actually are, for the formats this module handles."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if b"%PDF-" in data[:1024]:
        return "application/pdf"
    if data.startswith((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")):
        return "application/zip"
    return None


def _image_url(media: str, data: bytes) -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


# -- images ---------------------------------------------------------------------------------------------------------

def handle_image(url: str, limits: Limits) -> Item:
    """Validate an ``image_url`` data URL: base64, size, a supported image type; a wrong declared type is
    corrected to what the bytes are (upstreams such as Anthropic refuse a mismatch)."""
    media, data = decode_data_url(url, limits.file_bytes, "the image data URL")
    actual = sniff(data)
    if actual not in IMAGE_TYPES:
        declared = f" (declared {media})" if media else ""
        raise FileRejected("invalid_image", f"the image data{declared} is not a PNG, JPEG, GIF or WebP image")
    if media == actual:
        return KEEP
    return ("image", _image_url(actual, data))


# -- file parts -----------------------------------------------------------------------------------------------------

def handle_file(file_data: str, name: str | None, limits: Limits, target: Target) -> list[Item]:
    """A ``file`` part's ``file_data`` (and ``filename``) -> the parts the route can take."""
    media, data = decode_data_url(file_data, limits.file_bytes, "the file data")
    del file_data  # the worker keeps one copy of a large file, not two
    budget = TextBudget(limits.text_chars)
    kind = _kind(media, data, name)
    if kind == "pdf":
        return pdf_parts(data, name, limits, target, budget, original=True)
    if kind == "zip":
        return expand_zip(data, limits, target, budget)
    if kind == "image":
        actual = sniff(data)
        if actual not in IMAGE_TYPES:
            raise FileRejected("invalid_image", f"the file {name or ''} is not a PNG, JPEG, GIF or WebP image".replace(
                "  ", " "))
        return [("image", _image_url(actual, data))]
    if kind == "text":
        text = _text(data)
        if text is None:
            raise FileRejected("invalid_text_file", "the text file is not valid UTF-8")
        return [("text", budget.take(f"--- file: {_show(name or 'document.txt')} ---\n{text}"))]
    raise FileRejected("unsupported_file_type",
                       f"unsupported file type {media or 'unknown'!r}: send PDF, ZIP, text or an image")


def _kind(media: str, data: bytes, name: str | None) -> str:
    if media == "application/pdf":
        return "pdf"
    if media in ZIP_TYPES:
        return "zip"
    if media in IMAGE_TYPES or media.startswith("image/"):
        return "image"
    if media.startswith("text/") or media in ("application/json", "application/xml"):
        return "text"
    sniffed = sniff(data)
    if sniffed == "application/pdf":
        return "pdf"
    if sniffed == "application/zip":
        return "zip"
    if sniffed in IMAGE_TYPES:
        return "image"
    extension = (name or "").rsplit(".", 1)[-1].lower() if name and "." in name else ""
    if extension == "pdf":
        return "pdf"
    if extension == "zip":
        return "zip"
    if extension in TEXT_EXTENSIONS and _text(data) is not None:
        return "text"
    return "unknown"


def _text(data: bytes) -> str | None:
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _show(name: str) -> str:
    """An untrusted name made safe to print (control characters escaped, length capped)."""
    shown = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", name)
    return shown if len(shown) <= 200 else shown[:200] + "..."


# -- PDF ------------------------------------------------------------------------------------------------------------

def open_pdf(data: bytes) -> Any:
    """A pypdf reader, or :class:`FileRejected` (``malformed_pdf`` / ``encrypted_pdf``)."""
    import pypdf

    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                opened = bool(reader.decrypt(""))  # permissions-only encryption (empty user password) is readable
            except Exception:  # unsupported cipher or a broken encryption dictionary
                opened = False
            if not opened:
                raise FileRejected("encrypted_pdf", "the PDF is encrypted (password-protected); send an "
                                                    "unencrypted copy")
        pages = len(reader.pages)
    except FileRejected:
        raise
    except Exception as exc:  # pypdf raises many types for broken input
        raise FileRejected("malformed_pdf", f"the PDF cannot be read ({_reason(exc)})") from None
    if pages == 0:
        raise FileRejected("malformed_pdf", "the PDF has no pages")
    return reader


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


def pdf_parts(data: bytes, name: str | None, limits: Limits, target: Target, budget: TextBudget, *,
              original: bool = False) -> list[Item]:
    """Validate a PDF; providers that read PDFs get the document, others the text with page markers."""
    reader = open_pdf(data)
    pages = len(reader.pages)
    if target.pdf:
        return [KEEP] if original else [("file", _image_url("application/pdf", data), name)]
    if pages > limits.pdf_pages:
        raise FileRejected("pdf_too_many_pages", f"the PDF has {pages} pages; text extraction is limited to "
                                                 f"{limits.pdf_pages}", status=413)
    _check_content(reader, limits.pdf_content_bytes)
    lines = [budget.take(f"--- file: {_show(name or 'document.pdf')} (PDF, {pages} page{'s' if pages != 1 else ''}, "
                         f"text extracted by scillm) ---")]
    for number, page in enumerate(reader.pages, 1):
        try:
            text = page.extract_text() or ""
        except Exception as exc:
            raise FileRejected("malformed_pdf", f"page {number} of the PDF cannot be read ({_reason(exc)})") from None
        lines.append(f"--- page {number} ---")
        lines.append(budget.take(text.strip() or "(no extractable text on this page)"))
    return [("text", "\n".join(lines))]


def _check_content(reader: Any, limit: int) -> None:
    """Text extraction parses every page's content stream, and a stream shared by many pages is parsed once per
    page: a few KB of PDF can hold hundreds of MB of operators. Their decompressed size is cheap to learn first."""
    total = 0
    for number, page in enumerate(reader.pages, 1):
        try:
            contents = page.get_contents()
            total += len(contents.get_data()) if contents is not None else 0
        except Exception as exc:
            raise FileRejected("malformed_pdf", f"page {number} of the PDF cannot be read ({_reason(exc)})") from None
        if total > limit:
            raise FileRejected("pdf_too_complex", f"the PDF's page content is more than {_mb(limit)} decompressed "
                                                  f"by page {number} (pages can share one content stream); text "
                                                  f"extraction is limited to {_mb(limit)} ([files] "
                                                  f"max_pdf_content_mb)", status=413)


# -- ZIP ------------------------------------------------------------------------------------------------------------

def check_entry_name(name: str) -> None:
    """Entry names are never trusted: no NUL or control characters, absolute paths, drive letters or '..'."""
    if "\x00" in name:
        raise FileRejected("unsafe_zip_entry", f"ZIP entry name {_show(name)!r} contains a NUL byte")
    if _CONTROL.search(name):
        raise FileRejected("unsafe_zip_entry", f"ZIP entry name {_show(name)!r} contains control characters")
    if name.startswith(("/", "\\")):
        raise FileRejected("unsafe_zip_entry", f"ZIP entry name {_show(name)!r} is an absolute path")
    if _DRIVE.match(name):
        raise FileRejected("unsafe_zip_entry", f"ZIP entry name {_show(name)!r} has a drive letter")
    if ".." in re.split(r"[\\/]", name):
        raise FileRejected("unsafe_zip_entry", f"ZIP entry name {_show(name)!r} has a '..' path traversal")
    if len(name) > 1024:
        raise FileRejected("unsafe_zip_entry", f"ZIP entry name {_show(name)!r} is longer than 1024 characters")


def expand_zip(data: bytes, limits: Limits, target: Target, budget: TextBudget) -> list[Item]:
    """One part per entry: text files -> text parts headed by the entry name, images -> image data URL parts,
    PDFs -> as :func:`pdf_parts`. Nested archives are refused; other binaries become a one-line note."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except Exception as exc:  # BadZipFile, struct errors from a broken directory, ...
        raise FileRejected("malformed_zip", f"the ZIP archive cannot be read ({_reason(exc)})") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > limits.zip_entries:
            raise FileRejected("zip_too_many_entries", f"the ZIP archive has {len(infos)} entries; the limit is "
                                                       f"{limits.zip_entries}")
        _check_layout(data, infos, archive.start_dir)
        parts: list[Item] = []
        total = _Inflated(len(data), limits.max_ratio)
        for info in infos:
            name = info.orig_filename
            check_entry_name(name)
            if info.is_dir() or name.startswith(SKIPPED_PREFIXES) or name.rsplit("/", 1)[-1] in SKIPPED_NAMES:
                continue
            where = f"ZIP entry {_show(name)!r}"
            if info.flag_bits & 0x1:
                raise FileRejected("encrypted_zip", f"{where} is encrypted; send an unencrypted archive")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise FileRejected("unsafe_zip_entry", f"{where} is a symbolic link")
            content = _read_entry(archive, info, limits, total, where)
            try:
                parts.extend(_entry_parts(name, content, limits, target, budget))
            except FileRejected as exc:
                raise FileRejected(exc.code, f"{where}: {exc.message}", status=exc.status) from None
        if not parts:
            raise FileRejected("empty_zip", "the ZIP archive has no files")
        return parts


def _check_layout(data: bytes, infos: list[zipfile.ZipInfo], directory_at: int) -> None:
    """Every entry's bytes (local header and data) lie in their own range before the central directory: entries
    that share or overlap data (one compressed block read many times over) are a zip bomb, not an archive."""
    end_of = {}
    for info in infos:
        at = info.header_offset
        header = data[at:at + 30]
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise FileRejected("malformed_zip", f"ZIP entry {_show(info.orig_filename)!r} has no local header "
                                                f"where the directory says")
        start = at + 30 + int.from_bytes(header[26:28], "little") + int.from_bytes(header[28:30], "little")
        end_of[info] = start + info.compress_size
    ordered = sorted(infos, key=lambda i: i.header_offset)
    for first, second in itertools.pairwise(ordered):
        if second.header_offset < end_of[first]:
            raise FileRejected("zip_bomb", f"ZIP entries {_show(first.orig_filename)!r} and "
                                           f"{_show(second.orig_filename)!r} overlap (they share compressed data); "
                                           f"refusing a likely zip bomb")
    if ordered and end_of[ordered[-1]] > directory_at:
        raise FileRejected("zip_bomb", f"ZIP entry {_show(ordered[-1].orig_filename)!r} overlaps the archive's "
                                       f"directory; refusing a likely zip bomb")


class _Inflated:
    """What the whole archive has inflated to so far, against its own size: entries that each stay small can
    still add up to a bomb."""

    def __init__(self, archive_bytes: int, max_ratio: float) -> None:
        self.bytes = 0
        self.archive_bytes = max(archive_bytes, 1)
        self.max_ratio = max_ratio

    def add(self, size: int, where: str) -> None:
        self.bytes += size
        if self.bytes > RATIO_FLOOR and self.bytes / self.archive_bytes > self.max_ratio:
            raise FileRejected("zip_bomb", f"the archive inflates more than {self.max_ratio:g}x its "
                                           f"{_mb(self.archive_bytes)} by {where}; refusing a likely zip bomb")


def _read_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: Limits, total: _Inflated,
                where: str) -> bytes:
    """Inflate one entry in bounded chunks, checking size, archive total and compression ratios (the entry's and
    the archive's) as it grows."""
    entry_limit = min(limits.zip_entry_bytes, limits.zip_total_bytes - total.bytes)
    compressed = max(info.compress_size, 1)
    # header claims are only ever a reason to refuse early; the real sizes are counted below
    if info.file_size > RATIO_FLOOR and info.file_size / compressed > limits.max_ratio:
        raise FileRejected("zip_bomb", f"{where} declares {_mb(info.file_size)} from {_mb(compressed)} compressed, "
                                       f"more than {limits.max_ratio:g}x; refusing a likely zip bomb")
    if info.file_size > limits.zip_entry_bytes:
        raise FileRejected("zip_too_large", f"{where} declares {_mb(info.file_size)} uncompressed; the limit per "
                                            f"entry is {_mb(limits.zip_entry_bytes)}", status=413)
    out = bytearray()
    try:
        with archive.open(info) as stream:
            while chunk := stream.read(CHUNK):
                out += chunk
                total.add(len(chunk), where)
                if len(out) > RATIO_FLOOR and len(out) / compressed > limits.max_ratio:
                    raise FileRejected("zip_bomb", f"{where} inflates more than {limits.max_ratio:g}x "
                                                   f"({_mb(compressed)} compressed); refusing a likely zip bomb")
                if len(out) > entry_limit:
                    if entry_limit < limits.zip_entry_bytes:
                        raise FileRejected("zip_too_large", f"{where} takes the archive past "
                                                            f"{_mb(limits.zip_total_bytes)} uncompressed", status=413)
                    raise FileRejected("zip_too_large", f"{where} is larger than {_mb(limits.zip_entry_bytes)} "
                                                        f"uncompressed", status=413)
    except FileRejected:
        raise
    except NotImplementedError as exc:
        raise FileRejected("malformed_zip", f"{where} uses an unsupported compression ({_reason(exc)})") from None
    except RuntimeError as exc:  # zipfile: "File ... is encrypted, password required"
        raise FileRejected("encrypted_zip", f"{where} cannot be read ({_reason(exc)})") from None
    except Exception as exc:  # BadZipFile (bad CRC, header mismatch), zlib.error, EOFError, ...
        raise FileRejected("malformed_zip", f"{where} is corrupt ({_reason(exc)})") from None
    return bytes(out)


def _entry_parts(name: str, content: bytes, limits: Limits, target: Target, budget: TextBudget) -> list[Item]:
    base = name.rsplit("/", 1)[-1]
    extension = base.rsplit(".", 1)[-1].lower() if "." in base else base.lower()
    sniffed = sniff(content)
    if sniffed == "application/zip" or extension in ("zip", "jar", "docx", "xlsx", "pptx", "odt", "epub"):
        raise FileRejected("nested_zip", "is itself a ZIP-based archive (zip, jar, docx, ...); nested archives are "
                                         "not expanded: add their files to the outer ZIP")
    if sniffed == "application/pdf" or extension == "pdf":
        return pdf_parts(content, base, limits, target, budget)
    if sniffed in IMAGE_TYPES:
        if not target.images:
            return [("text", f"--- file: {_show(name)} (image omitted: the serving model takes text only) ---")]
        return [("image", _image_url(sniffed, content))]
    text = _text(content)
    if text is not None:
        return [("text", budget.take(f"--- file: {_show(name)} ---\n{text}"))]
    return [("text", f"--- file: {_show(name)} (binary file of {len(content)} bytes omitted: only text, "
                     f"images and PDFs are read) ---")]
