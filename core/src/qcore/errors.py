"""Exceptions raised by qcore. Every message says what was wrong and what to do."""

from __future__ import annotations


class QcoreError(Exception):
    """Base class of qcore's errors."""


class PluginLoadError(QcoreError):
    """A plugin could not be imported, registered or validated."""


class DuplicateComponentError(QcoreError):
    """Two components of one kind were registered under one name."""


class UnknownComponentError(QcoreError, LookupError):
    """A pipeline named a component that no installed plugin registers."""


class ConfigError(QcoreError, ValueError):
    """A component's options or the quantization scheme are invalid."""


class PipelineError(QcoreError, ValueError):
    """A pipeline cannot run as specified (a need unmet, no packer or kernel for it)."""


class KernelNotFoundError(QcoreError):
    """No kernel provider supports a requested operation."""


class CheckpointError(QcoreError, ValueError):
    """A checkpoint cannot be written or read."""


class TemplateError(QcoreError, ValueError):
    """A new plugin project cannot be made as asked (``qcore new-plugin``)."""
