"""Helpers for the one-line error messages of the command line, the trial and the loaders."""

from __future__ import annotations

import reprlib
import stat
from pathlib import Path
from typing import Any

#: The longest a value may be when an error message repeats it (a YAML alias bomb can expand to megabytes).
MAX_SHOWN = 80

# Containers are shown a few levels and items deep only: a YAML alias bomb is a small document whose full repr
# has billions of characters, so it must never be built, not only cut afterwards.
_CONTAINERS = reprlib.Repr()
_CONTAINERS.maxlevel = 3
_CONTAINERS.maxlist = _CONTAINERS.maxtuple = _CONTAINERS.maxset = _CONTAINERS.maxdict = 4
_CONTAINERS.maxstring = _CONTAINERS.maxother = _CONTAINERS.maxlong = MAX_SHOWN


def brief(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters, so that an error message stays one short line."""
    try:
        if isinstance(value, (list, tuple, dict, set, frozenset)):
            text = _CONTAINERS.repr(value)
        elif isinstance(value, (str, bytes)) and len(value) > 4 * limit:
            text = repr(value[:4 * limit])  # the rest is cut below anyway; the length is reported
            return f'{text[:limit - 15]}... ({len(value)} chars)'
        else:
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


def require_int(name: str, value: Any, *, minimum: int, maximum: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) in ``[minimum, maximum]``."""
    if (not isinstance(value, int) or isinstance(value, bool) or value < minimum
            or (maximum is not None and value > maximum)):
        bounds = f'>= {minimum}' + (f' and <= {maximum}' if maximum is not None else '')
        raise ValueError(f'{name} must be an integer {bounds}; got {brief(value)}.')


def require_number(name: str, value: Any, *, minimum: float, inclusive: bool) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number ``>= minimum`` (``inclusive``) or ``> minimum``."""
    import math

    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= minimum if inclusive else value > minimum))
    if not ok:
        raise ValueError(f'{name} must be a finite number {">=" if inclusive else ">"} {minimum}; got {brief(value)}.')


def read_user_text(path: str | Path, error: type[Exception], prefix: str, *, max_bytes: int, what: str) -> str:
    """The UTF-8 text of a file a user names (a config, an architecture file), or ``error`` with one line starting
    ``prefix``: a folder, pipe or device (which could be read forever), a file over ``max_bytes``, an unreadable
    file and one that is not UTF-8 (``what`` says what it should have been) are each refused by name."""
    try:
        info = Path(path).stat()
        if not stat.S_ISREG(info.st_mode):
            raise error(f'{prefix}: {path} is not a regular file')
        if info.st_size > max_bytes:
            raise error(f'{prefix}: {path} has {info.st_size} bytes, too many for {what} (at most {max_bytes})')
        raw = Path(path).read_bytes()
    except OSError as failure:
        raise error(f'{prefix}: cannot read {path}: {failure.strerror or failure}') from failure
    try:
        return raw.decode('utf-8-sig')  # a byte-order mark, as some editors write, is skipped
    except UnicodeDecodeError as failure:
        raise error(f'{prefix}: {path} is not UTF-8 text (byte {raw[failure.start]:#04x} at offset {failure.start}): '
                    f'not {what}') from failure
