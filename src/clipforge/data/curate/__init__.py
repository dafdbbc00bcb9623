"""Data curation (issue #17): DataComp's filters, MetaCLIP's balancing, deduplication, DataComp subset files,
resharding, multi-caption rewrites and the curation report, run as idempotent per-shard tasks on the local
machine or a Ray cluster (``engine``)."""
