"""The fused CPU kernel (``csrc/kernel.c``): built on first use, cached, loaded with ctypes.

It is what the fused C backend (``syncbn.backends.fused``: CPU float32/float64, contiguous or
channels_last) calls: one C pass over the data per step (statistics, normalize, backward
reductions, grad_input), with the per-channel math, the collective's header and the running
statistics done in C as well. No torch headers: the C builds with the system C compiler in a
few seconds, once per machine, into a cache directory, and is called through ``ctypes``. The
other backends are torch operators and Triton (``syncbn.backends``, where ``SYNCBN_KERNEL``
chooses).

The same library holds the shared-memory all_reduce of ranks on one machine (``csrc/local.h``,
used by ``syncbn._shm``), whichever backend computes.

The cache is ``SYNCBN_CACHE_DIR``, else ``$XDG_CACHE_HOME/syncbn``, else
``~/.cache/syncbn`` (``<tmp>/syncbn-<uid>`` when that is not writable); a kernel is loaded only
from a directory and files nobody else can write, after checking its sha256 (``cache.py``). The
compiler is ``$CC``, else ``cc``/``gcc``/``clang``, with ``-O3 -fno-trapping-math -march=native -fopenmp`` (retried
without ``-march=native``, then without OpenMP, if the compiler refuses them). The library
file's name is a hash of the sources, flags and machine (CPU, architecture, C library), not of
the compiler: a cache shared by different machines keeps one build per kind of machine, and a
prebuilt cache loads where no compiler is installed.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import struct
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from . import cache as _cache

__all__ = ["ARG_FORMATS", "CALLS", "KernelUnavailable", "build_info", "geometry", "get",
           "load_now", "local_allreduce", "suffix"]

log = logging.getLogger("syncbn")

_SOURCES = ("kernel.c", "kernel_body.h", "local.h", "wire.h")
_VERSION = 9  # must match syncbn_kernel_version() in kernel.c
_BASE_FLAGS = ("-O3", "-fno-trapping-math", "-shared", "-fPIC", "-std=c11")
_OPTIONAL_FLAGS = (("-march=native", "-fopenmp"), ("-fopenmp",), ())
_lock = threading.Lock()
_state: dict[str, Any] = {"tried": False, "lib": None, "error": None, "seconds": None,
                          "path": None, "compiled": False, "flags": None, "private": False,
                          "problems": []}

# The four calls of a forward + backward (per data dtype) take one argument block each, packed
# with these formats; they must match the structs in kernel.c (pointers as int64, 0 for NULL).
ARG_FORMATS = {
    "forward_reduce": struct.Struct("<14q"),
    "forward_apply": struct.Struct("<4d26q"),
    "backward_reduce": struct.Struct("<d27q"),
    "backward_apply": struct.Struct("<2d23q"),
    "local_allreduce": struct.Struct("<11q"),  # local.h: the shared-memory all_reduce
}
_RESTYPES = {"forward_reduce": ctypes.c_int, "forward_apply": ctypes.c_int,
             "backward_reduce": ctypes.c_int, "backward_apply": ctypes.c_int}
# The loaded kernel's forward_reduce, forward_apply, backward_reduce and backward_apply per data
# dtype (float32, float64): each takes one block packed with ARG_FORMATS. Filled when it loads.
CALLS: dict[torch.dtype, tuple[Any, Any, Any, Any]] = {}


class KernelUnavailable(RuntimeError):
    """``SYNCBN_KERNEL=fused`` was asked for, but the kernel cannot be built or loaded."""


def get(required: bool = False, warn: bool = False) -> Any | None:
    """The loaded kernel library (a ``ctypes.CDLL``), or ``None`` when it cannot be had.

    Builds it on first use (a few seconds, once per machine: the result is cached). Raises
    :class:`KernelUnavailable` when it cannot be had and ``required`` (``SYNCBN_KERNEL=fused``);
    ``warn``: a one-time warning saying why when it cannot be had (``SYNCBN_KERNEL=auto``).
    """
    _ensure_loaded(warn)
    if _state["lib"] is None and required:
        raise KernelUnavailable(f"syncbn: SYNCBN_KERNEL=fused, but {_state['error']}")
    return _state["lib"]


def _ensure_loaded(warn: bool = False) -> None:
    """Build or load the library once per process (under a lock: threads may race here)."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _load(warn=warn)


def load_now(rebuild: bool = False) -> dict[str, Any]:
    """Build (``rebuild``: even if cached) or load the kernel now, whatever happened before;
    :func:`build_info` (``syncbn kernel``, which prints the problems instead of warning)."""
    with _lock, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _load(rebuild=rebuild)
    return build_info()


def build_info() -> dict[str, Any]:
    """What :func:`get` did: ``available``, ``path``, ``compiled`` (this process built it, else it
    came from the cache), ``seconds`` (build or load time), ``flags``, ``error``, ``private``
    (built in a private temporary directory: the cache could not be used) and ``problems``
    (what was refused on the way, as the warning said it)."""
    return {"available": _state["lib"] is not None, "path": _state["path"],
            "compiled": _state["compiled"], "seconds": _state["seconds"],
            "flags": _state["flags"], "error": _state["error"], "private": _state["private"],
            "problems": list(_state["problems"])}


def _compiler() -> str | None:
    if os.environ.get("CC"):
        return os.environ["CC"]
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and feature flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keys = ("model name", "flags", "Features")
        lines = [ln for ln in text.splitlines() if ln.startswith(keys)]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _load(rebuild: bool = False, warn: bool = False) -> None:
    start = time.perf_counter()
    _state["problems"] = []
    _state["lib"] = None  # a failed rebuild must not leave the old library reported
    try:
        _state["lib"] = _build_and_load(rebuild)
    except Exception as e:  # noqa: BLE001 - no compiler, a compile error, an unwritable cache
        _state["error"] = f"the fused CPU kernel is unavailable ({type(e).__name__}: {e})"
        if _state["problems"]:
            _state["error"] += " [" + "; ".join(_state["problems"]) + "]"
        if warn:
            warnings.warn(f"syncbn: {_state['error']}; using the plain ATen path "
                          "(same results, slower). Set SYNCBN_KERNEL=aten to silence this.",
                          RuntimeWarning, stacklevel=4)
    finally:
        _state["seconds"] = time.perf_counter() - start
        _state["tried"] = True
    if _state["lib"] is not None:
        log.info("syncbn: fused CPU kernel %s from %s in %.2f s",
                 "built" if _state["compiled"] else "loaded", _state["path"], _state["seconds"])
        if _state["problems"]:
            where = (" (in a private temporary directory, removed once loaded: each process "
                     "builds its own)" if _state["private"] else "")
            warnings.warn(f"syncbn: {'; '.join(_state['problems'])}. Using the kernel "
                          f"{'built' if _state['compiled'] else 'loaded'} at {_state['path']}"
                          f"{where}.", RuntimeWarning, stacklevel=4)


def _compile(cc: str, flags: tuple[str, ...], source: Path, out: Path) -> str | None:
    """Compile ``source`` into ``out`` (in a build directory, which is also the compiler's
    TMPDIR: a killed build leaves nothing elsewhere); the compiler's complaint, or None."""
    cmd = [cc, *flags, "-o", str(out), str(source)]
    env = {**os.environ, "TMPDIR": str(out.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env)
    if proc.returncode != 0:
        return f"{' '.join(cmd)}: {proc.stderr.strip()[-500:]}"
    return None


def _builds() -> list[tuple[tuple[str, ...], str]]:
    """``(flags, file stem)`` of each build, in order of preference. The stem is a hash of the
    sources, the flags, the kernel version and the machine (CPU model and features,
    architecture, C library), not of the compiler: a cached build is found, and verified
    against its manifest, without running (or having) one."""
    here = Path(__file__).with_name("csrc")
    sources = b"".join((here / name).read_bytes() for name in _SOURCES)
    libc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in getattr(
        os, "confstr_names", {}) else ""
    machine = f"{_cpu_id()}\n{platform.machine()}\n{sys.platform}\n{libc}".encode()
    out = []
    for optional in _OPTIONAL_FLAGS:
        flags = (*_BASE_FLAGS, *optional)
        key = hashlib.sha256(b"\0".join([sources, " ".join(flags).encode(),
                                         str(_VERSION).encode(), machine]))
        out.append((flags, f"kernel-{key.hexdigest()[:20]}"))
    return out


_FIX_DIR = ("not used as the kernel cache (fix: make it yours and writable only by you, "
            "e.g. chown it and chmod 700, or remove it; or set SYNCBN_CACHE_DIR to such a "
            "directory)")
_FIX_FILE = "not loaded (fix: `syncbn kernel --rebuild`, or delete it)"


def _build_and_load(rebuild: bool) -> Any:
    """Load the first verified build from the cache; else build one (under the cache's lock,
    or in a private directory when the cache cannot be used for building) and load it."""
    problems: list[str] = _state["problems"]
    builds = _builds()
    cache, refused = _cache.open_cache()
    problems.extend(f"{why}: {_FIX_DIR}" for why in refused)
    dirs = [cache]
    try:
        if not rebuild:
            for flags, stem in builds:
                try:
                    fd, _ = cache.open_verified(stem)
                except _cache.Untrusted as e:
                    problems.append(f"{e}: {_FIX_FILE}")
                    continue
                if fd is not None:
                    return _bind(fd, cache, flags, stem)
        cc = _compiler()
        if cc is None:
            raise FileNotFoundError("no C compiler found (set CC, or install cc/gcc/clang)")
        target = cache
        if not cache.writable:  # a read-only prebuilt cache without this machine's build
            log.info("syncbn: %s is read-only and holds no kernel for this machine: building "
                     "one in a private temporary directory", cache.path)
            target = _cache.private_dir()
            dirs.append(target)
        errors: list[str] = []
        for flags, stem in builds:
            while True:
                try:
                    with target.lock(stem) as locked:  # ranks starting together: one builds
                        return _build_one(cc, target, flags, stem, rebuild, locked, errors)
                except _cache.Untrusted as e:  # the lock file: build where nobody else writes
                    if target.private:
                        raise
                    problems.append(f"{e}: {_FIX_DIR}")
                    target = _cache.private_dir()
                    dirs.append(target)
                except _CompileError:
                    break  # the next set of flags
        raise RuntimeError("the compiler refused every set of flags: " + " | ".join(errors))
    finally:
        for d in dirs:
            d.close()


class _CompileError(Exception):
    """The compiler refused a set of flags (its complaint is in the build's ``errors``)."""


def _build_one(cc: str, target: _cache.CacheDir, flags: tuple[str, ...], stem: str,
               rebuild: bool, locked: bool, errors: list[str]) -> Any:
    """Under ``target``'s lock for ``stem``: load it if another process has just built it, else
    sweep dead builders' leftovers, compile, install (fsync'd, with its manifest) and load."""
    if not rebuild:  # another process may have built it while this one waited for the lock
        try:
            fd, _ = target.open_verified(stem)
        except _cache.Untrusted:
            fd = None  # already reported; replaced below
        if fd is not None:
            return _bind(fd, target, flags, stem)
    target.sweep(stem, locked)
    with target.build_dir(stem) as tmp:
        out = tmp / f"{stem}.so"
        error = _compile(cc, flags, Path(__file__).with_name("csrc") / "kernel.c", out)
        if error:
            errors.append(error)
            raise _CompileError(error)
        target.install(out, stem, {"flags": " ".join(flags), "kernel_version": _VERSION,
                                   "compiler": cc, "built": time.strftime("%Y-%m-%dT%H:%M:%S")})
    fd, _ = target.open_verified(stem)
    if fd is None:
        raise FileNotFoundError(f"{target.path / stem}.so vanished right after it was built")
    _state["compiled"] = True
    return _bind(fd, target, flags, stem)


def _bind(fd: int, cache: _cache.CacheDir, flags: tuple[str, ...], stem: str) -> Any:
    """dlopen the file open as ``fd`` (checked and verified: through ``/proc/self/fd``, the same
    file whatever became of its name) and bind its functions."""
    path = cache.path / f"{stem}.so"
    try:
        if os.path.isdir("/proc/self/fd"):
            lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
        else:  # no /proc (macOS): by name, then make sure the name gave the checked file
            lib = ctypes.CDLL(str(path))
            held, named = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) != (named.st_dev, named.st_ino):
                raise RuntimeError(f"{path} was replaced while it was being loaded")
    finally:
        os.close(fd)
    lib.syncbn_kernel_version.restype, lib.syncbn_kernel_version.argtypes = ctypes.c_int, []
    if lib.syncbn_kernel_version() != _VERSION:
        raise RuntimeError(f"{path}: kernel version {lib.syncbn_kernel_version()}, expected "
                           f"{_VERSION}")
    for dtype in _DTYPES:
        fns = []
        for name, restype in _RESTYPES.items():
            fn = getattr(lib, f"syncbn_{name}_{suffix(dtype)}")
            fn.restype, fn.argtypes = restype, [ctypes.c_char_p]
            fns.append(fn)
        CALLS[dtype] = tuple(fns)  # type: ignore[assignment]
    fn = lib.syncbn_local_allreduce
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_char_p]
    _state["local_allreduce"] = fn
    _state["path"], _state["private"], _state["flags"] = str(path), cache.private, " ".join(flags)
    return lib


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}
_DTYPES = (torch.float32, torch.float64)


def geometry(input: torch.Tensor, *params: torch.Tensor | None) -> tuple[int, int, int, int] | None:
    """``(N, C, S, nsc)`` when the kernel takes this input as it lies in memory, with these
    per-channel tensors (weight, bias, running statistics), else None.

    The input must be a plain CPU float32/float64 tensor, contiguous or channels_last, and every
    per-channel tensor absent or a contiguous float32/float64 CPU tensor. ``S`` is the product of
    the dims after the channel dim; ``nsc`` is 1 when channels are the innermost dim
    (channels_last, or ``(N, C)`` input), 0 for torch's default ``(N, C, S)`` order.
    """
    if (type(input) is not torch.Tensor and type(input) is not torch.nn.Parameter) or (
            not input.is_cpu or input.dtype not in _DTYPES):
        return None
    for t in params:
        if t is not None and (not t.is_cpu or t.dtype not in _DTYPES or not t.is_contiguous()):
            return None
    shape = input.shape
    n, c = shape[0], shape[1]
    s = 1
    for d in shape[2:]:
        s *= d
    if c == 0:
        return None
    if input.is_contiguous():
        return n, c, s, int(s == 1)
    fmt = _CHANNELS_LAST.get(input.dim())
    if fmt is not None and input.is_contiguous(memory_format=fmt):
        return n, c, s, 1
    return None


def local_allreduce() -> Any | None:
    """The kernel's shared-memory all_reduce (``csrc/local.h``; one block packed with
    ``ARG_FORMATS["local_allreduce"]``), or None when the kernel is not loaded (whatever
    ``SYNCBN_KERNEL`` says: the transport does not depend on the path)."""
    _ensure_loaded()
    return _state.get("local_allreduce")


def suffix(dtype: torch.dtype) -> str:
    """The kernels' name suffix for a data dtype."""
    return "f32" if dtype == torch.float32 else "f64"
