"""Block fine-tuning of quantized weights as a qcore plugin."""

__version__ = "0.1.0"
