"""Shared helpers below every other package: atomic file writes, safe image decoding, progress bars."""
