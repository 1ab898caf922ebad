"""syncbn's environment settings, read once into a typed object.

Every ``SYNCBN_*`` variable that changes how a pass runs is read and validated together, the first
time a pass asks for them (:func:`get`); a wrong value is a ``ValueError`` naming the variable.
A process that changes the environment afterwards calls :func:`reload` (tests do). Booleans take
``1/0``, ``true/false``, ``yes/no``, ``on/off`` in any case; numbers must be finite and in range.

>>> import os
>>> os.environ["SYNCBN_NONFINITE"] = "skip"
>>> reload(); get().nonfinite
'skip'
>>> del os.environ["SYNCBN_NONFINITE"]
>>> reload(); get().nonfinite
'propagate'
>>> os.environ["SYNCBN_DEBUG"] = "off"
>>> reload(); get().debug
0
>>> del os.environ["SYNCBN_DEBUG"]; reload()
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

__all__ = ["KERNELS", "NONFINITE", "SHM", "Settings", "current", "get", "reload"]

KERNELS = ("auto", "fused", "aten", "triton", "cuda", "cuda-welford")
SHM = ("auto", "off")
NONFINITE = ("propagate", "skip", "raise")
_POLL_DEFAULT_US = 2000.0
_POLL_MAX_US = 1e9  # 1000 s: longer than any group timeout (a budget that never blocks)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Settings:
    """The ``SYNCBN_*`` settings of this process (documented in docs/troubleshooting.md)."""

    kernel: str = "auto"  # SYNCBN_KERNEL: which backend computes a synchronized pass
    shm: str = "auto"  # SYNCBN_SHM: shared memory between the CPU ranks of one machine, or off
    poll_us: float = _POLL_DEFAULT_US  # SYNCBN_POLL_US: poll a CPU collective before blocking
    debug: int = 0  # SYNCBN_DEBUG: 0 off, 1 per-rank views, 2 also log every sync
    nonfinite: str = "propagate"  # SYNCBN_NONFINITE: what NaN/Inf statistics do
    force_sync: bool = False  # SYNCBN_FORCE_SYNC: synchronize on a one-rank group too (benchmarks)

    def wire(self) -> tuple[int, str, str]:
        """The settings that change what a rank sends or expects (checked across the ranks of
        a group at its set-up: they must agree)."""
        return self.debug, self.nonfinite, self.shm


def _choice(name: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name) or choices[0]
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    return value


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}: expected a boolean (1/0, true/false, yes/no, on/off), got {raw!r}")


def _debug() -> int:
    """SYNCBN_DEBUG: a boolean, or 2 (also log every sync)."""
    raw = os.environ.get("SYNCBN_DEBUG", "")
    if raw.strip() == "2":
        return 2
    try:
        return int(_flag("SYNCBN_DEBUG"))
    except ValueError:
        raise ValueError("SYNCBN_DEBUG: expected 0/1/2 or a boolean (true/false, yes/no, on/off), "
                         f"got {raw!r}") from None


def _number(name: str, default: float, low: float, high: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(f"{name}: expected a finite number from {low:g} to {high:g}, got {raw!r}")
    return value


def _read() -> Settings:
    return Settings(kernel=_choice("SYNCBN_KERNEL", KERNELS), shm=_choice("SYNCBN_SHM", SHM),
                    poll_us=_number("SYNCBN_POLL_US", _POLL_DEFAULT_US, 0.0, _POLL_MAX_US),
                    debug=_debug(), nonfinite=_choice("SYNCBN_NONFINITE", NONFINITE),
                    force_sync=_flag("SYNCBN_FORCE_SYNC"))


current: Settings | None = None  # read on first use; a pass's plan remembers which it used


def get() -> Settings:
    """The settings, read from the environment on first use."""
    global current
    if current is None:
        current = _read()
    return current


def reload() -> None:
    """Forget the settings read so far: the next pass reads the environment again (call it after
    changing ``SYNCBN_*`` variables in a running process)."""
    global current
    current = None
