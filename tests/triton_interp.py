"""Run the Triton backend through Triton's interpreter (on CPU tensors) for a test module."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import syncbn.backends.triton as bt

# several row tiles and channel blocks from a handful of rows and channels
SMALL_TILES = bt.Tuning(elems=16, max_block_m=8, max_block_c=4, programs=4, pack_block_c=4,
                        block_z=64)


@contextlib.contextmanager
def interpreted(tuning: bt.Tuning = SMALL_TILES) -> Iterator[None]:
    """TRITON_INTERPRET=1 inside; kernels (re)built under it, then again after; ``tuning``."""
    old_env, old_tuning = os.environ.get("TRITON_INTERPRET"), bt.tuning
    os.environ["TRITON_INTERPRET"] = "1"
    bt._kernels.cache_clear()
    bt.tuning = tuning
    try:
        yield
    finally:
        bt.tuning = old_tuning
        if old_env is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old_env
        bt._kernels.cache_clear()
