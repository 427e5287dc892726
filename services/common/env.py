"""Configuration from environment variables, validated at start-up.

Every reader names the variable in its error so that a bad deployment fails fast with a
message a person can act on. ``0`` is a valid number everywhere: defaults apply only when a
variable is unset or empty, never when it is falsy.
"""

from __future__ import annotations

import builtins
import ipaddress
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit


class ConfigError(ValueError):
    """A configuration variable is missing or malformed."""


class Env:
    """Typed access to one environment mapping (injected, so tests pass a dict)."""

    def __init__(self, environ: Mapping[builtins.str, builtins.str]) -> None:
        self._environ = environ

    def _raw(self, name: builtins.str) -> builtins.str | None:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def str(self, name: builtins.str, default: builtins.str | None = None) -> builtins.str:
        value = self._raw(name)
        if value is None:
            if default is None:
                raise ConfigError(f"{name} is required but not set")
            return default
        return value

    def optional_str(self, name: builtins.str) -> builtins.str | None:
        return self._raw(name)

    def int(
        self,
        name: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int | None = None,
        maximum: builtins.int | None = None,
    ) -> builtins.int:
        value = self._raw(name)
        if value is None:
            result = default
        else:
            try:
                result = int(value)
            except ValueError:
                raise ConfigError(f"{name} must be an integer, got {value!r}") from None
        _check_range(name, result, minimum, maximum)
        return result

    def float(
        self,
        name: builtins.str,
        default: builtins.float,
        *,
        minimum: builtins.float | None = None,
        maximum: builtins.float | None = None,
    ) -> builtins.float:
        value = self._raw(name)
        if value is None:
            result = default
        else:
            try:
                result = float(value)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
            if result != result or result in (float("inf"), float("-inf")):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        _check_range(name, result, minimum, maximum)
        return result

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self._raw(name)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")

    def address(self, name: builtins.str, default: builtins.str | None = None) -> builtins.str:
        """A ``host:port`` address; the port must be 0-65535."""
        value = self.str(name, default)
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"{name} must be host:port, got {value!r}")
        return value

    def path(self, name: builtins.str, default: builtins.str | None = None) -> Path:
        return Path(self.str(name, default))


def _check_range(
    name: builtins.str,
    value: builtins.float,
    minimum: builtins.float | None,
    maximum: builtins.float | None,
) -> None:
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")


def is_loopback(address: builtins.str) -> builtins.bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def redacted_url(url: builtins.str) -> builtins.str:
    """The URL without its secrets, for messages: the password of its user part
    (redis://user:secret@host -> redis://user:***@host) and the value of every query parameter
    (redis-py also takes ``?password=``; any other may be a token), and nothing of a URL that
    does not parse."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            creds, host = netloc.rsplit("@", 1)
            user = creds.split(":", 1)[0]
            netloc = f"{user}:***@{host}" if ":" in creds else f"{user}@{host}"
        names = [name for name, _ in parse_qsl(parts.query, keep_blank_values=True)]
    except ValueError:
        return "(a URL that does not parse)"
    query = "&".join(f"{name}=***" for name in names)
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
