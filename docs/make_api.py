"""Write docs/api.md from the public docstrings (the API reference; examples there run as doctests).

    python docs/make_api.py          # rewrite docs/api.md
    python docs/make_api.py --check  # exit 1 if docs/api.md is not current (run by the tests)
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import syncbn
import syncbn.functional
import syncbn.parallel

OUT = Path(__file__).with_name("api.md")
ENTRIES = [
    ("syncbn", ["SyncBatchNorm", "SyncBatchNorm1d", "SyncBatchNorm2d", "SyncBatchNorm3d",
                "BatchNormNd", "BatchNormAct", "convert_sync_batchnorm", "revert_sync_batchnorm",
                "DataParallel"]),
    ("syncbn.functional", ["sync_batch_norm"]),
    ("syncbn.parallel", ["replica_devices"]),
]


def render() -> str:
    parts = ["# API reference\n",
             "Made from the docstrings by `python docs/make_api.py`; the examples run as doctests.\n",
             "Command line (`syncbn.cli`): `syncbn demo`, `syncbn check`, `syncbn bench`, `syncbn "
             "kernel` (`--help` on each).\n",
             "Lightning: `syncbn.lightning.SyncBatchNormPlugin(process_group=None)`, a `LayerSync` "
             "plugin (made on first use, so that importing syncbn never imports Lightning); see "
             "[ecosystem.md](ecosystem.md).\n"]
    for module_name, names in ENTRIES:
        module = sys.modules[module_name]
        for name in names:
            obj = getattr(module, name)
            target = obj.__init__ if inspect.isclass(obj) else obj
            try:
                sig = str(inspect.signature(target)).replace("(self, ", "(").replace("(self)", "()")
            except (TypeError, ValueError):
                sig = "(...)"
            doc = inspect.cleandoc(obj.__doc__ or "")
            parts.append(f"## `{module_name}.{name}{sig}`\n\n```text\n{doc}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        current = OUT.read_text() if OUT.exists() else ""
        sys.exit(0 if current == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT}")
