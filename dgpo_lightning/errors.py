"""User errors: a bad configuration value, prompt file or path, as opposed to a bug.

The CLI prints a :class:`ConfigError` as one short message (no traceback; ``DGPO_DEBUG=1`` shows it).
It subclasses ``ValueError`` so existing ``except ValueError`` code and tests keep working.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A user error: names the key, file or line at fault and, where it helps, a hint."""


def check(ok: bool, key: str, value: Any, message: str) -> None:
    """Raise ``ConfigError("{key}={value!r} {message}")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r} {message}")


__all__ = ["ConfigError", "check"]
