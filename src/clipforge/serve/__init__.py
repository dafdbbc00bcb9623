"""HTTP API and web page over an embedding store (see ``clipforge.serve.app``).

    from clipforge.serve import create_app, serve
    serve("emb/", model, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from clipforge._util.progress import log_line
from clipforge.encode import Encoder
from clipforge.errors import ConfigError, one_line
from clipforge.retrieval.query import parse_query, query_vector
from clipforge.serve.app import create_app

__all__ = ["create_app", "serve"]


def serve(root: str | Path, model: Encoder, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Run the app with uvicorn until interrupted; ``options`` go to ``create_app``.

    The app is made and the address tried before the one line saying where it is served, so a bad store or
    option, or a port already in use, ends in a ``ConfigError`` instead. Requests are answered concurrently by
    a thread pool, so torch and faiss each use one thread per request: splitting one small query over OpenMP
    threads only makes the requests' threads wait on each other (50 concurrent clients on 2 cores: seconds
    per request instead of milliseconds).
    """
    import faiss
    import torch
    import uvicorn

    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    app = create_app(root, model, **options)
    query_vector(model, parse_query("a photo"))  # load the tokenizer and warm the kernels before the first request
    _check_listen(host, port)
    log_line(f"serving {root} on http://{f'[{host}]' if ':' in host else host}:{port}/")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _check_listen(host: str, port: int) -> None:
    """A one-line ``ConfigError`` unless ``host:port`` can be bound (tried on a probe socket, closed again so that
    uvicorn binds it as it always does): a port in use is refused before the server is announced."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn sets it
        try:
            probe.bind((host, port))
        except OSError as error:
            reason = error.strerror or one_line(error)
            raise ConfigError(f"--host {host} --port {port}: cannot listen there ({reason}); choose another port or host") from None
