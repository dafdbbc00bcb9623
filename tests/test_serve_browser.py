"""The web page end to end in headless Chromium (Debian's /usr/bin/chromium, driven by playwright; no browser
download): a typed query and an uploaded image each fill the grid with thumbnails, in the API's order."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_serve import served_store, start_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]

from playwright.sync_api import sync_playwright  # noqa: E402


def test_chromium_is_installed() -> None:
    """The browser tests need Debian's chromium; a machine without it fails here (.ci/run installs it), never skips."""
    assert CHROMIUM.exists(), "Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium)"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    store, _ = served_store(root)
    process, base = start_server(store)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield root, base, browser
        finally:
            browser.close()
            process.terminate()
            process.wait(timeout=30)


def shown_results(page) -> list[dict]:
    """Once every thumbnail of the grid has loaded (or failed): each result's score, file name and decoded image width."""
    page.wait_for_function(
        "() => { const images = [...document.querySelectorAll('#results .result img')];"
        " return images.length > 0 && images.every(image => image.complete); }",
        timeout=60_000,
    )
    return page.eval_on_selector_all(
        "#results .result",
        "figures => figures.map(figure => ({score: figure.querySelector('.score').textContent,"
        " name: figure.querySelector('.name').textContent, width: figure.querySelector('img').naturalWidth}))",
    )


def typed_search(browser, base: str, query: str, count: str | None = None):
    """A new page at the site's start with ``query`` typed and submitted (``count`` results per page, if given)."""
    page = browser.new_page()
    page.goto(base + "/")
    if count is not None:
        page.fill("#count", count)
    page.fill("#query", query)
    page.press("#query", "Enter")
    return page


def api(base: str, path: str) -> list[dict]:
    with urllib.request.urlopen(base + path, timeout=60) as response:
        return json.loads(response.read())["results"]


def test_typed_query_shows_thumbnails_in_the_api_order(site):
    _, base, browser = site
    page = typed_search(browser, base, "a red circle", "6")
    shown = shown_results(page)
    expected = api(base, "/api/search?" + urllib.parse.urlencode({"q": "a red circle", "k": 6}))
    assert [item["name"] for item in shown] == [Path(hit["path"]).name for hit in expected]
    assert [item["score"] for item in shown] == [f"{hit['score']:.3f}" for hit in expected]
    # the thumbnails decoded (64 px pictures stay 64 px), except that of the link to a file outside the folder
    assert all(item["width"] == (0 if item["name"] == "link.png" else 64) for item in shown)
    assert "q=a+red+circle" in page.url
    page.close()


def test_uploaded_image_finds_itself_first(site):
    root, base, browser = site
    page = browser.new_page()
    page.goto(base + "/")
    page.set_input_files("#image-upload", str(root / "photos" / "img05.png"))
    shown = shown_results(page)
    assert shown[0]["name"] == "img05.png" and float(shown[0]["score"]) > 0.999
    assert "img05.png" in page.text_content("#status")
    page.close()


def test_an_error_is_shown_on_the_page(site):
    _, base, browser = site
    page = typed_search(browser, base, "dog +")
    page.wait_for_selector("#status.error", timeout=60_000)
    assert "empty term" in page.text_content("#status")
    page.close()


def test_image_search_clears_the_text_box_and_shows_the_uploaded_image(site):
    root, base, browser = site
    page = browser.new_page()
    page.goto(base + "/?q=a+red+circle")
    shown_results(page)
    assert page.input_value("#query") == "a red circle"
    page.set_input_files("#image-upload", str(root / "photos" / "img05.png"))
    page.wait_for_function("() => document.getElementById('status-text').textContent.includes('img05.png')", timeout=60_000)
    assert page.input_value("#query") == "" and "q=" not in page.url
    page.wait_for_function("() => { const p = document.getElementById('query-preview'); return !p.hidden && p.complete && p.naturalWidth > 0; }", timeout=60_000)
    assert page.eval_on_selector("#query-preview", "p => p.naturalWidth") == 64  # the uploaded picture itself
    page.close()


def test_an_error_clears_earlier_results(site):
    _, base, browser = site
    page = typed_search(browser, base, "a red circle")
    assert shown_results(page)
    page.fill("#query", "yellow - yellow")
    page.press("#query", "Enter")
    page.wait_for_selector("#status.error", timeout=60_000)
    assert page.eval_on_selector_all("#results .result", "figures => figures.length") == 0
    page.close()


def test_more_like_this_returns_the_clicked_image_first(site):
    _, base, browser = site
    page = typed_search(browser, base, "a blue square", "6")
    shown = shown_results(page)
    clicked = next(item["name"] for item in shown[1:] if item["width"])  # not the top hit, and a readable image
    page.click(f"#results .result:has(.name:text-is('{clicked}')) .more")
    page.wait_for_function(f"() => document.getElementById('status-text').textContent.includes('{clicked}')", timeout=60_000)
    again = shown_results(page)
    assert again[0]["name"] == clicked and float(again[0]["score"]) > 0.999
    page.close()


def test_more_results_pages_through_the_api_order_until_the_store_ends(site):
    _, base, browser = site
    page = typed_search(browser, base, "a green triangle", "6")
    first = shown_results(page)
    assert len(first) == 6 and page.is_visible("#more-results")
    page.click("#more-results")
    page.wait_for_function("() => document.querySelectorAll('#results .result').length === 12", timeout=60_000)
    second = shown_results(page)
    expected = api(base, "/api/search?" + urllib.parse.urlencode({"q": "a green triangle", "k": 12}))
    assert [item["name"] for item in second] == [Path(hit["path"]).name for hit in expected]
    assert second[:6] == first  # the next page follows the first, which stays as it was
    page.click("#more-results")  # 17 pictures: the third page is short, so there is no fourth
    page.wait_for_function("() => document.querySelectorAll('#results .result').length === 17", timeout=60_000)
    assert page.is_hidden("#more-results")
    page.close()
