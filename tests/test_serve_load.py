"""Load on loopback: 50 concurrent clients against the server in a subprocess, with no errors; refusals of
``..`` paths, oversized and non-image uploads over real HTTP (no client-side URL normalisation)."""

from __future__ import annotations

import asyncio
import http.client
import random
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from test_serve import MAX_UPLOAD, served_store, start_server

CLIENTS = 50
WORDS = "red green blue yellow small large circle square triangle star two three left right top photo of a".split()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store, _ = served_store(tmp_path_factory.mktemp("load"))
    process, base = start_server(store)
    yield base
    process.terminate()
    process.wait(timeout=30)


async def _client(
    http: httpx.AsyncClient, seed: int, deadline: float, latencies: list[float], failures: list[str], server: list[dict]
) -> None:
    """One client: mostly varied text searches (so no cache answers them), some thumbnails and health checks;
    ``server`` collects the searches' Server-Timing (milliseconds encoding the text and searching the index)."""
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        roll = rng.random()
        if roll < 0.7:
            url, params = "/api/search", {"q": " ".join(rng.choices(WORDS, k=rng.randint(1, 6))), "k": rng.randint(1, 20)}
        elif roll < 0.9:
            url, params = f"/api/thumbnail/{rng.randrange(16)}", None
        else:
            url, params = "/api/health", None
        start = time.perf_counter()
        try:
            response = await http.get(url, params=params)
            if response.status_code != 200:
                failures.append(f"{url}: {response.status_code} {response.text[:200]}")
            elif "Server-Timing" in response.headers:
                server.append({name: float(value) for name, value in (part.split(";dur=") for part in response.headers["Server-Timing"].split(", "))})
        except httpx.HTTPError as error:
            failures.append(f"{url}: {type(error).__name__} {error}")
        latencies.append(time.perf_counter() - start)


async def _load(base: str, seconds: float) -> tuple[list[float], list[str], list[dict]]:
    latencies: list[float] = []
    failures: list[str] = []
    server: list[dict] = []
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as http:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(_client(http, seed, deadline, latencies, failures, server) for seed in range(CLIENTS)))
    return latencies, failures, server


@pytest.mark.parametrize("seconds", [3, pytest.param(30, marks=pytest.mark.slow)])
def test_concurrent_clients_get_no_errors(server, seconds, capsys):
    latencies, failures, timings = asyncio.run(_load(server, seconds))
    milliseconds = 1e3 * np.array(latencies)
    encode, search = (np.array([timing[part] for timing in timings]) for part in ("encode", "search"))
    with capsys.disabled():
        print(
            f"\nload: {CLIENTS} clients for {seconds} s: {len(latencies)} requests ({len(latencies) / seconds:.0f}/s), "
            f"latency p50 {np.percentile(milliseconds, 50):.1f} ms, p99 {np.percentile(milliseconds, 99):.1f} ms, "
            f"{len(failures)} errors; inside the server per search: encoding p50 {np.percentile(encode, 50):.1f} ms "
            f"(p99 {np.percentile(encode, 99):.1f}), index p50 {np.percentile(search, 50):.1f} ms (p99 {np.percentile(search, 99):.1f})"
        )
    assert failures == []
    assert len(latencies) >= CLIENTS and len(timings) > 0


def _raw(base: str, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, bytes]:
    """A request with ``path`` sent exactly as written."""
    address = urlsplit(base)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {}, encode_chunked=callable(getattr(body, "__next__", None)))
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.parametrize(
    "path",
    ["/static/../../../../etc/passwd", "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/api/image/../../../etc/passwd",
     "/../../etc/passwd", "/static/..%2f..%2f..%2fetc%2fpasswd"],
)
def test_dot_dot_paths_are_refused(server, path):
    status, body = _raw(server, "GET", path)
    assert 400 <= status < 500 and b"root:" not in body


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, dict]:
    boundary = "clipforgetestboundary"
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_huge_and_non_image_uploads_are_refused(server):
    body, headers = multipart("image", "huge.jpg", b"\xff" * (5 * MAX_UPLOAD))
    status, answer = _raw(server, "POST", "/api/search/image", body, headers)
    assert status == 413 and b"limit" in answer
    chunks = iter([body[i : i + 65_536] for i in range(0, len(body), 65_536)])
    status, answer = _raw(server, "POST", "/api/search/image", chunks, headers)  # chunked: no Content-Length
    assert status == 413 and b"limit" in answer
    body, headers = multipart("image", "notes.txt", b"just some text, not an image")
    status, answer = _raw(server, "POST", "/api/search/image", body, headers)
    assert status == 415 and b"notes.txt" in answer
