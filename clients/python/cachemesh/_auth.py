"""The ``authorization`` metadata of a call, its secret checked before anything is sent."""

from __future__ import annotations


def bearer_metadata(secret: str, parameter: str) -> tuple[tuple[str, str], ...]:
    """``authorization: Bearer <secret>``, the secret without surrounding whitespace (a key read
    with ``open(f).read()`` ends in a newline). An empty secret, or one holding a space, a
    control character or a non-ASCII character (gRPC cannot send it, and no key or token holds
    one), is a ValueError naming ``parameter``; the secret itself is never shown. One that
    is not a str (None: ``os.environ.get`` of a variable that is not set) is a TypeError
    naming ``parameter`` and the type (it was an AttributeError, "'NoneType' object has
    no attribute 'strip'")."""
    if not isinstance(secret, str):
        if secret is None:
            raise TypeError(
                f"{parameter} is None, not a str: is the variable it was read from set?"
            )
        raise TypeError(
            f"{parameter} must be a str, got {type(secret).__name__} (the value is not shown)"
        )
    value = secret.strip()
    if not value:
        raise ValueError(f"{parameter} is empty")
    if not all("!" <= char <= "~" for char in value):
        raise ValueError(
            f"{parameter} must be printable ASCII without spaces or control characters (the "
            "value is not shown): check that it was copied or read whole"
        )
    return (("authorization", f"Bearer {value}"),)
