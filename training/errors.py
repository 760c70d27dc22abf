"""The data errors every training entry point reports as ``error: ...`` (exit 2) instead of a traceback."""

from __future__ import annotations


class DatasetError(ValueError):
    """The dataset cannot be used; the message says why and what to do."""
