"""HTTP API and web page over an embedding store (see ``clipforge.serve.app``).

    from clipforge.serve import create_app, serve
    serve("emb/", model, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipforge.encode import Encoder
from clipforge.retrieval.query import parse_query, query_vector
from clipforge.serve.app import create_app

__all__ = ["create_app", "serve"]


def serve(root: str | Path, model: Encoder, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Run the app with uvicorn until interrupted; ``options`` go to ``create_app``.

    Requests are answered concurrently by a thread pool, so torch and faiss each use one thread per
    request: splitting one small query over OpenMP threads only makes the requests' threads wait on
    each other (50 concurrent clients on 2 cores: seconds per request instead of milliseconds).
    """
    import faiss
    import torch
    import uvicorn

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    app = create_app(root, model, **options)
    query_vector(model, parse_query("a photo"))  # load the tokenizer and warm the kernels before the first request
    uvicorn.run(app, host=host, port=port, log_level="warning")
