"""The search server: a FastAPI JSON API over one embedding store and its index, and a web page.

Routes (OpenAPI spec at ``/openapi.json``):

- ``GET /api/health``: store size, index, and the model that embeds the queries;
- ``GET /api/search?q=…&k=…``: text search with the weighted ``+``/``-`` syntax of
  ``clipforge.retrieval.query`` (text terms only: a request never names a file on the server); its
  ``Server-Timing`` header gives the milliseconds spent encoding the text and searching the index;
- ``POST /api/search/image``: search by an uploaded image (multipart field ``image``), optionally
  combined with text terms ``q``;
- ``GET /api/metadata/{id}``: a row's metadata;
- ``GET /api/image/{id}`` and ``GET /api/thumbnail/{id}``: the image of a row, and a JPEG thumbnail
  made on first request and kept in an LRU cache;
- ``GET /``: the page (``static/``).

Results look like clip-back's ``/knn-service`` answers (rom1504/clip-retrieval, ``clip_retrieval/clip_back.py``): the
metadata columns plus ``id`` and ``score``, and here the ``thumbnail`` and ``image`` URLs. Images are
served only from files under the store's roots (symlinks resolved, ``..`` refused); request bodies,
result counts and query lengths are limited; every error is JSON ``{"error": message}``.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations, which refer to
# ``create_app``'s arguments (such as ``max_k``), so they must be evaluated where the routes are defined.
import io
import mimetypes
import threading
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clipforge._util.imageio import open_image
from clipforge.data.formats.images import read_rgb_image
from clipforge.encode import Encoder
from clipforge.errors import ClipforgeError, InputError, one_line
from clipforge.retrieval.embed import store_info
from clipforge.retrieval.inputs import ImageItem
from clipforge.retrieval.query import QueryTerm, parse_query, query_vector
from clipforge.retrieval.search import SearchIndex

STATIC = Path(__file__).parent / "static"
MAX_QUERY_CHARS = 1000
MAX_UPLOAD_PIXELS = 24_000_000  # 6000 x 4000: a 24-megapixel photo; a query image is shrunk to the model's size anyway
DECODE_SLOTS = 2  # uploads decoded at once: memory stays below DECODE_SLOTS x MAX_UPLOAD_PIXELS x 4 bytes
THUMBNAIL_QUALITY = 85


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _validation_message(error: RequestValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("query", "body", "path"))
    return f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid request")


def _sniffed_type(data: bytes) -> str:
    """The media type of encoded image bytes (shard members carry no file name to guess it from)."""
    try:
        return Image.MIME.get(Image.open(io.BytesIO(data)).format, "application/octet-stream")
    except (OSError, SyntaxError, ValueError):
        return "application/octet-stream"


def _refuse_too_many_pixels(data: bytes, name: str, max_pixels: int) -> None:
    """A 413 for an upload whose header declares more than ``max_pixels`` pixels, before any is decoded (bytes
    that are not an image pass: decoding them says why, with a 415)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError as error:
        raise HTTPException(413, f"{name}: {one_line(error)}") from None
    except (OSError, SyntaxError, ValueError):
        return
    if width * height > max_pixels:
        raise HTTPException(413, f"{name}: {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}")


class BodyLimit:
    """ASGI middleware: a JSON 413 for request bodies over ``max_bytes``, declared or streamed (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"request body over the limit of {self.max_bytes:,} bytes"
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _error(413, too_large)(scope, receive, send)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited_receive, send)


class ImageAccess:
    """Resolves a store row to its image, refusing anything outside the store's roots."""

    def __init__(self, roots: list[str]) -> None:
        self.roots = [Path(root).resolve() for root in roots]

    def locate(self, row: dict[str, Any]) -> ImageItem:
        item = ImageItem.from_metadata(row)
        if ".." in Path(item.path).parts:
            raise HTTPException(403, f"row {row['id']}: its path contains '..'")
        resolved = Path(item.path).resolve()
        if not any(resolved.is_relative_to(root) for root in self.roots):
            raise HTTPException(403, f"row {row['id']}: its file is outside the indexed folders")
        if not resolved.is_file():
            raise HTTPException(404, f"row {row['id']}: its file is missing")
        return ImageItem(item.uid, str(resolved), item.caption, item.sample, item.offset, item.size)


def create_app(
    root: str | Path,
    model: Encoder,
    *,
    kind: str = "img",
    max_k: int = 100,
    max_upload_bytes: int = 10 << 20,
    max_upload_pixels: int = MAX_UPLOAD_PIXELS,
    decode_slots: int = DECODE_SLOTS,
    thumbnail_size: int = 256,
    cache_size: int = 2048,
    model_source: str | None = None,
) -> FastAPI:
    """The app serving the store at ``root`` (its ``kind`` index) with ``model`` encoding the queries;
    ``model_source`` says where ``model`` was loaded from (default: the model the store records).

    An upload is bounded three ways: its bytes (``max_upload_bytes``), its decoded pixels (``max_upload_pixels``,
    checked from the header before decoding), and how many are decoded and encoded at once (``decode_slots``;
    the others wait), so a burst of small files that decode to huge images cannot exhaust memory.
    """
    index = SearchIndex(root, kind)
    decoding = threading.BoundedSemaphore(decode_slots)
    info = store_info(root)
    access = ImageAccess(info.get("roots", []))
    model_name = Path(str(model_source or info.get("model", {}).get("source"))).name  # the file name: no server paths to clients
    app = FastAPI(
        title="clipforge search",
        description="Text and image search over an embedding store.",
    )
    app.add_middleware(BodyLimit, max_bytes=max_upload_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(error))

    @app.exception_handler(ClipforgeError)
    async def input_error(_: Request, error: ClipforgeError) -> JSONResponse:
        return _error(400, str(error))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(error).__name__}")

    @lru_cache(maxsize=cache_size)
    def text_vector(query: str) -> np.ndarray:
        return query_vector(model, parse_query(query, allow_images=False))

    def results(vector: np.ndarray, k: int) -> list[dict[str, Any]]:
        hits = index.results(vector, k)
        for hit in hits:
            hit.update(thumbnail=f"/api/thumbnail/{hit['id']}", image=f"/api/image/{hit['id']}")
        return hits

    def row(row_id: int) -> dict[str, Any]:
        if not 0 <= row_id < index.store.num_vectors:
            raise HTTPException(404, f"no row {row_id} (the store holds {index.store.num_vectors})")
        return {**index.store.metadata(np.array([row_id]))[0], "id": row_id}

    @lru_cache(maxsize=cache_size)
    def thumbnail(row_id: int) -> bytes:
        image = read_rgb_image(access.locate(row(row_id)).image_source())
        image.thumbnail((thumbnail_size, thumbnail_size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
        return buffer.getvalue()

    KParam = Annotated[int, Query(ge=1, le=max_k, description=f"number of results, at most {max_k}")]

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "vectors": index.store.num_vectors,
            "dim": index.store.dim,
            "index": index.spec.factory,
            "model": model_name,
            "max_k": max_k,
        }

    @app.get("/api/search")
    def search_text(
        q: Annotated[str, Query(min_length=1, max_length=MAX_QUERY_CHARS, description="e.g. '2:golden retriever + beach - night'")],
        response: Response,
        k: KParam = 10,
    ) -> dict[str, Any]:
        start = time.perf_counter()
        vector = text_vector(q)
        encoded = time.perf_counter()
        hits = results(vector, k)
        # W3C Server-Timing: where a request's time goes inside the server (text encoding vs the index)
        response.headers["Server-Timing"] = f"encode;dur={1e3 * (encoded - start):.2f}, search;dur={1e3 * (time.perf_counter() - encoded):.2f}"
        return {"query": q, "results": hits}

    @app.post("/api/search/image")
    def search_image(
        image: Annotated[UploadFile, File(description="an image file")],
        k: Annotated[int, Form(ge=1, le=max_k)] = 10,
        q: Annotated[str, Form(max_length=MAX_QUERY_CHARS, description="text terms to add, e.g. '+ night'")] = "",
    ) -> dict[str, Any]:
        text_terms = parse_query(q, allow_images=False) if q.strip() else []
        with decoding:
            data, name = image.file.read(), image.filename or "upload"
            _refuse_too_many_pixels(data, name, max_upload_pixels)
            try:
                picture = open_image(data, name=name, max_pixels=max_upload_pixels)
            except InputError as error:
                raise HTTPException(415, str(error)) from None
            vector = query_vector(model, [QueryTerm(1.0, image=picture), *text_terms])
        return {"query": q, "results": results(vector, k)}

    @app.get("/api/metadata/{row_id}")
    def metadata(row_id: int) -> dict[str, Any]:
        return {key: value for key, value in row(row_id).items() if not key.endswith("_bytes")}

    @app.get("/api/image/{row_id}")
    def original(row_id: int) -> Response:
        item = access.locate(row(row_id))
        if item.offset < 0:
            return FileResponse(item.path, media_type=mimetypes.guess_type(item.path)[0] or "application/octet-stream")
        data = item.read_bytes()
        return Response(data, media_type=_sniffed_type(data))

    @app.get("/api/thumbnail/{row_id}")
    def thumbnail_route(row_id: int) -> Response:
        return Response(thumbnail(row_id), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
