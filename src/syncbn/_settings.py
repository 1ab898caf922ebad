"""syncbn's environment settings, read once into a typed object.

Every ``SYNCBN_*`` variable that changes how a pass runs is read and validated together, the first
time a pass asks for them (:func:`get`); a wrong value is a ``ValueError`` naming the variable.
A process that changes the environment afterwards calls :func:`reload` (tests do).

>>> import os
>>> os.environ["SYNCBN_NONFINITE"] = "skip"
>>> reload(); get().nonfinite
'skip'
>>> del os.environ["SYNCBN_NONFINITE"]
>>> reload(); get().nonfinite
'propagate'
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["KERNELS", "NONFINITE", "SHM", "Settings", "get", "reload"]

KERNELS = ("auto", "fused", "aten", "triton")
SHM = ("auto", "off")
NONFINITE = ("propagate", "skip", "raise")
_POLL_DEFAULT_US = 2000.0


@dataclass(frozen=True)
class Settings:
    """The ``SYNCBN_*`` settings of this process (documented in docs/troubleshooting.md)."""

    kernel: str = "auto"  # SYNCBN_KERNEL: which backend computes a synchronized pass
    shm: str = "auto"  # SYNCBN_SHM: shared memory between the CPU ranks of one machine, or off
    poll_us: float = _POLL_DEFAULT_US  # SYNCBN_POLL_US: poll a CPU collective before blocking
    debug: int = 0  # SYNCBN_DEBUG: 0 off, 1 per-rank views, 2 also log every sync
    nonfinite: str = "propagate"  # SYNCBN_NONFINITE: what NaN/Inf statistics do


def _choice(name: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name) or choices[0]
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def _read() -> Settings:
    raw = os.environ.get("SYNCBN_POLL_US") or ""
    try:
        poll = float(raw) if raw else _POLL_DEFAULT_US
    except ValueError:
        poll = -1.0
    if not poll >= 0:
        raise ValueError(f"SYNCBN_POLL_US: expected a number of microseconds >= 0, got {raw!r}")
    try:
        debug = int(os.environ.get("SYNCBN_DEBUG") or 0)
    except ValueError:
        debug = 1  # any other non-empty value turns the checks on
    return Settings(kernel=_choice("SYNCBN_KERNEL", KERNELS), shm=_choice("SYNCBN_SHM", SHM),
                    poll_us=poll, debug=debug,
                    nonfinite=_choice("SYNCBN_NONFINITE", NONFINITE))


_current: list[Settings] = []


def get() -> Settings:
    """The settings, read from the environment on first use."""
    if not _current:
        _current.append(_read())
    return _current[0]


def reload() -> None:
    """Forget the settings read so far: the next pass reads the environment again (call it after
    changing ``SYNCBN_*`` variables in a running process)."""
    _current.clear()
