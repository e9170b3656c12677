"""The web page at `/` in a real browser: Debian's Chromium driven by Selenium, against a live
uvicorn server on loopback running the real digits model on the CPU.

Selenium Manager is never used (it would try the network): the driver and the browser are
given by path, and `SE_MANAGER_PATH=/bin/false` turns any accidental call into an error. The
tests skip where `chromium` / `chromium-driver` are not installed, unless
`MARCHE_REQUIRE_BROWSER=1` (CI), where that fails. Each test ends by checking the browser's
console: no errors, no CSP violations (only the HTTP errors a test provokes on purpose)."""

from __future__ import annotations

import base64
import io
import os
import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from PIL import Image

from service.http.app import build_app
from service.settings import ServiceSettings
from tests.servers import free_port
from tests.stub_engine import StubEngine

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:  # a dev install has it; CI (MARCHE_REQUIRE_BROWSER=1) must not skip
    if os.environ.get("MARCHE_REQUIRE_BROWSER") == "1":
        raise
    pytest.skip("selenium not installed", allow_module_level=True)

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
STEPS = "8"  # few decoding steps keep the runs short; previews come every 4th step
WAIT_S = 90  # a run on a busy 2-core machine
API_KEY = "web-test-key"
CSP_DIRECTIVES = (
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "img-src 'self' data:",
    "connect-src 'self'", "frame-ancestors 'none'", "base-uri 'none'", "form-action 'none'",
)  # fmt: skip
pytestmark = pytest.mark.slow


def _browser_missing() -> str | None:
    missing = [p for p in (CHROMIUM, DRIVER) if not os.access(p, os.X_OK)]
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed (apt: chromium chromium-driver)"


class LiveServer:
    """`build_app` under uvicorn in a thread (uvicorn skips signal handlers off the main
    thread), on a free loopback port."""

    def __init__(self, client: object = None, **settings: object) -> None:
        app = build_app(ServiceSettings(device="cpu", warmup=False, **settings), client=client)
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with LiveServer(api_key=None) as live:
        yield live.url


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[str]:
    with LiveServer(api_key=API_KEY) as live:
        yield live.url


@pytest.fixture(scope="module")
def busy_server() -> Iterator[str]:
    """One image at a time, no room for paused ones, and one request waiting at most: a third
    request gets 503."""
    with LiveServer(api_key=None, max_batch_size=1, pause_rows=0, queue_size=1) as live:
        yield live.url


@pytest.fixture(scope="module")
def imagenet_server() -> Iterator[str]:
    """MAR-B's 1000 ImageNet classes before an engine that answers at once (a flat image)."""
    engine = StubEngine(model="mar_base", size=64, classes=1000)
    with LiveServer(client=engine, model="mar_base") as live:
        yield live.url


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    if (why := _browser_missing()) is not None:
        if os.environ.get("MARCHE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"MARCHE_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    profile = tmp_path_factory.mktemp("chromium")
    saved = os.environ.get("SE_MANAGER_PATH")
    os.environ["SE_MANAGER_PATH"] = "/bin/false"  # never Selenium Manager (no network)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-extensions",
                f"--user-data-dir={profile / 'profile'}"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = ChromeService(executable_path=DRIVER, log_output=str(profile / "chromedriver.log"))
    drv = webdriver.Chrome(options=opts, service=service)
    drv.set_script_timeout(30)
    yield drv
    drv.quit()
    if saved is None:
        os.environ.pop("SE_MANAGER_PATH", None)
    else:
        os.environ["SE_MANAGER_PATH"] = saved


def console_problems(drv: webdriver.Chrome, allowed_statuses: tuple[int, ...] = ()) -> list[str]:
    """SEVERE console entries (JS errors, CSP violations), less the failed loads of the
    statuses a test provokes on purpose (Chromium logs every 4xx fetch as an error)."""
    problems = []
    for entry in drv.get_log("browser"):
        if entry["level"] != "SEVERE":
            continue
        status = re.search(r"status of (\d{3})", entry["message"])
        if entry.get("source") == "network" and status and int(status[1]) in allowed_statuses:
            continue
        problems.append(entry["message"])
    return problems


@pytest.fixture
def expected_errors() -> set[int]:
    """HTTP statuses a test provokes on purpose (their failed loads may be in the console)."""
    return set()


@pytest.fixture
def page(
    driver: webdriver.Chrome, server: str, expected_errors: set[int]
) -> Iterator[webdriver.Chrome]:
    """The page, loaded fresh in a 1280 px window; the console is checked at the end."""
    driver.set_window_size(1280, 900)
    driver.get("about:blank")
    driver.get_log("browser")  # drop what earlier tests left
    open_page(driver, server)
    yield driver
    assert console_problems(driver, tuple(expected_errors)) == []


def open_page(drv: webdriver.Chrome, url: str) -> None:
    drv.execute_script("try { sessionStorage.clear() } catch (e) {}")
    drv.get(url + "/")
    wait(drv, 30).until(lambda d: d.execute_script("return document.body.dataset.ready") == "true")


def wait(drv: webdriver.Chrome, seconds: float = WAIT_S) -> WebDriverWait:
    return WebDriverWait(drv, seconds)


def fill(drv: webdriver.Chrome, **fields: str) -> None:
    for name, value in fields.items():
        if name == "mode":
            Select(drv.find_element(By.ID, "mode")).select_by_value(value)
            continue
        box = drv.find_element(By.ID, name.replace("_", "-"))
        box.clear()
        box.send_keys(value)


def final_images(drv: webdriver.Chrome, card: str = "#result .card") -> list:
    return drv.find_elements(By.CSS_SELECTOR, f"{card} img.final")


def decoded_size(drv: webdriver.Chrome, img) -> tuple[int, int]:
    """The image's size as the browser decoded it, checked against the PNG itself."""
    wait(drv, 10).until(lambda d: d.execute_script("return arguments[0].complete", img))
    width, height = drv.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img
    )
    src = img.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as png:
        assert png.size == (width, height)
    return width, height


def image_size(url: str) -> int:
    return httpx.get(url + "/info", timeout=30).json()["image_size"]


def error_text(drv: webdriver.Chrome) -> str:
    box = wait(drv).until(EC.visibility_of_element_located((By.ID, "error")))
    return box.text


def test_page_is_served_with_a_strict_csp_and_stays_out_of_the_schema(server):
    page = httpx.get(server + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    for directive in CSP_DIRECTIVES:
        assert directive in csp
    assert '<link rel="icon" href="data:,">' in page.text
    assert not re.search(r"https?://", page.text), "the page must load nothing from elsewhere"
    for name, media in (
        ("app.js", "text/javascript"),
        ("api.js", "text/javascript"),
        ("app.css", "text/css"),
    ):
        answer = httpx.get(f"{server}/static/{name}", timeout=30)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(media)
        assert not re.search(r"https?://", answer.text)
    assert httpx.get(server + "/static/nope.js", timeout=30).status_code == 404
    paths = httpx.get(server + "/openapi.json", timeout=30).json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)


def test_generate_streams_previews_then_the_final_image(page, server):
    assert page.find_elements(By.CSS_SELECTOR, "#class-list option"), "datalist not filled"
    fill(page, class_name="7", mode="marche", steps=STEPS, seed="3", cfg="4")
    page.find_element(By.ID, "go").click()
    wait(page).until(lambda d: final_images(d))
    card = page.find_element(By.CSS_SELECTOR, "#result .card")
    assert card.get_attribute("data-state") == "done"
    assert int(card.get_attribute("data-previews")) >= 1, "no preview shown while generating"
    size = image_size(server)
    [img] = final_images(page)
    assert decoded_size(page, img) == (size, size)
    assert page.execute_script("return getComputedStyle(arguments[0]).imageRendering", img) == (
        "pixelated"
    )
    assert img.size["width"] >= 4 * size  # shown scaled up, not at 32 px
    timings = card.find_element(By.CSS_SELECTOR, ".timings").text
    assert re.search(r"generation\s+\d+\.\d+ s", timings), timings
    assert re.search(r"seed\s+3\b", timings), timings
    assert page.find_element(By.ID, "error").is_displayed() is False


def test_a_class_typed_by_name_and_several_images(page, server):
    fill(page, class_name="seven", steps=STEPS, seed="10", count="3")
    page.find_element(By.ID, "go").click()
    wait(page).until(lambda d: len(final_images(d)) == 3)
    size = image_size(server)
    assert all(decoded_size(page, img) == (size, size) for img in final_images(page))
    timings = page.find_element(By.CSS_SELECTOR, "#result .timings").text
    assert re.search(r"seed\s+10.12\b", timings), timings


def test_compare_runs_every_mode_with_its_time_and_speedup(page, server):
    fill(page, class_name="3", steps=STEPS, seed="5")
    page.find_element(By.ID, "compare").click()
    wait(page).until(lambda d: len(final_images(d)) == 3)
    cards = page.find_elements(By.CSS_SELECTOR, "#result .card")
    assert [c.find_element(By.CSS_SELECTOR, ".card-title").text for c in cards] == [
        "mar", "marche", "turbo"]  # fmt: skip
    size = image_size(server)
    for card in cards:
        assert card.get_attribute("data-state") == "done"
        assert decoded_size(page, card.find_element(By.CSS_SELECTOR, "img.final")) == (size, size)
        timings = card.find_element(By.CSS_SELECTOR, ".timings").text
        assert re.search(r"generation\s+\d+\.\d+ s", timings), timings
        assert re.search(r"seed\s+5\b", timings), timings  # the same seed in every mode
    badges = [c.find_element(By.CSS_SELECTOR, ".badge").text for c in cards]
    assert badges[0] == "baseline"
    assert all(re.fullmatch(r"×\d+\.\d\d vs mar", b) for b in badges[1:]), badges
    # the three cards side by side at this width
    tops = {c.rect["y"] for c in cards}
    assert len(tops) == 1


def test_an_out_of_range_field_shows_the_servers_message(page, expected_errors):
    expected_errors.add(422)
    fill(page, class_name="1", steps=STEPS, cfg="99")
    page.find_element(By.ID, "go").click()
    text = error_text(page)
    assert "cfg" in text and "50" in text, text
    assert not final_images(page)


def test_an_unknown_class_name_shows_suggestions(page, expected_errors):
    expected_errors.add(422)
    fill(page, class_name="sevn", steps=STEPS)
    page.find_element(By.ID, "go").click()
    text = error_text(page)
    assert "sevn" in text, text
    suggestions = page.find_elements(By.CSS_SELECTOR, "#error .suggestion")
    assert "7" in [s.text for s in suggestions], text
    # a suggestion fills the field; generating then works
    next(s for s in suggestions if s.text == "7").click()
    assert page.find_element(By.ID, "class-name").get_attribute("value") == "7"
    page.find_element(By.ID, "go").click()
    wait(page).until(lambda d: final_images(d))


def test_a_name_two_classes_share_offers_each_by_id(driver, imagenet_server):
    driver.set_window_size(1280, 900)
    driver.get("about:blank")
    driver.get_log("browser")
    open_page(driver, imagenet_server)
    fill(driver, class_name="crane")
    driver.find_element(By.ID, "go").click()
    text = error_text(driver)
    assert "ambiguous" in text, text
    buttons = driver.find_elements(By.CSS_SELECTOR, "#error .suggestion")
    assert [b.text for b in buttons] == ["crane bird (134)", "crane (517)"]
    buttons[0].click()  # by id: the name alone would be ambiguous again
    assert driver.find_element(By.ID, "class-name").get_attribute("value") == "134"
    driver.find_element(By.ID, "go").click()
    wait(driver).until(lambda d: final_images(d))
    assert decoded_size(driver, final_images(driver)[0]) == (64, 64)
    assert console_problems(driver, allowed_statuses=(422,)) == []


def test_a_full_queue_shows_server_busy_with_the_retry_delay(driver, busy_server):
    driver.set_window_size(1280, 900)
    driver.get("about:blank")
    driver.get_log("browser")
    open_page(driver, busy_server)
    long_run = {"class_id": 1, "steps": 256, "seed": 0}
    with httpx.Client(base_url=busy_server, timeout=60) as http:
        with http.stream("POST", "/generate/stream", json=long_run) as running:
            assert running.status_code == 200
            events = running.iter_lines()  # kept: a dropped iterator closes the stream
            next(events)  # its first step ran: it holds the only batch slot
            with http.stream("POST", "/generate/stream", json=long_run) as waiting:
                assert waiting.status_code == 200  # admitted: the queue is now full
                fill(driver, class_name="4", steps=STEPS)
                driver.find_element(By.ID, "go").click()
                text = error_text(driver)
        # leaving the streams drops both jobs
    assert re.search(r"Server busy, retry in \d+ s", text), text
    assert not final_images(driver)
    assert console_problems(driver, allowed_statuses=(503,)) == []


def test_the_page_asks_for_the_api_key_then_generates(driver, keyed_server):
    driver.set_window_size(1280, 900)
    driver.get("about:blank")
    driver.get_log("browser")
    open_page(driver, keyed_server)
    assert not driver.find_element(By.ID, "key-panel").is_displayed()
    fill(driver, class_name="2", steps=STEPS, seed="1")
    driver.find_element(By.ID, "go").click()
    panel = wait(driver, 30).until(EC.visibility_of_element_located((By.ID, "key-panel")))
    assert "API key" in panel.text
    fill(driver, api_key="not-the-key")
    driver.find_element(By.ID, "key-save").click()
    wait(driver, 30).until(
        lambda d: (
            "not accepted" in d.find_element(By.ID, "key-message").text
            and d.find_element(By.ID, "key-panel").is_displayed()
        )
    )
    fill(driver, api_key=API_KEY)
    driver.find_element(By.ID, "key-save").click()
    wait(driver).until(lambda d: final_images(d))
    assert not driver.find_element(By.ID, "key-panel").is_displayed()
    assert driver.execute_script("return sessionStorage.getItem('marche-api-key')") == API_KEY
    assert API_KEY not in driver.current_url
    # the next run sends the kept key at once: no prompt
    driver.find_element(By.ID, "go").click()
    wait(driver).until(
        lambda d: (
            d.find_element(By.CSS_SELECTOR, "#result .card").get_attribute("data-state") == "done"
        )
    )
    assert not driver.find_element(By.ID, "key-panel").is_displayed()
    assert console_problems(driver, allowed_statuses=(401,)) == []


def test_a_phone_width_window_stacks_without_horizontal_overflow(page):
    page.set_window_size(390, 844)
    fill(page, class_name="8", steps=STEPS, seed="2", count="4")
    page.find_element(By.ID, "compare").click()
    wait(page).until(lambda d: len(final_images(d)) == 12)
    width = page.execute_script("return document.documentElement.clientWidth")
    assert width <= 420  # the viewport really is phone-sized
    overflow = page.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 0, f"{overflow} px of horizontal overflow at {width} px"
    cards = page.find_elements(By.CSS_SELECTOR, "#result .card")
    xs = {c.rect["x"] for c in cards}
    assert len(xs) == 1, "compare cards should stack in one column"
    sticking_out = page.execute_script(
        """const w = document.documentElement.clientWidth;
        return [...document.body.querySelectorAll("*")]
          .filter((e) => e.getClientRects().length && e.getBoundingClientRect().right > w + 1)
          .map((e) => e.tagName + "." + e.className);"""
    )
    assert sticking_out == []
