"""syncbn's environment settings, read on every pass (so a process may change them), cheaply.

``os.environ.get`` encodes the key and decodes the value on every call (about 1.5 us); syncbn
reads three settings per pass, so it looks them up in the mapping ``os.environ`` keeps
(``os.environ._data``, updated by every ``os.environ[...] = ...``), falling back to
``os.environ.get`` where that mapping is not there.
"""

from __future__ import annotations

import os

__all__ = ["get"]

_DATA = getattr(os.environ, "_data", None)
_POSIX = os.name == "posix" and isinstance(_DATA, dict)
_KEYS: dict[str, bytes] = {}
_VALUES: dict[bytes, str] = {}


def get(name: str, default: str) -> str:
    """``os.environ.get(name) or default``.

    >>> os.environ["SYNCBN_EXAMPLE"] = "on"
    >>> get("SYNCBN_EXAMPLE", "off"), get("SYNCBN_UNSET_EXAMPLE", "off")
    ('on', 'off')
    """
    if not _POSIX:
        return os.environ.get(name) or default
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = os.fsencode(name)
    raw = _DATA.get(key)  # type: ignore[union-attr]
    if raw is None:
        return default
    value = _VALUES.get(raw)
    if value is None:
        value = _VALUES[raw] = os.fsdecode(raw)
    return value or default
