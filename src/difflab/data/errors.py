"""Errors raised by the data room before training starts."""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are absent and were not downloaded; the message says where to put them."""
