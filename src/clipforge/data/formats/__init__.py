"""One reader per file format, shared by training (``data.sources``), evaluation (``eval.datasets``)
and embedding (``retrieval.inputs``), so that a file reads the same whichever command opens it.

- ``tables``: CSV, TSV (img2dataset's unquoted layout), parquet and JSONL tables;
- ``shards``: webdataset tar shards, randomly accessible through a cached index of their members;
- ``folders``: image files under a folder, ``.txt`` sidecar captions, class-per-folder layouts;
- ``images``: the image reader (PIL image, file, bytes or shard member);
- ``samples``: ``SampleError`` and ``decode_caption``, the one way a caption is read.
"""
