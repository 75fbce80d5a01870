"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium (chromedriver), in a
loopback-only network namespace with a real scillm and fake upstreams. A screenshot of each page is kept under
``test-artifacts/ui/`` (or ``$SCILLM_TEST_ARTIFACTS/ui``)."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from selenium import webdriver
from selenium.common.exceptions import ElementNotInteractableException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from scillm_core.testing import FakeOpenAI, Reply, ServerThread, make_app
from scillm_core.testing.netns import loopback_only

ROOT = Path(__file__).resolve().parents[4]
ARTIFACTS = Path(os.environ.get("SCILLM_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "ui"
MASTER_KEY = "sk-ui-master-key-0123456789abcdef"
OPENAI_KEY = "sk-ui-openai-secret-0123456789"
DEEPSEEK_KEY = "sk-ui-deepseek-secret-0123456789"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2"> hello'
WAIT_S = 30  # bound of every wait for the page to show something (a failure, never a timing assertion)


class GatedOpenAI(FakeOpenAI):
    """Answers prompts that contain ``wait`` only once ``gate`` is set (batch progress can be seen moving)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.responder = lambda request: Reply(text="gated answer", headers={"x-gated": "1"}) if "wait" in str(
            request.body) else None

    async def pause(self, reply: Reply) -> None:
        if reply.headers.get("x-gated"):
            while not self.gate.is_set():
                await asyncio.sleep(0.02)
        await super().pause(reply)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One namespace for the module: fakes, scillm and the browser see only loopback."""
    with loopback_only(), GatedOpenAI() as main, FakeOpenAI() as flaky:
        env = {"SCILLM_MASTER_KEY": MASTER_KEY, "OPENAI_API_KEY": OPENAI_KEY, "OPENAI_API_BASE": main.url + "/v1",
               "DEEPSEEK_API_KEY": DEEPSEEK_KEY, "DEEPSEEK_API_BASE": flaky.url + "/v1"}
        config = {"ui": {"refresh_s": 0.3},
                  "resilience": {"max_retries": 0, "breaker_threshold": 2, "breaker_cooldown_s": 600}}
        app = make_app(env=env, config=config, data_dir=tmp_path_factory.mktemp("ui-data"))
        with ServerThread(app) as server:
            profile = tempfile.mkdtemp(prefix="scillm-chromium-")
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--window-size=1440,1000", f"--user-data-dir={profile}"):
                options.add_argument(flag)
            driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
            try:
                yield {"server": server, "driver": driver, "main": main, "flaky": flaky}
            finally:
                driver.quit()
                shutil.rmtree(profile, ignore_errors=True)


def _shot(driver: WebDriver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def _text(driver: WebDriver, css: str) -> str:
    try:
        return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, css))
    except StaleElementReferenceException:  # re-rendered under us: read again on the next poll
        return ""


def _until(driver: WebDriver, css: str, wanted: str) -> str:
    """The text of ``css`` once it shows ``wanted``: the text that did (the page re-renders on every poll, so a read
    after the wait may find the element replaced and read nothing)."""
    seen = [""]

    def shows(d: WebDriver) -> bool:
        seen[0] = _text(d, css)
        return wanted in seen[0]

    WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(shows, f"{css} never showed {wanted!r}")
    return seen[0]


def _click(driver: WebDriver, css: str) -> None:
    """Click what ``css`` finds; the page re-renders its tables on every poll, so a found row may go stale."""

    def clicked(d: WebDriver) -> bool:
        try:
            d.find_element(By.CSS_SELECTOR, css).click()
            return True
        except (StaleElementReferenceException, ElementNotInteractableException):
            return False

    WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(clicked, f"could not click {css}")


def _login(driver: WebDriver, server: ServerThread, key: str) -> None:
    driver.get(server.url + "/ui")
    WebDriverWait(driver, WAIT_S).until(lambda d: d.find_element(By.ID, "login-form").is_displayed())
    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()


def _tab(driver: WebDriver, name: str) -> None:
    _click(driver, f"#tabs button[data-tab={name}]")


def _client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=MASTER_KEY, max_retries=0)


def test_the_page_loads_without_a_key_and_a_wrong_key_gets_no_data(world: dict[str, Any]) -> None:
    server, driver = world["server"], world["driver"]
    _client(server).chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    page = httpx.get(server.url + "/ui")
    assert page.status_code == 200 and "login-form" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for secret in (MASTER_KEY, OPENAI_KEY, world["main"].url, "gpt-4o-mini"):
        assert secret not in page.text  # the page itself holds no data
    for key in (None, "sk-wrong-key-0000000000"):
        headers = {"authorization": f"Bearer {key}"} if key else {}
        for path in ("summary", "calls", "batches", "runs", "series"):
            answer = httpx.get(f"{server.url}/v1/scillm/ui/{path}", headers=headers)
            assert answer.status_code == 401 and set(answer.json()) == {"error"}
    _login(world["driver"], server, "sk-wrong-key-0000000000")
    assert "not accepted" in _until(driver, "#login-error", "not accepted")
    assert not driver.find_element(By.ID, "app").is_displayed()
    assert driver.find_elements(By.CSS_SELECTOR, "#providers tbody tr") == []
    assert driver.execute_script("return document.body.innerHTML.includes('sk-wrong-key')") is False
    _shot(driver, "login")


def test_a_provider_goes_from_closed_to_open_when_its_upstream_fails(world: dict[str, Any]) -> None:
    server, driver, flaky = world["server"], world["driver"], world["flaky"]
    _login(driver, server, MASTER_KEY)
    row = "#providers tr[data-provider=deepseek]"
    _until(driver, f"{row} .circuit", "closed")
    _until(driver, f"{row} .status", "healthy")
    assert driver.execute_script("return document.body.innerHTML.includes(arguments[0])", MASTER_KEY) is False
    flaky.default = Reply.fail(503, "upstream overloaded")
    try:
        for _ in range(2):
            with pytest.raises(openai.APIStatusError):
                _client(server).chat.completions.create(model="deepseek/deepseek-chat",
                                                        messages=[{"role": "user", "content": "x"}])
        _until(driver, f"{row} .circuit", "open")
        _until(driver, f"{row} .status", "down")
        assert "deepseek/deepseek-chat" in _until(driver, "#transitions", "deepseek/deepseek-chat")
        _until(driver, f"{row} .deployments", "open")
    finally:
        flaky.default = FakeOpenAI.default
    _shot(driver, "providers")


def test_a_prompt_with_script_is_rendered_as_text(world: dict[str, Any]) -> None:
    server, driver = world["server"], world["driver"]
    _client(server).chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": HOSTILE}],
                                            extra_headers={"x-caller-skill": "<b>bold-caller</b>"})
    _login(driver, server, MASTER_KEY)
    _tab(driver, "calls")
    _until(driver, "#calls tbody", "<b>bold-caller</b>")
    driver.find_element(By.CSS_SELECTOR, "#filter-caller").send_keys("bold-caller")
    WebDriverWait(driver, WAIT_S).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#calls tbody tr")) == 1)
    _click(driver, "#calls tbody tr")
    prompt = _until(driver, "#call-detail .prompt", "<script>")
    assert HOSTILE in prompt
    assert driver.execute_script("return window.__pwned") is None
    assert driver.find_elements(By.CSS_SELECTOR, "#call-detail script, #call-detail img, #calls b") == []
    _until(driver, "#call-detail .answer", "Hello from the fake")
    _shot(driver, "calls")


def test_a_batch_shows_its_progress_until_done(world: dict[str, Any]) -> None:
    server, driver, main = world["server"], world["driver"], world["main"]
    _login(driver, server, MASTER_KEY)
    _tab(driver, "batches")
    body = {"model": "openai/gpt-4o-mini", "batch_id": "ui-batch",
            "items": [{"item_id": "first", "prompt": "go"}] + [
                {"item_id": f"later-{n}", "prompt": f"please wait {n}"} for n in range(3)]}
    answer: dict[str, Any] = {}

    def post() -> None:
        answer["response"] = httpx.post(server.url + "/v1/scillm/batch/completions", json=body, timeout=60,
                                        headers={"authorization": f"Bearer {MASTER_KEY}"})

    poster = threading.Thread(target=post)
    poster.start()
    try:
        row = "#batches tr[data-batch=ui-batch]"
        _until(driver, f"{row} .progress-text", "1 / 4")
        _until(driver, f"{row} .batch-status", "running")
        _shot(driver, "batches-running")
    finally:
        main.gate.set()
        poster.join(60)
    assert answer["response"].status_code == 200 and answer["response"].json()["completed"] == 4
    _until(driver, f"{row} .progress-text", "4 / 4")
    assert "done" in _until(driver, f"{row} .batch-status", "done")
    _shot(driver, "batches")


def test_runs_show_their_live_events_and_charts_draw(world: dict[str, Any]) -> None:
    server, driver = world["server"], world["driver"]
    nodes = [{"id": "ask", "profile": "llm-call", "prompt": "say ok", "model": "openai/gpt-4o-mini"}]
    graph = httpx.post(server.url + "/v1/scillm/exec/graph", json={"nodes": nodes}, timeout=60,
                       headers={"authorization": f"Bearer {MASTER_KEY}", "x-caller-skill": "ui-tests"})
    assert graph.status_code == 200 and graph.json()["status"] == "completed"
    run_id = graph.json()["nodes"][0]["run_id"]
    _login(driver, server, MASTER_KEY)
    _tab(driver, "runs")
    row = f"#runs tr[data-run='run:{run_id}']"
    _until(driver, f"{row} .run-status", "completed")
    _until(driver, "#runs tbody", "exec graph")
    _click(driver, row)
    events = _until(driver, "#run-events", "response")
    assert "request" in events
    _shot(driver, "runs")
    _tab(driver, "charts")
    WebDriverWait(driver, WAIT_S).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#charts svg")) == 4)
    lines = driver.find_elements(By.CSS_SELECTOR, "#charts .chart[data-metric=p95_ms] polyline")
    assert "openai/gpt-4o-mini" in {line.get_attribute("data-series") for line in lines}
    assert "openai/gpt-4o-mini" in _until(driver, "#chart-legend", "openai/gpt-4o-mini")
    _shot(driver, "charts")
