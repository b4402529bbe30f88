"""One-line messages: untrusted text escaped, exceptions cut to their first line."""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with control characters (newlines included) escaped: names from a model file are untrusted."""
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__
