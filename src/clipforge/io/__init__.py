"""Checkpoint formats: reading and writing clipforge files, open_clip/OpenAI state dicts, Hugging Face directories, pretrained tags.

This package only reads and writes; ``clipforge.load``/``clipforge.save`` (``clipforge.api``) add the replay of
recorded compression steps on top of it.
"""
