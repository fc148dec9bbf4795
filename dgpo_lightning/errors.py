"""User errors: a bad configuration value, prompt file or path, as opposed to a bug.

The CLI prints a :class:`ConfigError` as one short message (no traceback; ``DGPO_DEBUG=1`` shows it).
It subclasses ``ValueError`` so existing ``except ValueError`` code and tests keep working.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user error: names the key, file or line at fault and, where it helps, a hint."""


def check(ok: bool, key: str, value: Any, message: str) -> None:
    """Raise ``ConfigError("{key}={value!r} {message}")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r} {message}")


class UsageError(Exception):
    """A user error on a command line: printed as one ``error: ...`` line, exit status 2."""


class ShortErrorsParser(argparse.ArgumentParser):
    """A user error in the arguments ends in one line and a hint, not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"error: {message}\n(see `{self.prog} --help`)\n")


def json_object_option(text: str | None, flag: str) -> dict[str, Any]:
    """The JSON object of a command-line option, given inline or as the path of a ``.json`` file."""
    if not text:
        return {}
    path = Path(text)
    try:
        value = json.loads(path.read_text(encoding="utf-8") if path.suffix == ".json" and path.is_file() else text)
    except json.JSONDecodeError as error:
        raise UsageError(f"{flag}: not valid JSON ({error.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag}: expected a JSON object, got {text!r}")
    return value


def read_yaml_option(path: str, flag: str) -> Any:
    """The parsed YAML file of a command-line option (``None`` for an empty file)."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"{flag}: cannot read {path!r}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise UsageError(f"{flag}: {path} is not valid YAML: {error}") from None


__all__ = ["ConfigError", "ShortErrorsParser", "UsageError", "check", "json_object_option", "read_yaml_option"]
