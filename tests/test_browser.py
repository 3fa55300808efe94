"""The playground in a real browser (issue 25): headless Chromium (Debian's `chromium` and `chromium-driver`)
driven by Selenium against a real `pasta serve --api-key` on 127.0.0.1 with a tiny model. Run with
`pytest -m browser`; CI does, in a bounded step. Without Chromium the tests skip, unless PASTA_REQUIRE_BROWSER=1
(CI sets it) makes that a failure. Screenshots go to $PASTA_SCREENSHOTS (default: the test's temporary folder)."""

import os
import shutil
from pathlib import Path

import pytest

from pastalm.lang.tags import promise_tag

from test_serve import client, start, stop

pytestmark = pytest.mark.browser

KEY = "playground-test-key"
FORCED = ("Three tips:\n1. " + promise_tag(None, 30) + "<async>Keep the same bedtime every night, weekends too, so "
          "the body clock settles.</async>\n2. " + promise_tag(None, 30) + "<async>Put screens away an hour before "
          "bed; their light keeps the brain awake.</async>\n3. " + promise_tag(None, 30) + "<async>Keep the room "
          "cool, dark and quiet.</async><sync/> Sleep well.")


def _chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        path = None
    if not (path and driver):
        if os.environ.get("PASTA_REQUIRE_BROWSER") == "1":
            pytest.fail("the browser test needs Chromium, its driver and selenium: apt-get install chromium "
                        "chromium-driver && pip install selenium")
        pytest.skip("no Chromium/chromedriver/selenium (apt-get install chromium chromium-driver; pip install "
                    "selenium)")
    return path, driver


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    path, driver = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = path
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        opts.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    b.set_script_timeout(60)
    try:
        yield b
    finally:
        b.quit()


@pytest.fixture(scope="module")
def server(folder):
    proc, url, _ = start(folder, "--max-tokens-limit", "1000", "--max-new-tokens", "200", "--api-key", KEY)
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture
def shots(tmp_path):
    d = Path(os.environ.get("PASTA_SCREENSHOTS") or tmp_path)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _wait(browser, script, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda b: b.execute_script(script))


def _runs(browser):
    return browser.execute_script("return window.pasta.runs")


def test_the_playground_asks_for_the_key_streams_threads_and_matches_the_api(browser, server, shots):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")
    # --api-key: the page holds no key; it asks for one, then sends it as a bearer token
    _wait(browser, "return !document.querySelector('#keybox').hidden")
    assert KEY not in browser.page_source
    assert browser.find_element(By.ID, "run").get_attribute("disabled")
    browser.find_element(By.ID, "key").send_keys(KEY)
    browser.find_element(By.ID, "savekey").click()
    _wait(browser, "return document.querySelector('#model').textContent === 'model: tiny'")

    prompt = "Give three tips to sleep better."
    prompt_box = browser.find_element(By.ID, "prompt")
    prompt_box.clear()
    prompt_box.send_keys(prompt)
    browser.find_element(By.CSS_SELECTOR, "#replay summary").click()
    browser.execute_script("document.querySelector('#force').value = arguments[0]", FORCED)
    browser.find_element(By.ID, "run").click()
    _wait(browser, "const r = window.pasta.runs; return r.pasta && r.pasta.done && r.sequential && "
                   "r.sequential.done")
    runs = _runs(browser)
    pasta, seq = runs["pasta"], runs["sequential"]
    assert pasta["error"] is None and seq["error"] is None
    # during the forced replay the three blocks were drawn as separate live regions at the same time
    assert pasta["maxLive"] >= 2 and pasta["blocks"] == 3
    assert pasta["figures"]["threads"] == 3 and seq["figures"]["threads"] == 0
    assert seq["maxLive"] == 0
    blocks = browser.find_elements(By.CSS_SELECTOR, "#pane-pasta .answer .block")
    assert [b.get_attribute("data-thread") for b in blocks] == ["1", "2", "3"]
    assert all(b.get_attribute("data-live") == "0" for b in blocks)  # all ended
    browser.save_screenshot(str(shots / "playground-forced.png"))

    # the final text equals the non-streamed API's, for both panes (the side-by-side switch was on)
    c = client(server, KEY)
    msgs = [{"role": "user", "content": prompt}]
    want = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=256, temperature=0, seed=0,
                                     extra_body={"pasta": {"force": FORCED}}).choices[0].message.content
    want_seq = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=256, temperature=0, seed=0,
                                         extra_body={"pasta": {"enabled": False, "force": FORCED}})
    assert pasta["text"] == want == "Three tips:\n1. Keep the same bedtime every night, weekends too, so the body " \
        "clock settles.\n2. Put screens away an hour before bed; their light keeps the brain awake.\n3. Keep the " \
        "room cool, dark and quiet. Sleep well."
    assert seq["text"] == want_seq.choices[0].message.content
    answer = browser.execute_script("return document.querySelector('#pane-pasta .answer').textContent")
    assert answer == want.replace("1. ", "1. t1", 1).replace("2. ", "2. t2", 1).replace("3. ", "3. t3", 1)
    figures = {e.get_attribute("data-figure"): e.text
               for e in browser.find_elements(By.CSS_SELECTOR, "#pane-pasta .figures dd")}
    assert figures["async threads"] == "3" and float(figures["rendered tokens / s"]) > 0


def test_the_side_by_side_switch_runs_pasta_alone(browser, server, shots):
    from selenium.webdriver.common.by import By

    browser.get(server + "/")  # the key is kept in this tab's session storage
    _wait(browser, "return document.querySelector('#model').textContent === 'model: tiny'")
    browser.find_element(By.ID, "side").click()  # off
    assert "single" in browser.find_element(By.ID, "panes").get_attribute("class")
    assert not browser.find_element(By.ID, "pane-sequential").is_displayed()
    browser.execute_script("document.querySelector('#force').value = ''; document.querySelector('#max_tokens')"
                           ".value = '24'")
    browser.find_element(By.ID, "run").click()
    _wait(browser, "const r = window.pasta.runs; return r.pasta && r.pasta.done")
    runs = _runs(browser)
    assert runs["pasta"]["error"] is None and runs["pasta"]["events"] >= 1
    assert "sequential" not in runs
    browser.save_screenshot(str(shots / "playground-free.png"))
