"""The search server in-process (FastAPI's TestClient): results against a numpy brute force over the store,
thumbnails, limits, JSON errors, which files may be served, and what ``clipforge serve`` refuses before it starts.

``served_store``, ``tiny_model_file`` and ``start_server`` are shared with the query, load and browser tests.
"""

from __future__ import annotations

import dataclasses
import io
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from conftest import run_cli
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient
from PIL import Image

import clipforge
from clipforge.data.synthetic import SyntheticWorld
from clipforge.models.clip import CLIP
from clipforge.retrieval import EmbeddingStore, SearchIndex
from clipforge.retrieval.embed import embed_to_store, model_reference
from clipforge.serve import create_app
from clipforge.serve.app import ImageAccess

MAX_K = 20
MAX_UPLOAD = 200_000


def tiny_model_file(path: Path, seed: int, embed_dim: int | None = None) -> Path:
    """The ``synthetic-tiny`` model with seeded random weights (and embeddings of ``embed_dim`` if given), saved at ``path``."""
    config = clipforge.get_model_config("synthetic-tiny")
    torch.manual_seed(seed)
    clipforge.save(CLIP(dataclasses.replace(config, embed_dim=embed_dim or config.embed_dim)).eval(), path)
    return path


def served_store(root: Path, count: int = 16) -> tuple[Path, Path]:
    """A tiny model and an indexed store of ``count`` synthetic pictures under ``root/photos``;
    ``photos/link.png`` is a symbolic link to a picture outside the folder. Returns (store, model file)."""
    model_path = tiny_model_file(root / "tiny.safetensors", seed=3)
    world = SyntheticWorld()
    photos = root / "photos"
    photos.mkdir(parents=True)
    for index in range(count):
        world.sample("train", index).image.save(photos / f"img{index:02d}.png")
    (root / "outside").mkdir()
    world.sample("train", 99).image.save(root / "outside" / "secret.png")
    (photos / "link.png").symlink_to(root / "outside" / "secret.png")
    reference = model_reference(str(model_path), None, None, "fp32")
    embed_to_store(clipforge.load(model_path), reference, [photos], root / "store", workers=0, progress=False)
    SearchIndex.build(root / "store", progress=False)
    return root / "store", model_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SERVER = """
import sys
from clipforge.retrieval.embed import load_model, store_info
from clipforge.serve import serve
store, port = sys.argv[1], int(sys.argv[2])
serve(store, load_model(store_info(store)["model"]), port=port, max_k={max_k}, max_upload_bytes={max_upload})
"""


def start_server(store: Path, timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """``clipforge.serve.serve`` in a subprocess on a free loopback port; returns it and its base URL once healthy."""
    port = free_port()
    script = SERVER.format(max_k=MAX_K, max_upload=MAX_UPLOAD)
    process = subprocess.Popen([sys.executable, "-c", script, str(store), str(port)], stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{base}/api/health", timeout=2) as response:
                if response.status == 200:
                    return process, base
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become healthy in time")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    store, model_path = served_store(root)
    model = clipforge.load(model_path)
    client = TestClient(create_app(store, model, max_k=MAX_K, max_upload_bytes=MAX_UPLOAD))
    return root, store, model, client


def brute_force(store: Path, query: np.ndarray, k: int) -> tuple[list[int], np.ndarray]:
    vectors = EmbeddingStore(store).load_embeddings("img").astype(np.float64)
    scores = vectors @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return order.tolist(), scores[order]


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_text_search_matches_brute_force(setup):
    _, store, model, client = setup
    response = client.get("/api/search", params={"q": "2:a red circle - a blue square", "k": 5})
    assert response.status_code == 200
    hits = response.json()["results"]
    with torch.no_grad():
        texts = model.encode_text(model.tokenize(["a red circle", "a blue square"]), normalize=True).numpy().astype(np.float64)
    query = 2 * texts[0] - texts[1]
    ids, scores = brute_force(store, query / np.linalg.norm(query), 5)
    assert [hit["id"] for hit in hits] == ids
    np.testing.assert_allclose([hit["score"] for hit in hits], scores, atol=1e-5)
    assert all(hit["thumbnail"] == f"/api/thumbnail/{hit['id']}" and hit["path"].endswith(".png") for hit in hits)


def test_search_reports_its_server_time_and_refuses_self_cancelling_queries(setup):
    _, _, _, client = setup
    start = time.perf_counter()
    response = client.get("/api/search", params={"q": "a green triangle on the left", "k": 3})
    elapsed_ms = 1e3 * (time.perf_counter() - start)
    timing = dict(part.strip().split(";dur=") for part in response.headers["Server-Timing"].split(","))
    assert set(timing) == {"encode", "search"}
    assert 0 < float(timing["encode"]) and 0 <= float(timing["search"]) and float(timing["encode"]) + float(timing["search"]) < elapsed_ms
    response = client.get("/api/search", params={"q": "yellow - yellow"})
    assert response.status_code == 400 and "cancel out" in response.json()["error"]


def test_image_upload_search_finds_the_same_picture_first(setup):
    root, store, model, client = setup
    data = (root / "photos" / "img07.png").read_bytes()
    response = client.post("/api/search/image", files={"image": ("query.png", data, "image/png")}, data={"k": "3"})
    assert response.status_code == 200, response.text
    hits = response.json()["results"]
    with torch.no_grad():
        query = model.encode_image(model.preprocess(Image.open(io.BytesIO(data)))[None], normalize=True).numpy()[0]
    assert [hit["id"] for hit in hits] == brute_force(store, query.astype(np.float64), 3)[0]
    assert Path(hits[0]["path"]).name == "img07.png" and hits[0]["score"] > 0.999


def test_thumbnail_image_metadata_health_page_and_openapi(setup):
    root, store, _, client = setup
    row = EmbeddingStore(store).metadata(np.array([4]))[0]
    thumbnail = client.get("/api/thumbnail/4")
    assert thumbnail.headers["content-type"] == "image/jpeg"
    small = Image.open(io.BytesIO(thumbnail.content))
    assert small.format == "JPEG" and small.size == (64, 64)  # smaller than 256 px: kept at its size
    original = Image.open(row["path"]).convert("RGB")
    assert np.abs(np.asarray(small, np.int16) - np.asarray(original, np.int16)).mean() < 4  # JPEG of the same pixels
    image = client.get("/api/image/4")
    assert image.headers["content-type"] == "image/png" and image.content == Path(row["path"]).read_bytes()
    assert client.get("/api/metadata/4").json() == {**row, "id": 4}
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["vectors"] == 17 and health["index"] == "Flat"
    assert "/" not in health["model"] and health["model"].endswith(".safetensors")  # a file name, not a server path
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text and 'id="image-upload"' in page.text
    assert client.get("/static/app.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/search/image", "/api/thumbnail/{row_id}", "/api/health"} <= set(paths)


@pytest.mark.parametrize(
    "request_args,status,needle",
    [
        (("GET", "/api/search", {"params": {"q": "dog", "k": MAX_K + 1}}), 422, "less than or equal to 20"),
        (("GET", "/api/search", {"params": {"q": "x" * 1001}}), 422, "q:"),
        (("GET", "/api/search", {"params": {"q": "dog +"}}), 400, "empty term"),
        (("GET", "/api/search", {"params": {"q": "nan:dog"}}), 400, "not a finite number"),
        (("GET", "/api/search", {"params": {"q": "dog + inf:cat"}}), 400, "not a finite number"),
        (("GET", "/api/search", {"params": {"q": "1e400:dog"}}), 400, "not a finite number"),
        (("GET", "/api/metadata/999", {}), 404, "no row 999"),
        (("GET", "/api/thumbnail/-1", {}), 404, "no row -1"),
        (("GET", "/api/nothing", {}), 404, "Not Found"),
        (("POST", "/api/search/image", {"files": {"image": ("notes.txt", b"hello", "text/plain")}}), 415, "notes.txt"),
        (("POST", "/api/search/image", {"files": {"image": ("big.png", b"0" * (MAX_UPLOAD + 1), "image/png")}}), 413, "limit"),
    ],
)
def test_bad_requests_get_json_errors(setup, request_args, status, needle):
    method, url, kwargs = request_args
    response = setup[3].request(method, url, **kwargs)
    assert response.status_code == status
    assert needle in response.json()["error"]


@pytest.mark.parametrize(("max_pixels", "status"), [(64 * 64 - 1, 413), (64 * 64, 200)])
def test_an_upload_over_the_pixel_limit_is_too_large(setup, max_pixels, status):
    root, store, model, _ = setup
    client = TestClient(create_app(store, model, max_upload_pixels=max_pixels))
    data = (root / "photos" / "img07.png").read_bytes()  # 64 x 64 pixels
    response = client.post("/api/search/image", files={"image": ("query.png", data, "image/png")})
    assert response.status_code == status
    if status == 413:
        assert "query.png" in response.json()["error"] and "4,096 pixels" in response.json()["error"]


def test_a_streamed_upload_over_the_limit_is_cut_off(setup):
    def chunks():
        for _ in range(MAX_UPLOAD // 10_000 + 2):
            yield b"0" * 10_000

    response = setup[3].post("/api/search/image", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "limit" in response.json()["error"]


def test_only_files_under_the_roots_are_served(setup):
    root, store, _, client = setup
    rows = EmbeddingStore(store).metadata(np.arange(17))
    link = next(row for row in rows if row["path"].endswith("link.png"))
    row_id = rows.index(link)
    response = client.get(f"/api/image/{row_id}")
    assert response.status_code == 403 and "outside" in response.json()["error"]
    assert client.get(f"/api/thumbnail/{row_id}").status_code == 403
    for url in ("/static/../../outside/secret.png", "/static/%2e%2e/%2e%2e/outside/secret.png", "/api/image/..%2F..%2Foutside"):
        assert client.get(url).status_code in (400, 403, 404)
    access = ImageAccess([str(root / "photos")])
    with pytest.raises(HTTPException) as refused:
        access.locate({"id": 0, "uid": "x", "path": f"{root}/photos/../outside/secret.png"})
    assert refused.value.status_code == 403
    assert access.locate({"id": 1, "uid": "y", "path": f"{root}/photos/img01.png"}).path == str((root / "photos" / "img01.png").resolve())


@pytest.fixture
def started(monkeypatch) -> list[FastAPI]:
    """The apps ``clipforge serve`` went on to serve, with uvicorn's serving loop replaced by recording the app."""
    apps = []

    def record(server, sockets=None):
        apps.append(server.config.app)
        server.started = True  # as the real loop sets it (uvicorn.run exits with status 3 otherwise)

    monkeypatch.setattr(uvicorn.Server, "run", record)
    return apps


def test_serve_names_the_model_it_loads_and_notes_another_one(setup, tmp_path, capsys, started):
    _, store, _, _ = setup
    other = tiny_model_file(tmp_path / "other.safetensors", seed=4)
    code, _, err = run_cli(capsys, "serve", "--index", store, "--model", other, "--port", free_port())
    assert code == 0 and len(started) == 1, err
    notes = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and str(other) in notes[0] and str(store.parent / "tiny.safetensors") in notes[0]
    assert "serving" in err.splitlines()[-1]
    assert TestClient(started[0]).get("/api/health").json()["model"] == "other.safetensors"


@pytest.fixture
def busy_port():
    """A port something else already listens on."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize("case", ["narrower model", "bad upload size", "port in use", "unknown kind"])
def test_serve_refuses_in_one_line_before_announcing(setup, tmp_path, capsys, started, busy_port, case):
    _, store, _, _ = setup
    narrow = tiny_model_file(tmp_path / "narrow.safetensors", seed=5, embed_dim=64)
    options, names = {
        "narrower model": (["--model", narrow], [str(narrow), str(store.parent / "tiny.safetensors")]),
        "bad upload size": (["--max-upload", "lots"], ["--max-upload"]),
        "port in use": (["--port", busy_port], [str(busy_port)]),
        "unknown kind": (["--kind", "text2"], ["text2", "img, text"]),
    }[case]
    code, out, err = run_cli(capsys, "serve", "--index", store, "--port", free_port(), *options)
    assert code == 2 and not started and not out
    assert err.count("\n") == 1 and err.startswith("error:") and all(name in err for name in names), err
    if case == "narrower model":
        assert sorted(re.findall(r"(\d+)-dimensional", err)) == ["128", "64"]
    if case == "unknown kind":
        assert "clipforge index" not in err  # no command to run with a kind that does not exist
