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
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

# The largest value a C ``int`` holds: the most a setting handed to gRPC, FAISS or onnxruntime
# as one may be (past it they raise OverflowError, naming no variable).
C_INT_MAX = 2**31 - 1

# The longest duration (a timeout, a TTL, an interval) a setting may give: ten years, beyond
# any use. Past ~7.4e9 s gRPC's deadline (int64 nanoseconds from its clock) overflows and
# every call fails at once with DEADLINE_EXCEEDED or UNAVAILABLE, and a Redis TTL in
# milliseconds is refused ("value is not an integer or out of range"): the value was taken at
# start-up and broke every call later.
MAX_DURATION_S = 10 * 365 * 86_400

# The most each kind of whole-number setting may give, far beyond any use: a larger value was
# taken at start-up (``99999999999999999999999`` entries, connections, bytes) and either
# failed later, naming no variable, or meant nothing (no process holds that many).
MAX_COUNT = C_INT_MAX  # entries, connections, a queue, requests or tokens a minute, blocks
MAX_BYTES = 2**40  # 1 TiB: a memory or disk bound of one process
# A token count of one request (a context window, an output cap): 100M, ten times the longest
# context window offered. With MAX_PRICE_NANOS (services.common.models) a request's bill
# stays below 2**53 nano-dollars, so it is exact in the Lua doubles of the limits' Redis.
MAX_TOKENS = 100_000_000
# The fastest rate of tokens a second (a prefill or a decode rate) a setting may give: ten
# million, a hundred times the fastest prefill any engine or provider offers. 1e23 was taken
# (a prior of that rate predicted no prefill at all), and a models file's ``inf``.
MAX_TOKENS_PER_S = 10_000_000.0


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

    def secret(self, name: builtins.str) -> builtins.str | None:
        """A secret given as ``name`` or as ``name_FILE``, the path of a file holding it on one
        line (a mounted secret: it stays out of the environment, which ``docker inspect`` and
        /proc/PID/environ show). Both set is refused, and so is a file that is missing,
        unreadable, empty, larger than ``MAX_SECRET_BYTES`` or of more than one line: each
        names the variable and the path, never the value. None when neither is set."""
        file_var = f"{name}_FILE"
        direct = self._raw(name)
        path = self._raw(file_var)
        if direct is not None and path is not None:
            raise ConfigError(f"set {file_var} or {name}, not both")
        if path is None:
            return direct
        return read_secret_file(file_var, path)

    def redis_url(self, name: builtins.str) -> builtins.str | None:
        """``name``'s Redis URL, given the password in ``CACHEMESH_REDIS_PASSWORD_FILE`` when
        that is set (checked at start-up even when no URL is: a file a deployment names must
        be there). A URL that carries a password of its own, with the file set too, is refused:
        which one is meant is a guess. The file's password applies to ``redis://`` and
        ``rediss://`` URLs (a ``unix://`` one is refused with it)."""
        url = self._raw(name)
        path = self._raw(REDIS_PASSWORD_FILE)
        if path is None:
            return url
        password = read_secret_file(REDIS_PASSWORD_FILE, path)
        return None if url is None else url_with_password(name, url, password)

    def int(
        self,
        name: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int | None = None,
        maximum: builtins.int,
    ) -> builtins.int:
        """A whole number, at most ``maximum`` (every integer setting has one: see
        ``count``, ``bytes`` and ``tokens`` for the usual kinds)."""
        result = self._whole(name, default)
        _check_range(name, result, minimum, maximum)
        return result

    def _whole(self, name: builtins.str, default: builtins.int) -> builtins.int:
        value = self._raw(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None

    def count(
        self,
        name: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int | None = 0,
        maximum: builtins.int = MAX_COUNT,
    ) -> builtins.int:
        """A number of things (entries, connections, requests a minute): at most ``maximum``,
        by default ``MAX_COUNT``."""
        return self._most(name, default, minimum, maximum, "a count")

    def bytes(
        self,
        name: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int | None = 0,
        maximum: builtins.int = MAX_BYTES,
    ) -> builtins.int:
        """A size in bytes: at most ``maximum``, by default ``MAX_BYTES`` (1 TiB)."""
        return self._most(name, default, minimum, maximum, "bytes")

    def tokens(
        self,
        name: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int | None = 1,
        maximum: builtins.int = MAX_TOKENS,
    ) -> builtins.int:
        """A number of tokens of one request or one cache: at most ``maximum``, by default
        ``MAX_TOKENS``."""
        return self._most(name, default, minimum, maximum, "tokens")

    def _most(
        self,
        name: builtins.str,
        default: builtins.int,
        minimum: builtins.int | None,
        maximum: builtins.int,
        kind: builtins.str,
    ) -> builtins.int:
        value = self._whole(name, default)
        _check_range(name, value, minimum, None)
        check_most(name, value, maximum, kind)
        return value

    def float(
        self,
        name: builtins.str,
        default: builtins.float,
        *,
        minimum: builtins.float | None = None,
        maximum: builtins.float,
    ) -> builtins.float:
        """A finite decimal number, at most ``maximum`` (every decimal setting has one: see
        ``within`` and ``fraction``, whose refusal states the whole range)."""
        result = self._decimal(name, default)
        _check_range(name, result, minimum, maximum)
        return result

    def _decimal(self, name: builtins.str, default: builtins.float) -> builtins.float:
        value = self._raw(name)
        if value is None:
            return default
        try:
            result = float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value[:64]!r}") from None
        if result != result or result in (float("inf"), float("-inf")):
            raise ConfigError(f"{name} must be a finite number, got {value[:64]!r}")
        return result

    def within(
        self,
        name: builtins.str,
        default: builtins.float,
        minimum: builtins.float,
        maximum: builtins.float,
        kind: builtins.str,
    ) -> builtins.float:
        """A finite decimal number in [``minimum``, ``maximum``] (``kind`` says what it is, in
        the refusal: "a fraction", "tokens a second"...); NaN and infinity are refused."""
        value = self._decimal(name, default)
        check_within(name, value, minimum, maximum, kind)
        return value

    def fraction(self, name: builtins.str, default: builtins.float) -> builtins.float:
        """A share of something: in [0, 1]."""
        return self.within(name, default, 0.0, 1.0, "a fraction")

    def seconds(
        self,
        name: builtins.str,
        default: builtins.float,
        *,
        minimum: builtins.float | None = 0.0,
        maximum: builtins.float = MAX_DURATION_S,
    ) -> builtins.float:
        """A duration in seconds (a timeout, a TTL, an interval): finite, at least
        ``minimum`` (``None``: the caller checks it, with a reason of its own), at most
        ``maximum`` (by default ``MAX_DURATION_S``, ten years)."""
        value = self._decimal(name, default)
        _check_range(name, value, minimum, None)
        _check_duration(name, value, maximum)
        return value

    def whole_seconds(
        self,
        name: builtins.str,
        default: builtins.int,
        *,
        minimum: builtins.int | None = 0,
        maximum: builtins.int = MAX_DURATION_S,
    ) -> builtins.int:
        """``seconds`` for a duration given in whole seconds."""
        value = self._whole(name, default)
        _check_range(name, value, minimum, None)
        _check_duration(name, value, maximum)
        return value

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
        """A ``host:port`` address (``[v6]:port`` for an IPv6 host); the port 0-65535."""
        value = self.str(name, default)
        wrong = address_error(value)
        if wrong:
            raise ConfigError(
                f"{name} must be host:port (e.g. 127.0.0.1:50051, [::1]:50051), got "
                f"{value[:80]!r}: {wrong}"
            )
        return value

    def path(self, name: builtins.str, default: builtins.str | None = None) -> Path:
        return Path(self.str(name, default))


def address_error(value: builtins.str) -> builtins.str:
    """What is wrong with ``value`` as a gRPC ``host:port`` address ("" = nothing): gRPC takes
    a scheme or a space as part of the host name, so such an address passed every check, the
    service reported SERVING and never connected."""
    if "://" in value:
        return "no scheme (http://, grpc://): gRPC dials host:port itself"
    if any(c.isspace() for c in value):
        return "it holds whitespace"
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        return "no host:port"
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        return f"the port must be 0-65535 in ASCII digits, got {port[:16]!r}"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return "an IPv6 host goes in brackets, [::1]:port"
    return ""


def check_most(
    name: builtins.str, value: builtins.int, maximum: builtins.int, kind: builtins.str
) -> None:
    """``name``'s ``value`` (of ``kind``: "a count", "bytes", "tokens") is at most
    ``maximum``; a refusal names both (the value cut to its first digits)."""
    if value > maximum:
        shown = str(value)
        shown = shown if len(shown) <= 24 else f"{shown[:20]}... ({len(shown)} digits)"
        raise ConfigError(f"{name} must be at most {maximum:,} ({kind}), got {shown}")


def digits_at_most(
    name: builtins.str, digits: builtins.str, maximum: builtins.int, kind: builtins.str
) -> builtins.int:
    """``digits`` (ASCII digits, checked by the caller: part of a list setting) as a number at
    most ``maximum``. Its length is checked before ``int()``, which raises ValueError (a
    traceback naming no variable) past 4300 digits."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(maximum)):
        shown = f"{significant[:20]}... ({len(significant)} digits)"
        raise ConfigError(f"{name} must be at most {maximum:,} ({kind}), got {shown}")
    value = int(significant)
    check_most(name, value, maximum, kind)
    return value


def check_within(
    name: builtins.str,
    value: builtins.float,
    minimum: builtins.float,
    maximum: builtins.float,
    kind: builtins.str,
) -> None:
    """``name``'s ``value`` is in [``minimum``, ``maximum``] (a NaN is not); a refusal states
    the range and what the value is (``kind``)."""
    if not minimum <= value <= maximum:
        raise ConfigError(
            f"{name} must be within [{figure(minimum)}, {figure(maximum)}] ({kind}), "
            f"got {figure(value)}"
        )


def figure(value: builtins.float) -> builtins.str:
    """A decimal as a person writes it: ``1`` not ``1.0``, ``10000000`` not ``1e+07``; a
    value past 16 digits or a fraction as ``%g`` does."""
    if value == value and abs(value) < 1e16 and value == int(value):
        return f"{int(value)}"
    return f"{value:g}"


def _check_duration(name: builtins.str, value: builtins.float, maximum: builtins.float) -> None:
    if value > maximum:
        most = f"{maximum:.0f}" if maximum == int(maximum) else f"{maximum:g}"
        years = " (10 years)" if maximum == MAX_DURATION_S else ""
        raise ConfigError(f"{name} must be at most {most} seconds{years}, got {value:g}")


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


_REDIS_SCHEMES = ("redis", "rediss", "unix")


REDIS_PASSWORD_FILE = "CACHEMESH_REDIS_PASSWORD_FILE"


def url_with_password(
    name: builtins.str, url: builtins.str, password: builtins.str
) -> builtins.str:
    """``url`` (``redis://[user@]host[:port][/db]``, ``name``'s value) giving ``password``
    (percent-encoded: redis-py decodes it); its user, host, port, database and query kept."""
    scheme = url.partition("://")[0].lower()
    if scheme not in ("redis", "rediss"):
        raise ConfigError(
            f"{REDIS_PASSWORD_FILE} gives the password of redis:// and rediss:// URLs; {name} "
            f"is a {scheme or 'scheme-less'} URL: unset {REDIS_PASSWORD_FILE} for it, or use "
            "redis://host:port/db"
        )
    try:
        parts = urlsplit(url)
        has_password = bool(parts.password)
        user = parts.username or ""
    except ValueError:
        raise redis_url_error(name, url) from None
    if has_password:
        raise ConfigError(
            f"{name} carries a password and {REDIS_PASSWORD_FILE} is set: give it one way "
            f"(the URL without it, e.g. redis://host:6379/0, and the password in the file)"
        )
    address = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{address}"))


# The most a secret's file may hold: a token, a password or a key is far shorter; a path to
# something else (a log, /dev/zero) is refused instead of read whole at start-up.
MAX_SECRET_BYTES = 64 * 1024


def read_secret_file(variable: builtins.str, path: builtins.str) -> builtins.str:
    """The secret in the file at ``path`` (``variable`` names it in errors), stripped of the
    spaces and line break around it; see ``Env.secret``."""
    where = repr(path[:200])
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {where} ({exc.strerror})") from None
    if len(raw) > MAX_SECRET_BYTES:
        raise ConfigError(
            f"{variable}: {where} is larger than {MAX_SECRET_BYTES // 1024} KiB: not a secret's "
            "file (it holds the secret alone, on one line)"
        )
    try:
        value = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{variable}: {where} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{variable}: {where} is empty")
    if "\n" in value or "\r" in value:
        raise ConfigError(f"{variable}: {where} must hold the secret alone, on one line")
    return value


def redacted_url(url: builtins.str) -> builtins.str:
    """A URL without its secrets, for logs and messages. A Redis URL (``redis://``,
    ``rediss://``, ``unix://``) is shown as redis-py reads it; any other (an HTTP base URL) as
    ``scheme://host[:port]/path``. Neither ever shows a password (in the user part, whatever
    characters it holds, or as ``?password=``) nor any query value."""
    scheme = url.partition("://")[0]
    if scheme.lower() in _REDIS_SCHEMES:
        return _redacted_redis_url(url)
    return _redacted_http_url(url)


def _redacted_http_url(url: builtins.str) -> builtins.str:
    """``scheme://[user:***@]host[:port]/path``: the user part hidden (a user name without a
    password, ``token@`` or ``token:@``, is often the token itself, so it becomes ``***@``), no
    query nor fragment; a URL that does not parse is not shown (the parser's message may quote
    the password)."""
    scheme, sep, _ = url.partition("://")
    if not sep or not scheme:
        return "(not a scheme://host URL; not shown)"
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return f"(a {scheme} URL that does not parse; not shown)"
    shown = ""
    if parts.username is not None or parts.password is not None:
        shown = f"{parts.username}:***@" if parts.password else "***@"
    host = f"[{host}]" if ":" in host else host
    where = f"{host}:{port}" if port is not None else host
    path = parts.path if "@" not in parts.path else "/***"  # a password holding '/' leaks here
    return f"{scheme}://{shown}{where}{path}"


def _redacted_redis_url(url: builtins.str) -> builtins.str:
    """A Redis URL as redis-py reads it: its scheme, user, host, port and database (or socket
    path), never its password nor any other query value."""
    from redis.connection import parse_url  # only the services that use Redis call this

    scheme = url.partition("://")[0]
    try:
        parts: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError:  # its message may quote part of the password
        return f"(a {scheme or 'URL'} URL redis-py cannot read; not shown)"
    user = parts.get("username") or ""
    shown = f"{user}:***@" if parts.get("password") else (f"{user}@" if user else "")
    if "path" in parts:
        return f"{scheme}://{shown}{parts['path']}"
    host = parts.get("host") or "localhost"
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}{host}:{parts.get('port', 6379)}/{parts.get('db', 0)}"


def redis_url_error(name: builtins.str, url: builtins.str) -> ConfigError:
    """``name``'s value is not a URL redis-py can read (the value is not shown)."""
    shown = redacted_url(url)
    shown = shown if shown.startswith("(") else f"({shown})"  # "(not a ... URL; not shown)"
    return ConfigError(
        f"{name}: not a Redis URL redis-py can read {shown}: expected "
        "redis://[user:password@]host[:port][/db], rediss://... or unix:///path"
    )


def check_redis_db(name: builtins.str, url: builtins.str) -> None:
    """A ``redis://`` or ``rediss://`` URL's database (its path) is a number: redis-py reads
    ``/2x`` or ``/abc`` as database 0 without a word, so a service meant for another database
    shared 0 with whatever else is there. The path is not shown (a password holding '/' may
    end up in it)."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in ("redis", "rediss"):
        return
    try:
        path = unquote(urlsplit(url).path)
    except ValueError:
        return  # redis-py refuses it: redis_url_error says so
    db = path.replace("/", "")  # as redis-py reads it: /2/ is database 2
    if db and not (db.isascii() and db.isdigit()):
        raise ConfigError(
            f"{name}: the database of a Redis URL (the path after host:port) must be a "
            "number, e.g. redis://127.0.0.1:6379/2 (redis-py reads any other path as "
            "database 0; the value is not shown)"
        )
