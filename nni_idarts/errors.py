"""Helpers for the one-line error messages of the command line, the trial and the loaders."""

from __future__ import annotations

from typing import Any

#: The longest a value may be when an error message repeats it (a YAML alias bomb can expand to megabytes).
MAX_SHOWN = 80


def brief(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters, so that an error message stays one short line."""
    try:
        text = repr(value)
    except Exception:  # a value whose repr fails still gets a message
        text = f'<{type(value).__name__}>'
    text = text.replace('\n', ' ')
    return text if len(text) <= limit else f'{text[:limit - 15]}... ({len(text)} chars)'



def reason(error: BaseException, limit: int = 160) -> str:
    """What ``error`` says (its lines joined, its type name if it says nothing), bounded by :func:`brief`: how a
    library's complaint about a user's file ends a one-line message."""
    text = ' '.join(str(error).split())
    return brief(text, limit) if text else type(error).__name__
