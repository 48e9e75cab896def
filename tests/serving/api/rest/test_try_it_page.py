"""The try-it page (``GET /``): same-origin only, and working in a real headless Chromium.

The browser test drives the page as a person would (pick a model, choose a photo)
against gunicorn on loopback, and holds what the page shows to what the API answers
for the same file.
"""

from __future__ import annotations

import os
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from serving.app import create_app
from tests.helpers import tiny_models
from tests.helpers.gateway import settings_for
from tests.helpers.photos import phone_jpeg, photo
from tests.helpers.servers import gunicorn, stop

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
#: The page's box colour (page.js BOX_COLOUR) as RGB.
BOX_RGB = (0xFF, 0x1F, 0x8E)
WAIT_S = 30


class _AssetRefs(HTMLParser):
    """Every ``src`` and ``href`` in a document."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def test_page_loads_only_same_origin_assets(tmp_path):
    base = tmp_path / "models"
    base.mkdir()
    app = create_app(settings_for("embedded", base))
    try:
        client = app.test_client()
        page = client.get("/")
        assert page.status_code == 200 and page.mimetype == "text/html"
        assert "default-src 'none'" in page.headers["Content-Security-Policy"]
        parser = _AssetRefs()
        parser.feed(page.get_data(as_text=True))
        assert len(parser.refs) == 2, parser.refs  # the script and the style sheet
        served = {}
        for ref in parser.refs:
            assert not re.match(r"(?:[a-z]+:)?//", ref, re.I), f"{ref} is not same-origin"
            asset = client.get(urljoin("/", ref))
            assert asset.status_code == 200, ref
            served[asset.mimetype] = asset.get_data(as_text=True)
        assert set(served) == {"text/javascript", "text/css"}
        for text in [page.get_data(as_text=True), *served.values()]:
            assert not re.search(r"https?://", text)
    finally:
        app.extensions["imgserve"].close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """gunicorn on loopback serving ``tiny_classifier`` and ``tiny_detector``."""
    tmp = tmp_path_factory.mktemp("try_it")
    base = tiny_models.build_repository(tmp / "models")
    proc, url, _ = gunicorn(base, tmp, workers="1")
    yield url
    stop(proc)


@pytest.fixture
def browser():
    """Debian's headless Chromium through its own chromedriver (no Selenium Manager lookup)."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver)"
        )

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=900,1300")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def _post(url: str, endpoint: str, model: str, path: Path) -> requests.Response:
    files = {"image": (path.name, path.read_bytes())}
    return requests.post(f"{url}/v1/{endpoint}", params={"model": model}, files=files, timeout=30)


def _wait_result(driver, model: str, photo_name: str):
    """The result section once the page shows ``model``'s answer for ``photo_name``."""
    result = driver.find_element(By.ID, "result")

    def shown(_) -> bool:
        state = result.get_attribute("data-state")
        if state == "error":
            raise AssertionError(driver.find_element(By.ID, "error").text)
        return (
            state == "done"
            and result.get_attribute("data-model") == model
            and result.get_attribute("data-photo") == photo_name
        )

    WebDriverWait(driver, WAIT_S).until(shown)
    return result


def _edge_middles(box: dict, scale: float, width: int, height: int) -> list[tuple[int, int]]:
    """The middle of each edge of ``box`` in canvas pixels (inside the canvas: an edge on
    the photo's border is drawn just inside it)."""
    left, right = box["xmin"] * scale, box["xmax"] * scale
    top, bottom = box["ymin"] * scale, box["ymax"] * scale
    x_mid, y_mid = (left + right) / 2, (top + bottom) / 2
    points = [(left, y_mid), (right, y_mid), (x_mid, top), (x_mid, bottom)]
    return [(min(int(x), width - 1), min(int(y), height - 1)) for x, y in points]


def _canvas_pixel(driver, x: float, y: float) -> tuple[int, int, int]:
    rgba = driver.execute_script(
        "return Array.from(document.getElementById('view').getContext('2d')"
        ".getImageData(arguments[0], arguments[1], 1, 1).data);",
        int(x),
        int(y),
    )
    return tuple(rgba[:3])


@pytest.mark.slow
def test_page_shows_what_the_api_answers(gateway, browser, tmp_path):
    cat = tmp_path / "chelsea.png"
    photo("chelsea.png").save(cat)
    # A 12 MP phone photo stored sideways (EXIF orientation 6): the page must turn it
    # upright as the gateway does, and scale it and its boxes down to fit.
    sideways = tmp_path / "phone.jpg"
    sideways.write_bytes(phone_jpeg())
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("not a photo")

    browser.get(gateway + "/")
    select = browser.find_element(By.ID, "model")
    WebDriverWait(browser, WAIT_S).until(lambda _: select.is_enabled())
    file_input = browser.find_element(By.ID, "file")

    # A classifier: its top class and version, as the API gives them for the same file.
    Select(select).select_by_value(tiny_models.CLASSIFIER)
    file_input.send_keys(str(cat))
    result = _wait_result(browser, tiny_models.CLASSIFIER, cat.name)
    direct = _post(gateway, "classify", tiny_models.CLASSIFIER, cat).json()
    top = direct["predictions"][0]["classes"][0]
    assert result.get_attribute("data-top") == top["label"]
    assert result.get_attribute("data-version") == str(direct["model"]["version"])
    answered = browser.find_element(By.ID, "answered").text
    assert f"{tiny_models.CLASSIFIER} version {direct['model']['version']}" in answered
    items = browser.find_elements(By.CSS_SELECTOR, "#classes li")
    assert len(items) == len(direct["predictions"][0]["classes"])
    assert items[0].text == f"{top['label']} {top['score']:.3f}"

    # A format the gateway reads and Chromium cannot show: the answer, and a note instead.
    tiff = tmp_path / "chelsea.tiff"
    photo("chelsea.png").save(tiff)
    file_input.send_keys(str(tiff))
    result = _wait_result(browser, tiny_models.CLASSIFIER, tiff.name)
    direct = _post(gateway, "classify", tiny_models.CLASSIFIER, tiff).json()
    assert result.get_attribute("data-top") == direct["predictions"][0]["classes"][0]["label"]
    assert not browser.find_element(By.ID, "view").is_displayed()
    assert "cannot show this image" in browser.find_element(By.ID, "note").text

    # A detector: as many boxes as the API finds, drawn where the API's upright pixel
    # coordinates say once scaled to the canvas.
    Select(select).select_by_value(tiny_models.DETECTOR)
    _wait_result(browser, tiny_models.DETECTOR, tiff.name)  # the photo already chosen
    file_input.send_keys(str(sideways))
    result = _wait_result(browser, tiny_models.DETECTOR, sideways.name)
    direct = _post(gateway, "detect", tiny_models.DETECTOR, sideways).json()["predictions"][0]
    assert direct["detections"]
    assert result.get_attribute("data-boxes") == str(len(direct["detections"]))
    canvas = browser.find_element(By.ID, "view")
    width, height = (int(canvas.get_attribute(a)) for a in ("width", "height"))
    scale = width / direct["width"]
    assert scale < 1
    # Sideways (unturned) by the page, the canvas would be 4:3 where the API's photo is 3:4.
    assert abs(height - direct["height"] * scale) <= 1, (
        "the page and the API disagree on orientation"
    )
    for d in direct["detections"]:
        for x, y in _edge_middles(d["box"], scale, width, height):
            pixel = _canvas_pixel(browser, x, y)
            assert all(abs(p - b) <= 40 for p, b in zip(pixel, BOX_RGB, strict=True)), (d, x, y)
    assert not browser.find_element(By.ID, "note").is_displayed()

    shot = Path(os.environ.get("IMGSERVE_SCREENSHOT", tmp_path / "try-it.png"))
    assert browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")

    # The gateway's problem+json, shown readably.
    file_input.send_keys(str(not_an_image))
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, WAIT_S).until(lambda _: error.is_displayed())
    problem = _post(gateway, "detect", tiny_models.DETECTOR, not_an_image).json()
    assert error.get_attribute("data-status") == str(problem["status"])
    assert problem["title"] in error.text and problem["detail"] in error.text
    assert f"code: {problem['code']}" in error.text
