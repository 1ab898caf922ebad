"""Benchmark syncbn: per layer, end to end and memory, against torch BN and a textbook SyncBN.

The same as ``syncbn bench`` (``python -m syncbn bench``); see ``syncbn bench --help`` and the
docstring of :mod:`syncbn.bench` for what is measured and how::

    python benchmarks/bench.py                 # full run, a few minutes on 2 CPU cores
    python benchmarks/bench.py --quick         # < 1 minute
    python benchmarks/bench.py --out benchmarks --threads 1

Tables go to stdout, every number to ``OUT/syncbn-bench.json``; the results of a full run on
this project's machine are in ``benchmarks/RESULTS.md``.
"""

import sys

from syncbn.bench import main

if __name__ == "__main__":
    sys.exit(main())
