"""Benchmark syncbn: per layer, end to end and memory, against torch BN and a textbook SyncBN.

The same program as ``syncbn bench`` (``src/syncbn/cli/bench.py``, whose docstring and
``syncbn bench --help`` are the manual)::

    python benchmarks/bench.py                 # full run, about 8 minutes on 2 CPU cores
    python benchmarks/bench.py --quick         # < 1 minute
    python benchmarks/bench.py --out benchmarks --threads 1

Tables go to stdout, every number to ``OUT/syncbn-bench.json``; the results of a full run are in
``benchmarks/RESULTS.md``.
"""

import sys

from syncbn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
