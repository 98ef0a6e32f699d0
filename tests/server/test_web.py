"""The web page in headless Chromium (Debian `chromium` + `chromium-driver`, driven by Selenium)
against the gateway and a real Triton server.

The page is used as a person would: type a prompt, pick settings, click Generate; the progress
bar is fed by the server-sent events, and the images land in the grid. A screenshot of the
result goes to /tmp/ldm-web.png.
"""
from __future__ import annotations

import base64
import contextlib
import io
import tempfile

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from server.gateway import GatewaySettings
from tests.server.serving import running_gateway

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PROMPT = "a red circle in the top left"
SCREENSHOT = "/tmp/ldm-web.png"


@contextlib.contextmanager
def browser_driver():
    """Headless Chromium with a profile of its own, quit afterwards."""
    options = Options()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,900"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.set_page_load_timeout(30)
        try:
            yield driver
        finally:
            driver.quit()


@pytest.fixture(scope="module")
def browser():
    with browser_driver() as driver:
        yield driver


def wait(driver, condition, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    # Ready once the status pill says so and the size list comes from the served model.
    wait(driver, lambda d: d.find_element(By.ID, "status-text").text == "ready")
    wait(driver, lambda d: [o.get_attribute("value") for o in
                            Select(d.find_element(By.ID, "size")).options] == ["16x16"])


def set_range(driver, element_id: str, value) -> None:
    driver.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input'));", element_id, value)


def result_images(driver) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#grid img.result")


def decode_data_url(src: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(src[len(prefix):]))) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_generate_from_the_page(browser, gateway):
    open_page(browser, gateway)
    assert [o.text for o in Select(browser.find_element(By.ID, "sampler")).options] == [
        "ddim", "plms", "dpmpp_2m", "ddpm"]
    # One served model: the picker holds it (test_multi_model.py picks between two).
    assert [o.text for o in Select(browser.find_element(By.ID, "model")).options] == ["ldm"]
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    browser.find_element(By.ID, "negative").send_keys("blurry")
    set_range(browser, "steps", 12)
    set_range(browser, "guidance", 6)
    Select(browser.find_element(By.ID, "n")).select_by_value("2")
    browser.find_element(By.ID, "seed").send_keys("5")
    assert browser.find_element(By.ID, "steps-value").text == "12"
    browser.find_element(By.ID, "generate").click()

    wait(browser, lambda d: len(result_images(d)) == 2 and all(
        d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", im)
        for im in result_images(d)))
    images = result_images(browser)
    sizes = [browser.execute_script("return [arguments[0].naturalWidth, "
                                    "arguments[0].naturalHeight]", im) for im in images]
    assert sizes == [[16, 16], [16, 16]]
    pixels = np.stack([decode_data_url(im.get_attribute("src")) for im in images])
    assert pixels.shape == (2, 16, 16, 3)

    # The progress bar saw every step, in order (DDIM may add one step to the 12 asked).
    steps = [int(s) for s in browser.find_element(By.ID, "progress").get_attribute(
        "data-steps").split(",")]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 12
    assert browser.find_element(By.ID, "progress").get_attribute("hidden") is not None
    meta = browser.find_element(By.CSS_SELECTOR, "#grid .batch-meta").text
    assert "ldm" in meta and "seed 5" in meta and "12 steps" in meta and "16 × 16" in meta
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None

    # The page sent what the form showed: the API gives the same pixels for the same request.
    body = httpx.post(gateway + "/v1/images/generations", timeout=60, json={
        "prompt": PROMPT, "negative_prompt": "blurry", "steps": 12, "guidance_scale": 6.0,
        "n": 2, "seed": 5, "sampler": "ddim", "size": "16x16"}).json()
    want = np.stack([decode_data_url("data:image/png;base64," + d["b64_json"])
                     for d in body["data"]])
    np.testing.assert_array_equal(pixels, want)
    browser.save_screenshot(SCREENSHOT)


def test_server_errors_are_shown(browser, gateway):
    open_page(browser, gateway)
    browser.find_element(By.ID, "prompt").send_keys(PROMPT)
    # A size the model does not serve, as a crafted request would send it.
    browser.execute_script(
        "const s = document.getElementById('size'); s.add(new Option('17 x 17', '17x17'));"
        "s.value = '17x17';")
    browser.find_element(By.ID, "generate").click()
    error = browser.find_element(By.ID, "error")
    wait(browser, lambda d: error.is_displayed())
    assert "height 17 is not supported by this model; allowed: 16" in error.text
    assert browser.find_element(By.ID, "generate").is_enabled()


def test_the_page_asks_for_an_api_key(browser, triton):
    settings = GatewaySettings(triton_url=triton.grpc_url, api_keys=frozenset({"s3cret"}),
                               timeout=60)
    with running_gateway(settings) as url:
        browser.get(url + "/")
        dialog = browser.find_element(By.ID, "key-dialog")
        wait(browser, lambda d: dialog.is_displayed())
        assert "missing API key" in browser.find_element(By.ID, "key-message").text
        browser.find_element(By.ID, "key-input").send_keys("s3cret")
        dialog.find_element(By.CSS_SELECTOR, "button[value=save]").click()
        wait(browser, lambda d: not dialog.is_displayed())
        wait(browser, lambda d: [o.get_attribute("value") for o in
                                 Select(d.find_element(By.ID, "size")).options] == ["16x16"])
        browser.find_element(By.ID, "prompt").send_keys(PROMPT)
        set_range(browser, "steps", 3)
        browser.find_element(By.ID, "generate").click()
        wait(browser, lambda d: len(result_images(d)) == 1)
        assert decode_data_url(result_images(browser)[0].get_attribute("src")).shape == (
            16, 16, 3)
        assert "has-key" in browser.find_element(By.ID, "key-button").get_attribute("class")
