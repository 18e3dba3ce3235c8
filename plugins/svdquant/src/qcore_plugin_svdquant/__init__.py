"""SVDQuant for qcore: smoothing, a 16-bit low-rank branch, and a 4-bit residual."""

__version__ = "0.1.0"
