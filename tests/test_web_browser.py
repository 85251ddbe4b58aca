"""The chat page in a real browser: Debian's chromium driven by Selenium, on the bundled demo model.

Set QWENVL_WEB_SCREENSHOT=docs/web-ui.png to save the page with its grounded answer (the README's picture).
"""
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
    pytest.skip("no browser installed: apt-get install chromium chromium-driver", allow_module_level=True)
pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from qwenvl import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from qwenvl.boxes import parse_boxes  # noqa: E402
from qwenvl.chat import chat_stream  # noqa: E402
from qwenvl.cli import build_parser  # noqa: E402
from qwenvl.demo import DEMO_MODEL  # noqa: E402
from qwenvl.engine import LLMEngine  # noqa: E402
from qwenvl.serve.bench import LocalServer  # noqa: E402
from qwenvl.serve.cli import build  # noqa: E402
from qwenvl.serve.web_chat import shown  # noqa: E402
from qwenvl.serve.webui import web_app  # noqa: E402

SHAPES = str(Path(__file__).parent.parent / "examples" / "shapes.png")
QUESTION = "Output the bounding box of the red circle."
WAIT = 60

# every text the newest answer bubble shows, in order (the page's streaming, seen from the browser)
RECORD_TEXTS = """
window.texts = [];
new MutationObserver(() => {
  const m = document.querySelectorAll('#chat [data-testid="bot"] .message-content');
  const t = m.length ? m[m.length - 1].innerText.trim() : null;
  if (t !== null && window.texts[window.texts.length - 1] !== t) window.texts.push(t);
}).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
"""


@pytest.fixture(scope="module")
def demo():
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, fp32=True)
    query = tokenizer.from_list_format([{"image": SHAPES}, {"text": QUESTION}])
    answer = list(chat_stream(model, tokenizer, query, do_sample=False))[-1]  # the page's default is greedy
    assert parse_boxes(answer), f"the demo model's answer has no box to draw: {answer!r}"
    return model, tokenizer, answer


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="qwenvl-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1280,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def until(driver, check, what: str, timeout: float = WAIT):
    return WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: check(), message=f"the page never showed {what}")


# read in one script each: the chat re-renders while it streams, so elements found earlier can go stale
def bot_texts(driver) -> list[str]:
    return driver.execute_script("""return [...document.querySelectorAll(
        '#chat [data-testid="bot"] .message-content')].map(e => e.innerText.trim())""")


def drawings(driver) -> list[str]:
    return driver.execute_script("""return [...document.querySelectorAll('#chat [data-testid="bot"] img')]
        .map(e => e.src).filter(s => s.includes('drawing-'))""")


def user_messages(driver) -> int:
    return driver.execute_script("""return document.querySelectorAll('#chat [data-testid="user"]').length""")


def upload(driver, path: str) -> None:
    driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(path)


def ask(driver, question: str) -> None:
    until(driver, lambda: driver.find_element(By.CSS_SELECTOR, "#question textarea").is_enabled(),
          "the question box enabled")
    driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
    driver.find_element(By.ID, "send").click()


def page_says(driver, words: str) -> bool:
    return words in driver.find_element(By.TAG_NAME, "body").text


def open_page(driver, url: str) -> None:
    driver.get(url)
    until(driver, lambda: driver.find_elements(By.CSS_SELECTOR, "#question textarea"), "the question box")


def stop(driver, server) -> None:
    driver.get("about:blank")  # the page's open event stream would hold uvicorn's graceful shutdown
    server.stop()


def test_upload_ask_stream_draw_regenerate_undo_clear(browser, demo):
    model, tokenizer, answer = demo
    engine = LLMEngine(model, max_num_seqs=2)
    step = engine.step
    engine.step = lambda: (time.sleep(0.03), step())  # slow enough that the browser sees the text grow
    server = LocalServer(web_app(engine, tokenizer, "demo_model"))
    try:
        open_page(browser, server.url)
        browser.execute_script(RECORD_TEXTS)
        upload(browser, SHAPES)
        until(browser, lambda: user_messages(browser) == 1, "the uploaded picture")
        ask(browser, QUESTION)
        # text and drawing arrive in separate updates: wait for both
        until(browser, lambda: bot_texts(browser) == [shown(answer)] and drawings(browser), "the answer and drawing")
        texts = browser.execute_script("return window.texts")
        assert len(texts) >= 2 and texts[-1] == shown(answer), texts
        assert all(new.startswith(old) for old, new in zip(texts, texts[1:])), texts  # a growing text
        if os.environ.get("QWENVL_WEB_SCREENSHOT"):
            browser.save_screenshot(os.environ["QWENVL_WEB_SCREENSHOT"])
        first_drawing = drawings(browser)

        browser.find_element(By.ID, "regenerate").click()
        until(browser, lambda: drawings(browser) and drawings(browser) != first_drawing
              and bot_texts(browser) == [shown(answer)], "the regenerated answer and its new drawing")

        ask(browser, "How many shapes are there?")
        until(browser, lambda: len(bot_texts(browser)) == 2 and browser.find_element(
            By.CSS_SELECTOR, "#question textarea").is_enabled(), "the second answer")
        browser.find_element(By.ID, "undo").click()
        until(browser, lambda: len(bot_texts(browser)) == 1, "the chat without the second turn")
        box = browser.find_element(By.CSS_SELECTOR, "#question textarea")
        assert box.get_attribute("value") == "How many shapes are there?"  # back in the box, to edit

        browser.find_element(By.ID, "clear").click()
        until(browser, lambda: user_messages(browser) == 0 and not bot_texts(browser), "an empty chat")
    finally:
        stop(browser, server)


def test_bad_uploads_show_a_message_and_the_page_goes_on(browser, demo, tmp_path):
    model, tokenizer, answer = demo
    notes = tmp_path / "notes.png"
    notes.write_text("these are notes, not a picture")
    big = tmp_path / "big.png"
    Image.new("RGB", (1200, 1000), "white").save(big)
    args = build_parser().parse_args(["serve", "--ui", "--max-num-seqs", "2", "--max-image-pixels", "1000000"])
    args.model = "demo_model"
    server = LocalServer(build(model, tokenizer, args))
    try:
        open_page(browser, server.url + "/ui/")
        upload(browser, str(notes))
        until(browser, lambda: page_says(browser, "image notes.png is not a readable picture"), "the refusal")
        upload(browser, str(big))
        until(browser, lambda: page_says(browser, "big.png is 1200x1000 = 1200000 pixels"), "the pixel limit")
        assert user_messages(browser) == 0  # neither joined the chat
        upload(browser, SHAPES)
        until(browser, lambda: user_messages(browser) == 1, "the good picture")
        ask(browser, QUESTION)
        until(browser, lambda: bot_texts(browser) == [shown(answer)] and drawings(browser), "the answer and drawing")
        assert httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"] == "demo_model"
    finally:
        stop(browser, server)
