"""Quantization: torch.ao int8 (dynamic and static), simulated low-bit quantization and mixed-precision bit allocation."""
