"""Names that end up in cache file names must be filesystem-safe and unambiguous."""

from __future__ import annotations

import re

SAFE_NAME = re.compile(r"[A-Za-z0-9_.]+")


def check_safe_name(value: str, *, what: str) -> str:
    """Return `value` if it is made of letters, digits, '_' and '.'; raise ValueError otherwise."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or value.startswith("."):
        raise ValueError(
            f"{what}={value!r} is not allowed: use letters, digits, '_' and '.' "
            "(not leading), e.g. 'fashion_mnist'"
        )
    return value
