"""Regenerate the pictures in docs/images from a trained demo model (run from the repository root):

    python docs/screenshots.py [--model runs/demo/model.safetensors]

- ``demo-retrievals.png``: the demo's example retrievals (``clipforge.demo.retrieval_grid``: queries with
  matches in the pool, hits framed green, misses red, recall@5 per query);
- ``page-start.png``, ``page-results.png``, ``page-error.png``: the search page (``clipforge serve``) over 256
  synthetic test images embedded with the model, on start, after a text query and after a query that cancels
  out, captured in headless Chromium (Debian's ``/usr/bin/chromium``, driven by playwright).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

import clipforge
from clipforge.data.synthetic import SyntheticWorld
from clipforge.demo import POOL, example_queries, relevance, retrieval_grid

IMAGES = Path(__file__).resolve().parent / "images"


def demo_retrievals(model: clipforge.CLIP) -> None:
    pool = [SyntheticWorld().sample("test", index) for index in range(POOL)]
    queries = example_queries([scene.metadata for scene in pool])
    retrieval_grid(model, queries, [scene.image for scene in pool], relevance(queries, pool), IMAGES / "demo-retrievals.png")


def serve(model_path: Path, root: Path, port: int = 8765) -> tuple[subprocess.Popen, str]:
    photos = root / "photos"
    photos.mkdir()
    for index in range(POOL):
        SyntheticWorld().sample("test", index).image.save(photos / f"test{index:03d}.png")
    cli = [sys.executable, "-m", "clipforge"]
    subprocess.run([*cli, "index", str(photos), "--model", str(model_path)], check=True, capture_output=True)
    server = subprocess.Popen([*cli, "serve", "--index", str(photos), "--port", str(port)], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{base}/api/health", timeout=2)
            return server, base
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not start")


def page_pictures(base: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(base + "/")
        page.wait_for_function("() => document.getElementById('status-text').textContent.includes('images')")
        page.screenshot(path=str(IMAGES / "page-start.png"))
        page.fill("#count", "12")
        page.fill("#query", "a red heart")
        page.press("#query", "Enter")
        page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete) && document.querySelectorAll('#results img').length")
        page.screenshot(path=str(IMAGES / "page-results.png"))
        page.fill("#query", "yellow - yellow")
        page.press("#query", "Enter")
        page.wait_for_selector("#status.error")
        page.screenshot(path=str(IMAGES / "page-error.png"))
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/demo/model.safetensors"))
    args = parser.parse_args()
    IMAGES.mkdir(exist_ok=True)
    demo_retrievals(clipforge.load(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        server, base = serve(args.model, Path(tmp))
        try:
            page_pictures(base)
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {', '.join(sorted(path.name for path in IMAGES.glob('*.png')))} in {IMAGES}")


if __name__ == "__main__":
    main()
