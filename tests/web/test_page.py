"""The web page in a real browser: headless Chromium, driven by selenium, against a real server.

One browser for the module and the shared server (the built-in model): the cat photo is
explained, its predictions, overlays, scores and the method comparison are read off the page, a
text file's refusal must show the server's own message, and a screenshot is saved under the
test's output. A small server with a token (the gated model) checks that the page asks for it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._support.servers import CAT_JPEG
from tests._support.tools import find_tool, require

pytestmark = pytest.mark.timeout(300)
WAIT_S = 180  # an explanation with scores on a busy 2-core CPU


def _browser_paths() -> tuple[str, str]:
    """Debian's chromium and chromium-driver; missing is a failure under CI, else a skip."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        require("the browser test needs Debian's chromium: run `make system-deps`")
    return str(chromium), find_tool("chromedriver", "chromium-driver")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1700",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(browser: Any, camserve_server: Any) -> Any:
    """The page, loaded from the server, its model and methods filled in."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"http://127.0.0.1:{camserve_server.server.http_port}/")
    WebDriverWait(browser, 60).until(
        lambda d: d.execute_script(
            "return document.querySelectorAll('#methods input').length > 0 "
            "&& document.querySelector('#layer').value !== ''"
        )
    )
    return browser


def _wait(driver: Any, script: str, timeout: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: d.execute_script(script))


def _idle(driver: Any) -> None:
    _wait(driver, "return !document.querySelector('#explain').disabled")


def _error_text(driver: Any) -> str:
    return str(
        driver.execute_script(
            "const e = document.querySelector('#error'); return e.hidden ? '' : e.textContent"
        )
    )


# Each overlay canvas: how many pixels it has and the spread of its values (0 = blank).
CANVAS_STATS = """
return [...document.querySelectorAll('canvas.overlay')].map((canvas) => {
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let sum = 0, squares = 0, count = 0;
  for (let i = 0; i < data.length; i += 4 * 7) {
    const v = (data[i] + data[i + 1] + data[i + 2]) / 3;
    sum += v; squares += v * v; count += 1;
  }
  const mean = sum / count;
  return {pixels: canvas.width * canvas.height, spread: Math.sqrt(squares / count - mean * mean),
          checksum: sum};
});
"""


def test_the_cat_is_explained_on_the_page(page: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    page.find_element(By.ID, "file").send_keys(str(CAT_JPEG))
    page.find_element(By.ID, "explain").click()
    _wait(
        page,
        "return document.querySelectorAll('#predictions-table tr').length > 1 || "
        "!document.querySelector('#error').hidden",
    )
    assert not _error_text(page)
    _idle(page)

    rows = page.find_elements(By.CSS_SELECTOR, "#predictions-table tr")
    top = rows[1].text
    assert "Egyptian cat" in top or "tabby" in top, top
    assert len(rows) == 1 + 5  # the header and the five predictions asked for

    stats = page.execute_script(CANVAS_STATS)
    methods = page.execute_script(
        "return [...document.querySelectorAll('canvas.overlay')].map(c => c.dataset.method)"
    )
    assert methods == ["gradcam", "layercam"]
    for canvas in stats:
        assert canvas["pixels"] == 451 * 300
        assert canvas["spread"] > 10, stats  # not blank

    cells = [cell.text for cell in page.find_elements(By.CSS_SELECTOR, "#scores-table td.score")]
    assert len(cells) == 2 * 3  # two methods x three scores
    assert all(0.0 <= abs(float(text)) <= 1.0 for text in cells), cells
    assert len(page.find_elements(By.CSS_SELECTOR, "canvas.curve")) == 2  # deletion, insertion

    page.find_element(By.ID, "raw").click()  # the map alone: the pixels change
    raw = page.execute_script(CANVAS_STATS)
    assert [c["checksum"] for c in raw] != [c["checksum"] for c in stats]
    page.find_element(By.ID, "raw").click()

    page.find_element(By.ID, "compare").click()
    _wait(
        page,
        "return document.querySelector('#compare-table') !== null || "
        "!document.querySelector('#error').hidden",
    )
    _idle(page)
    assert not _error_text(page)
    ranked = page.find_elements(By.CSS_SELECTOR, "#compare-table tr")
    assert sorted(row.text.split()[1] for row in ranked[1:]) == ["gradcam", "layercam"]
    assert len(page.find_elements(By.CSS_SELECTOR, "#compare-table td.best")) >= 3

    shot = tmp_path / "page.png"
    page.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_the_kernels_panel_draws_a_conv_layer(page: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    layers = Select(page.find_element(By.ID, "conv-layer"))
    assert layers.options[0].get_attribute("value") == "stem.0"
    layers.select_by_value("blocks.1._depthwise_conv")
    page.find_element(By.ID, "show-kernels").click()
    _wait(
        page,
        "const i = document.querySelector('#kernels-grid');return i.complete && i.naturalWidth > 0",
    )
    _idle(page)
    assert not _error_text(page)
    caption = page.find_element(By.ID, "kernels-caption").text
    assert caption.startswith("blocks.1._depthwise_conv: page 1 of 1, filters 0 to 95")
    size = page.execute_script(
        "const i = document.querySelector('#kernels-grid');return [i.naturalWidth, i.naturalHeight]"
    )
    assert size == [1 + 10 * 31, 1 + 10 * 31]  # 96 depthwise filters, 10 x 10, 3x3 at 10 px


def test_a_text_file_shows_the_servers_message(page: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo\n")
    page.find_element(By.ID, "file").send_keys(str(notes))
    page.find_element(By.ID, "explain").click()
    _wait(page, "return !document.querySelector('#error').hidden")
    _idle(page)
    message = _error_text(page)
    assert "400 INVALID_ARGUMENT" in message
    assert "images[0].encoded: not a decodable image; send JPEG, PNG or WebP" in message


def test_the_page_asks_for_the_token_and_sends_it_only_in_a_header(
    browser: Any, server_factory: Any
) -> None:
    from selenium.webdriver.common.by import By

    from camserve.server.settings import LimitsSettings
    from tests._support.servers import gated_settings

    guarded = server_factory(
        models=(gated_settings(),),
        limits=LimitsSettings(max_images_per_request=2),
        metrics_port=-1,
        auth_token="page-token",
    )
    browser.get(f"http://127.0.0.1:{guarded.server.http_port}/")
    _wait(browser, "return !document.querySelector('#token-form').hidden")
    assert "401 UNAUTHENTICATED: missing bearer token" in _error_text(browser)
    browser.find_element(By.ID, "token").send_keys("page-token")
    browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
    _wait(browser, "return document.querySelector('#model').value === 'gated'")
    assert not _error_text(browser)
    assert browser.execute_script("return document.querySelector('#token-form').hidden")
    assert "page-token" not in browser.current_url
