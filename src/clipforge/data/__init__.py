"""Data sources for clipforge; ``clipforge.data.synthetic`` is the built-in image-caption world."""
