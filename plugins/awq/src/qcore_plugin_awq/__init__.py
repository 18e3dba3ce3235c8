"""qcore-plugin-awq: AWQ (Lin et al.), activation-aware weight quantization, for qcore."""

__version__ = "0.1.0"
