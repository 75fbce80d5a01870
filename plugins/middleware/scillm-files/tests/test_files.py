"""Files middleware end to end: official openai client -> scillm -> FakeOpenAI, checking what the upstream got."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import struct
import time
import zipfile
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from scillm_core.testing import DEV_KEY, FakeOpenAI, Reply, ServerThread, make_app
from scillm_core.testing.contract import TINY_PNG_B64, TINY_PNG_URL
from scillm_core.testing.files import data_url, file_part, make_pdf, make_zip, overlapping_zip, pdf_bomb

KEY = "sk-files-secret-0123456789abcdef"
PDF_MODEL = "gpt-4o-mini"                  # openai: declares "pdf" and "images"
TEXT_MODEL = "deepseek/deepseek-chat"      # deepseek: text only (string content upstream)
IMAGE_MODEL = "glm/glm-4.6"                # glm: images but no pdf


# -- building test files ----------------------------------------------------------------------------------------

def encrypted_pdf() -> bytes:
    import pypdf

    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(make_pdf(["top secret"]))))
    writer.encrypt("hunter2", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def ask(*parts: dict[str, Any], text: str = "Summarise the attachment.") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


PNG = base64.b64decode(TINY_PNG_B64)
REPORT = make_pdf(["Quarterly revenue rose to 42 million.", "Costs fell (slightly).", "Outlook: stable."])


# -- fixtures ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as fake:
        yield fake  # type: ignore[misc]


def env_for(fake: FakeOpenAI) -> dict[str, str]:
    return {"OPENAI_API_KEY": KEY, "OPENAI_API_BASE": fake.base_url, "DEEPSEEK_API_KEY": KEY,
            "DEEPSEEK_API_BASE": fake.base_url, "GLM_API_KEY": KEY, "GLM_API_BASE": fake.base_url}


@pytest.fixture(scope="module")
def server(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    app = make_app(env=env_for(fake), data_dir=tmp_path_factory.mktemp("files"),
                   config={"files": {"max_zip_entries": 1000}})
    with ServerThread(app) as server:
        yield server


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)


def upstream_content(fake: FakeOpenAI) -> Any:
    return fake.last.body["messages"][0]["content"]


def rejected(client: openai.OpenAI, fake: FakeOpenAI, messages: list[dict[str, Any]], *, model: str = PDF_MODEL,
             status: int = 400, timeout: float | None = None) -> dict[str, Any]:
    """Send, expect an error without any upstream call, return the error object."""
    sent = len(fake.requests)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=model, messages=messages,
                                       extra_body={"timeout": timeout} if timeout else None)
    assert caught.value.status_code == status, caught.value.response.text
    assert len(fake.requests) == sent, "a refused file must not reach the upstream"
    error: dict[str, Any] = caught.value.response.json()["error"]
    assert KEY not in caught.value.response.text
    return error


def still_serving(client: openai.OpenAI, fake: FakeOpenAI, tag: str) -> None:
    fake.script(Reply.say(f"still here {tag}"))
    completion = client.chat.completions.create(model=PDF_MODEL, messages=[{"role": "user", "content": f"ping {tag}"}])
    assert completion.choices[0].message.content == f"still here {tag}"


# -- PDFs -------------------------------------------------------------------------------------------------------

def test_pdf_reaches_a_pdf_reading_provider_as_the_file_part(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("Revenue rose."))
    part = file_part("application/pdf", REPORT, "report.pdf")
    completion = client.chat.completions.create(model=PDF_MODEL, messages=ask(part))
    assert completion.choices[0].message.content == "Revenue rose."
    content = upstream_content(fake)
    assert content[1] == part  # unchanged: same data URL and filename


def test_pdf_to_a_text_only_provider_is_extracted_text_with_page_markers(client: openai.OpenAI,
                                                                        fake: FakeOpenAI) -> None:
    fake.script(Reply.say("Revenue rose to 42 million."))
    client.chat.completions.create(model=TEXT_MODEL, messages=ask(file_part("application/pdf", REPORT, "q3.pdf")))
    content = upstream_content(fake)  # deepseek takes string content: the text parts joined
    assert isinstance(content, str)
    assert "--- file: q3.pdf (PDF, 3 pages" in content
    page1, page2, page3 = (content.index(f"--- page {n} ---") for n in (1, 2, 3))
    assert page1 < content.index("Quarterly revenue rose to 42 million.") < page2
    assert page2 < content.index("Costs fell (slightly).") < page3 < content.index("Outlook: stable.")
    assert "application/pdf" not in content


def test_malformed_pdf_is_400_naming_the_part(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    error = rejected(client, fake, ask(file_part("application/pdf", b"%PDF-1.4\nthis is not really a pdf")))
    assert error["code"] == "malformed_pdf"
    assert error["param"] == "$.messages[0].content[1]"
    assert "PDF cannot be read" in error["message"] and "$.messages[0].content[1]" in error["message"]
    still_serving(client, fake, "after-malformed")


def test_encrypted_pdf_is_400_even_for_a_pdf_reading_provider(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    error = rejected(client, fake, ask(file_part("application/pdf", encrypted_pdf(), "secret.pdf")))
    assert error["code"] == "encrypted_pdf"
    assert "encrypted" in error["message"] and error["param"] == "$.messages[0].content[1]"
    still_serving(client, fake, "after-encrypted")


# -- ZIPs -------------------------------------------------------------------------------------------------------

MIXED = make_zip([("docs/", b""), ("docs/notes.txt", b"Remember the milk."), ("img/pixel.png", PNG),
                  ("docs/report.pdf", REPORT)])


def test_zip_becomes_one_part_per_entry(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("Three files."))
    client.chat.completions.create(model=PDF_MODEL, messages=ask(file_part("application/zip", MIXED, "bundle.zip")))
    content = upstream_content(fake)
    assert [p["type"] for p in content] == ["text", "text", "image_url", "file"]
    assert content[1]["text"] == "--- file: docs/notes.txt ---\nRemember the milk."
    assert content[2]["image_url"]["url"] == TINY_PNG_URL
    assert content[3]["file"]["filename"] == "report.pdf"
    assert base64.b64decode(content[3]["file"]["file_data"].split(",", 1)[1]) == REPORT


def test_zip_pdf_entry_for_a_model_without_pdf_is_extracted(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    fake.script(Reply.say("ok"))
    client.chat.completions.create(model=IMAGE_MODEL, messages=ask(file_part("application/zip", MIXED)))
    content = upstream_content(fake)
    assert [p["type"] for p in content] == ["text", "text", "image_url", "text"]
    assert content[3]["text"].startswith("--- file: report.pdf (PDF, 3 pages")
    assert "--- page 2 ---\nCosts fell (slightly)." in content[3]["text"]


def test_zip_bomb_is_refused_and_a_concurrent_request_is_served(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    bomb = make_zip([("zeros.bin", bytes(50 * 1024 * 1024))])
    assert len(bomb) < 200_000

    def send_bomb() -> httpx.Response:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=PDF_MODEL, messages=ask(file_part("application/zip", bomb, "b.zip")))
        return caught.value.response

    sent = len(fake.requests)
    fake.script(Reply.say("concurrent answer"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        hostile = pool.submit(send_bomb)
        normal = pool.submit(client.chat.completions.create, model=PDF_MODEL,
                             messages=[{"role": "user", "content": "concurrent ping"}])
        assert normal.result(timeout=30).choices[0].message.content == "concurrent answer"
        error = hostile.result(timeout=30).json()["error"]
    assert [r.body["messages"][0]["content"] for r in fake.requests[sent:]] == ["concurrent ping"]
    assert error["code"] == "zip_bomb"
    assert "'zeros.bin'" in error["message"] and "zip bomb" in error["message"]
    assert error["param"] == "$.messages[0].content[1]"
    still_serving(client, fake, "after-bomb")


def test_bomb_with_a_lying_size_header_is_refused(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    archive = bytearray(make_zip([("zeros.bin", bytes(20 * 1024 * 1024))]))
    for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # claim 1000 bytes uncompressed
        struct.pack_into("<I", archive, archive.index(signature) + offset, 1000)
    error = rejected(client, fake, ask(file_part("application/zip", bytes(archive))))
    assert error["code"] == "malformed_zip" and "'zeros.bin'" in error["message"]


@pytest.mark.parametrize("name, why", [("../../etc/passwd", "traversal"), ("/etc/passwd", "absolute path"),
                                       ("C:\\Windows\\win.ini", "drive letter"), ("a\\..\\..\\b.txt", "traversal"),
                                       ("evil\x00.txt", "NUL byte")])
def test_unsafe_entry_names_are_refused(client: openai.OpenAI, fake: FakeOpenAI, name: str, why: str) -> None:
    archive = make_zip([("ok.txt", b"fine"), (name.replace("\x00", "#"), b"root:x:0:0")])
    archive = archive.replace(b"evil#.txt", b"evil\x00.txt")  # zipfile cuts names at NUL when writing; patch it in
    error = rejected(client, fake, ask(file_part("application/zip", archive)))
    assert error["code"] == "unsafe_zip_entry"
    assert why in error["message"] and error["param"] == "$.messages[0].content[1]"


def test_symlink_entries_are_refused(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    import stat

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("ok.txt", b"fine")
        link = zipfile.ZipInfo("passwd")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16  # a symbolic link to /etc/passwd, as `zip -y` stores it
        archive.writestr(link, b"/etc/passwd")
    error = rejected(client, fake, ask(file_part("application/zip", buffer.getvalue())))
    assert error["code"] == "unsafe_zip_entry" and "symbolic link" in error["message"]
    assert error["param"] == "$.messages[0].content[1]"


def test_traversal_then_normal_request(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    error = rejected(client, fake, ask(file_part("application/zip", make_zip([("../../etc/passwd", b"x")]))))
    assert "'../../etc/passwd'" in error["message"]
    still_serving(client, fake, "after-traversal")


def test_ten_thousand_entries_are_refused(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    archive = make_zip([(f"f{i}.txt", b"x") for i in range(10_000)], compression=zipfile.ZIP_STORED)
    error = rejected(client, fake, ask(file_part("application/zip", archive)))
    assert error["code"] == "zip_too_many_entries"
    assert "10000 entries" in error["message"] and "1000" in error["message"]
    still_serving(client, fake, "after-10k")


def test_encrypted_zip_entry_is_refused(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    archive = bytearray(make_zip([("secret.txt", b"classified")]))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # set the "encrypted" flag bit
        at = archive.index(signature) + offset
        archive[at] |= 0x1
    error = rejected(client, fake, ask(file_part("application/zip", bytes(archive))))
    assert error["code"] == "encrypted_zip" and "'secret.txt'" in error["message"]


def test_nested_zip_and_corrupt_zip_are_refused(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    nested = make_zip([("inner.zip", make_zip([("a.txt", b"a")]))])
    assert rejected(client, fake, ask(file_part("application/zip", nested)))["code"] == "nested_zip"
    corrupt = rejected(client, fake, ask(file_part("application/zip", b"PK\x03\x04 not really a zip")))
    assert corrupt["code"] == "malformed_zip"


def test_pdf_inside_zip_that_is_encrypted_names_the_entry(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    archive = make_zip([("readme.txt", b"hi"), ("locked.pdf", encrypted_pdf())])
    error = rejected(client, fake, ask(file_part("application/zip", archive)), model=TEXT_MODEL)
    assert error["code"] == "encrypted_pdf" and "'locked.pdf'" in error["message"]


# -- images and plain parts -------------------------------------------------------------------------------------

def test_bad_image_data_urls_are_400(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    bad_base64 = {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}
    error = rejected(client, fake, ask(bad_base64))
    assert error["code"] == "invalid_base64" and error["param"] == "$.messages[0].content[1]"
    not_image = {"type": "image_url", "image_url": {"url": data_url("image/png", b"just some text")}}
    assert rejected(client, fake, ask(not_image))["code"] == "invalid_image"


def test_data_url_scheme_is_case_insensitive(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    shouting = {"type": "image_url", "image_url": {"url": "DATA:image/png;base64,@@not-base64@@"}}
    error = rejected(client, fake, ask(shouting))  # validated like data:, not passed on as a URL
    assert error["code"] == "invalid_base64" and error["param"] == "$.messages[0].content[1]"
    fake.script(Reply.say("a pixel"))
    client.chat.completions.create(model=PDF_MODEL, messages=ask(
        {"type": "image_url", "image_url": {"url": "Data:image/jpeg;base64," + TINY_PNG_B64}}))
    assert upstream_content(fake)[1]["image_url"]["url"] == TINY_PNG_URL  # checked and its type corrected


def test_image_declared_with_the_wrong_type_is_corrected_and_urls_pass(client: openai.OpenAI,
                                                                       fake: FakeOpenAI) -> None:
    fake.script(Reply.say("a pixel"))
    client.chat.completions.create(model=PDF_MODEL, messages=ask(
        {"type": "image_url", "image_url": {"url": data_url("image/jpeg", PNG)}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}))
    content = upstream_content(fake)
    assert content[1]["image_url"]["url"] == TINY_PNG_URL
    assert content[2]["image_url"]["url"] == "https://example.com/cat.png"


def test_oversized_file_is_413(fake: FakeOpenAI, tmp_path: Any) -> None:
    app = make_app(env=env_for(fake), data_dir=tmp_path, config={"files": {"max_file_mb": 0.01}})
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
        error = rejected(client, fake, ask(file_part("application/pdf", REPORT + b"%" * 20_000)), status=413)
    assert error["code"] == "file_too_large" and error["param"] == "$.messages[0].content[1]"


# -- switch and health ------------------------------------------------------------------------------------------

def test_health_reports_state_and_the_switch_turns_it_off(server: ServerThread, fake: FakeOpenAI,
                                                          tmp_path: Any) -> None:
    health = httpx.get(server.url + "/v1/scillm/health", headers={"authorization": f"Bearer {DEV_KEY}"}).json()
    files = health["middleware"]["files"]
    assert files["enabled"] is True and files["fails"] == "closed"
    assert files["limits"]["max_zip_entries"] == 1000 and files["rejected"] >= 1
    assert KEY not in str(health)

    app = make_app(env=env_for(fake), data_dir=tmp_path, config={"files": {"enabled": False}})
    with ServerThread(app) as off:
        client = openai.OpenAI(base_url=off.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
        fake.script(Reply.say("raw"))
        part = file_part("application/zip", MIXED)
        client.chat.completions.create(model=PDF_MODEL, messages=ask(part))
        assert upstream_content(fake)[1] == part  # passed through untouched
        state = httpx.get(off.url + "/v1/scillm/health", headers={"authorization": f"Bearer {DEV_KEY}"}).json()
        assert state["middleware"]["files"]["enabled"] is False


# -- hostile payloads: budgets, overlaps, deadlines, callers that leave ------------------------------------------

BOMB = pdf_bomb()
OVERLAP = overlapping_zip()


def health_of(server: ServerThread) -> dict[str, Any]:
    response = httpx.get(server.url + "/v1/scillm/health", headers={"authorization": f"Bearer {DEV_KEY}"})
    return response.json()["middleware"]["files"]  # type: ignore[no-any-return]


def test_pdf_content_stream_bomb_is_refused_before_parsing(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    assert len(BOMB) < 12_000
    began = time.process_time()
    error = rejected(client, fake, ask(file_part("application/pdf", BOMB, "bomb.pdf")), model=TEXT_MODEL, status=413)
    assert error["code"] == "pdf_too_complex" and error["param"] == "$.messages[0].content[1]"
    assert "max_pdf_content_mb" in error["message"] and "$.messages[0].content[1]" in error["message"]
    assert time.process_time() - began < 5  # not parsed in this process either (it would take ~100 s)
    still_serving(client, fake, "after-pdf-bomb")


def test_overlapping_zip_entries_are_refused(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    assert len(OVERLAP) < 6000
    error = rejected(client, fake, ask(file_part("application/zip", OVERLAP, "overlap.zip")))
    assert error["code"] == "zip_bomb" and "overlap" in error["message"]
    assert error["param"] == "$.messages[0].content[1]"
    still_serving(client, fake, "after-overlap")


def test_the_archive_ratio_counts_every_entry_from_the_first_byte(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    archive = make_zip([(f"z{i}.txt", b" " * (200 << 10)) for i in range(40)])  # each entry below any floor
    error = rejected(client, fake, ask(file_part("application/zip", archive)))
    assert error["code"] == "zip_bomb" and "the archive inflates more than 100x" in error["message"]


def test_extracted_text_is_bounded_per_request(fake: FakeOpenAI, tmp_path: Any) -> None:
    app = make_app(env=env_for(fake), data_dir=tmp_path, config={"files": {"max_text_mb": 0.1}})
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=30)
        text = b"word " * 12_000  # 60 KB: one fits the 100 KiB budget, two do not
        error = rejected(client, fake, ask(file_part("text/plain", text, "a.txt"), file_part("text/plain", text)),
                         status=413)
        assert error["code"] == "text_too_large" and error["param"] == "$.messages[0].content[2]"
        zipped = make_zip([("a.txt", text), ("b.txt", text)])
        error = rejected(client, fake, ask(file_part("application/zip", zipped)), status=413)
        assert error["code"] == "text_too_large" and "'b.txt'" in error["message"]
        fake.script(Reply.say("one is fine"))
        client.chat.completions.create(model=PDF_MODEL, messages=ask(file_part("text/plain", text)))


@pytest.fixture
def costly(fake: FakeOpenAI, tmp_path: Any) -> Iterator[ServerThread]:
    """The PDF bomb passes the size budget here, so only CPU, deadlines and disconnects can stop it."""
    app = make_app(env=env_for(fake), data_dir=tmp_path,
                   config={"files": {"max_pdf_content_mb": 64, "max_file_cpu_s": 600, "workers": 1}})
    with ServerThread(app) as server:
        yield server


def test_cpu_budget_stops_a_costly_file_and_a_fresh_worker_takes_the_next(fake: FakeOpenAI, tmp_path: Any) -> None:
    app = make_app(env=env_for(fake), data_dir=tmp_path,
                   config={"files": {"max_pdf_content_mb": 64, "max_file_cpu_s": 0.5, "workers": 1}})
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=60)
        error = rejected(client, fake, ask(file_part("application/pdf", BOMB)), model=TEXT_MODEL, status=422)
        assert error["code"] == "file_too_complex" and "max_file_cpu_s" in error["message"]
        assert error["param"] == "$.messages[0].content[1]"
        workers = health_of(server)["workers"]
        assert workers["killed"] == 1 and workers["busy"] == 0 and workers["cpu_s"] < 5
        fake.script(Reply.say("report read"))
        client.chat.completions.create(model=TEXT_MODEL, messages=ask(file_part("application/pdf", REPORT)))
        assert "Quarterly revenue" in upstream_content(fake)
        assert health_of(server)["workers"]["started"] == 2


def test_the_request_deadline_bounds_file_work(costly: ServerThread, fake: FakeOpenAI) -> None:
    client = openai.OpenAI(base_url=costly.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=60)
    error = rejected(client, fake, ask(file_part("application/pdf", BOMB)), model=TEXT_MODEL, status=504,
                     timeout=1)
    assert error["code"] == "deadline_exceeded" and error["param"] == "$.messages[0].content[1]"
    workers = health_of(costly)["workers"]
    assert workers["killed"] == 1 and workers["busy"] == 0


def test_a_caller_that_leaves_stops_its_file_work(costly: ServerThread, fake: FakeOpenAI) -> None:
    leaving = openai.OpenAI(base_url=costly.url + "/v1", api_key=DEV_KEY, max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        leaving.chat.completions.create(model=TEXT_MODEL, messages=ask(file_part("application/pdf", BOMB)))
    deadline = time.monotonic() + 30  # the bomb alone would keep the worker busy for ~100 s
    while health_of(costly)["workers"]["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = health_of(costly)["workers"]
    assert workers["busy"] == 0 and workers["killed"] == 1 and workers["live"] == 0


# -- noisy neighbours: 8 callers with hostile files, one with a small valid request --------------------------------

AUTH = {"authorization": f"Bearer {DEV_KEY}"}


def chat_body(model: str, messages: list[dict[str, Any]], timeout: float | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": messages}
    if timeout:
        body["timeout"] = timeout
    return body


HOSTILE = [file_part("application/pdf", BOMB, "bomb.pdf")] * 4 + [file_part("application/zip", OVERLAP)] * 4


def test_eight_hostile_callers_refused_while_a_small_request_and_the_call_log_answer(fake: FakeOpenAI,
                                                                                      tmp_path: Any) -> None:
    fake.default = Reply.say("small answer")
    with ServerThread(make_app(env=env_for(fake), data_dir=tmp_path)) as server:
        async def main() -> tuple[list[httpx.Response], httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http:
                hostile = [asyncio.ensure_future(http.post("/v1/chat/completions", json=chat_body(
                    TEXT_MODEL, ask(part)))) for part in HOSTILE]
                small = await http.post("/v1/chat/completions", json=chat_body(
                    TEXT_MODEL, ask(file_part("application/pdf", REPORT, "q3.pdf")), timeout=20))
                calls = await http.get("/v1/scillm/calls")
                return list(await asyncio.gather(*hostile)), small, calls

        refused, small, calls = asyncio.run(main())
    fake.default = FakeOpenAI.default
    assert small.status_code == 200 and small.json()["choices"][0]["message"]["content"] == "small answer"
    assert calls.status_code == 200
    assert [(r.status_code, r.json()["error"]["code"]) for r in refused] == \
        [(413, "pdf_too_complex")] * 4 + [(400, "zip_bomb")] * 4
    assert all(r.json()["error"]["param"] == "$.messages[0].content[1]" for r in refused)


def test_costly_files_in_flight_never_hold_up_other_callers_and_leaving_stops_them(costly: ServerThread,
                                                                                   fake: FakeOpenAI) -> None:
    """The PDF bombs pass the size budget here (64 MiB) and get 600 s of CPU: only the pool and the callers bound
    them. Everything else still answers while they run, and once their callers leave the workers are freed."""
    async def main() -> None:
        async with httpx.AsyncClient(base_url=costly.url, headers=AUTH, timeout=60) as http:
            bombs = [asyncio.ensure_future(http.post("/v1/chat/completions", json=chat_body(
                TEXT_MODEL, ask(file_part("application/pdf", BOMB))))) for _ in range(8)]
            while (await asyncio.to_thread(health_of, costly))["workers"]["busy"] < 1:  # a bomb is being parsed
                await asyncio.sleep(0.02)
            fake.script(Reply.say("plain answer"))
            plain = await http.post("/v1/chat/completions", json=chat_body(
                TEXT_MODEL, [{"role": "user", "content": "no files"}], timeout=10))
            calls = await http.get("/v1/scillm/calls")
            late = await http.post("/v1/chat/completions", json=chat_body(  # queued behind the bombs
                TEXT_MODEL, ask(file_part("application/pdf", REPORT)), timeout=1))
            assert not any(bomb.done() for bomb in bombs)  # all of that happened while every bomb was in flight
            assert plain.status_code == 200 and plain.json()["choices"][0]["message"]["content"] == "plain answer"
            assert calls.status_code == 200
            assert late.status_code == 504 and late.json()["error"]["param"] == "$.messages[0].content[1]"
            for bomb in bombs:  # the callers leave
                bomb.cancel()
            await asyncio.gather(*bombs, return_exceptions=True)

    asyncio.run(main())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (health_of(costly)["workers"]["busy"] or health_of(costly)["in_flight"]):
        time.sleep(0.05)
    health = health_of(costly)
    assert health["workers"]["busy"] == 0 and health["workers"]["queued"] == 0 and health["in_flight"] == 0
    assert health["workers"]["killed"] >= 1
    calls = httpx.get(costly.url + "/v1/scillm/calls", headers=AUTH, timeout=10)
    assert calls.status_code == 200
