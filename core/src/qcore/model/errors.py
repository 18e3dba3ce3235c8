"""Errors raised while reading a model's structure."""

from __future__ import annotations

from qcore.errors import QcoreError


class StructureError(QcoreError, ValueError):
    """The model or block lacks the structure qcore needs (repeated blocks, linears)."""
