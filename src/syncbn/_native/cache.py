"""Where the compiled kernel lives, and when a file there may be loaded (used by ``_kernel``).

A library that ``dlopen`` loads runs its constructors in this process, so a kernel is loaded
only from a place nobody else can write:

* the directory: owned by this user (or by root, for an explicitly set ``SYNCBN_CACHE_DIR``: a
  read-only prebuilt cache in an image), writable by nobody else, not a symbolic link; syncbn
  creates it 0700;
* the library and its manifest (``kernel-<key>.so``, ``kernel-<key>.json``): regular files with
  the same owners, writable by nobody else, opened with ``O_NOFOLLOW`` and checked on the open
  file descriptor; the manifest's sha256 and size must match the bytes read from that
  descriptor, and the library is then loaded through ``/proc/self/fd/N``: the very file that
  was checked, whatever happens to the name meanwhile;
* the lock file and a build's temporary directory (``.build-<key>-<pid>-*``, swept once its
  builder has gone): the same rules.

Anything else is not loaded; :class:`Untrusted` says what was found, who owns it and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["CacheDir", "Untrusted", "describe_owner", "open_cache", "pid_alive", "private_dir"]

_READ = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(
    os, "O_NONBLOCK", 0)  # never block on a planted FIFO; S_ISREG is checked next
_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(
    os, "O_CLOEXEC", 0)
_STALE_BUILD_S = 3600.0  # another key's build dir whose builder's pid is gone, older than this


class Untrusted(Exception):
    """A directory or file that must not be used; the message says what and what to do."""


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else -1


def describe_owner(uid: int) -> str:
    """``uid 65534 (nobody)``."""
    try:
        import pwd

        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (another user's counts as alive)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _problem(st: os.stat_result, path: Path, kind: str, owners: frozenset[int]) -> str | None:
    """Why an opened ``kind`` ("directory" or "file") must not be trusted, or None."""
    want_dir = kind == "directory"
    is_dir, is_file = stat.S_ISDIR(st.st_mode), stat.S_ISREG(st.st_mode)
    if (want_dir and not is_dir) or (not want_dir and not is_file):
        return f"{path} is not a regular {kind}"
    if st.st_uid not in owners:
        allowed = " or ".join(describe_owner(u) for u in sorted(owners, reverse=True))
        return f"{path} is owned by {describe_owner(st.st_uid)}, not by {allowed}"
    if st.st_mode & 0o022:
        who = " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002))
                           if st.st_mode & bit)
        return (f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o}, owner "
                f"{describe_owner(st.st_uid)})")
    return None


def _open_checked(name: str | Path, kind: str, owners: frozenset[int],
                  dir_fd: int | None = None, shown: Path | None = None) -> int | None:
    """An fd of ``name`` (relative to ``dir_fd``) after the checks, None when it does not
    exist; :class:`Untrusted` for anything else (a symbolic link included)."""
    shown = shown or Path(name)
    try:
        fd = os.open(name, _DIR if kind == "directory" else _READ, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            with contextlib.suppress(OSError):
                st = os.lstat(name, dir_fd=dir_fd)
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(name, dir_fd=dir_fd)
                    raise Untrusted(f"{shown} is a symbolic link (to {target}, owned by "
                                    f"{describe_owner(st.st_uid)})") from None
            raise Untrusted(f"{shown} is not a {kind} ({e.strerror})") from None
        raise
    try:
        why = _problem(os.fstat(fd), shown, kind, owners)
    except BaseException:
        os.close(fd)
        raise
    if why:
        os.close(fd)
        raise Untrusted(why)
    return fd


class CacheDir:
    """An opened, checked cache directory: every later name is resolved relative to its fd."""

    def __init__(self, path: Path, fd: int, owners: frozenset[int], private: bool) -> None:
        self.path, self.fd, self.owners, self.private = path, fd, owners, private
        self.writable = os.access(".", os.W_OK, dir_fd=fd) if os.access in os.supports_dir_fd \
            else os.access(path, os.W_OK)

    def close(self) -> None:
        """Close it; a private directory is removed (a loaded library stays mapped)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.private:
            shutil.rmtree(self.path, ignore_errors=True)

    def open_verified(self, stem: str) -> tuple[int | None, dict[str, Any] | None]:
        """``(fd of <stem>.so, its manifest)`` when both pass the checks and the bytes match the
        manifest; ``(None, None)`` when the library is not there; :class:`Untrusted` else."""
        so = self.path / f"{stem}.so"
        fd = _open_checked(f"{stem}.so", "file", self.owners, self.fd, so)
        if fd is None:
            return None, None
        try:
            mfd = _open_checked(f"{stem}.json", "file", self.owners, self.fd,
                                self.path / f"{stem}.json")
            if mfd is None:
                raise Untrusted(f"{so} has no manifest {stem}.json (an interrupted build, or not "
                                "built by this version of syncbn)")
            with os.fdopen(mfd, "rb") as f:
                raw = f.read(65536)
            manifest = _manifest(raw)
            if manifest is None:  # reported like a damaged library: rebuilt, never fatal
                raise Untrusted(f"{self.path / stem}.json is not a syncbn manifest (not a JSON "
                                "object with a 64-hex-digit \"sha256\" and an integer \"size\")")
            want_sha, want_size = manifest["sha256"], manifest["size"]
            size, digest = _digest(fd)
            if size != want_size or digest != want_sha:
                raise Untrusted(f"{so} does not match its manifest ({size} bytes, sha256 "
                                f"{digest[:12]}..., expected {want_size} bytes, "
                                f"{want_sha[:12]}...): damaged, or written by something else")
        except BaseException:
            os.close(fd)
            raise
        return fd, manifest

    @contextlib.contextmanager
    def lock(self, stem: str) -> Iterator[bool]:
        """An exclusive ``flock`` on ``<stem>.lock`` (created 0600, checked like the library).
        Yields whether a lock is held (False where the platform has no flock: builders may then
        each build once, harmlessly)."""
        try:
            import fcntl
        except ImportError:
            yield False
            return
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        shown = self.path / f"{stem}.lock"
        try:
            fd = os.open(f"{stem}.lock", flags, 0o600, dir_fd=self.fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise Untrusted(f"{shown} is a symbolic link") from None
            raise
        try:
            why = _problem(os.fstat(fd), shown, "file", self.owners)
            if why:
                raise Untrusted(why)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield True
        finally:
            os.close(fd)  # closing releases the flock

    def sweep(self, stem: str, locked: bool) -> None:
        """Remove build directories left by builders that were killed: this key's (under its
        lock, every one is stale), and any other whose builder's pid is gone for an hour."""
        for entry in os.scandir(self.fd):
            name = entry.name
            if not name.startswith(".build-"):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
                pid = int(name.split("-")[3])
            except (OSError, ValueError, IndexError):
                continue
            if st.st_uid != _uid():
                continue
            mine = name.startswith(f".build-{stem}-")
            if (mine and (locked or not pid_alive(pid))) or (
                    not pid_alive(pid) and time.time() - st.st_mtime > _STALE_BUILD_S):
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(self.path / name, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=self.fd)

    @contextlib.contextmanager
    def build_dir(self, stem: str) -> Iterator[Path]:
        """A fresh 0700 directory in the cache for one build (``.build-<stem>-<pid>-*``: the pid
        lets :meth:`sweep` remove it if this process is killed); removed on every way out."""
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{stem}-{os.getpid()}-", dir=self.path))
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def install(self, built: Path, stem: str, manifest: dict[str, Any]) -> None:
        """Move the library ``built`` (in a :meth:`build_dir`) into place as ``<stem>.so``, fsync'd,
        then its manifest (sha256 and size of the bytes written) as ``<stem>.json``."""
        with contextlib.suppress(FileNotFoundError):  # the compiler's mode follows the umask
            os.chmod(built, 0o755)  # (e.g. 002 -> 775), which the loader would refuse
        fd = _open_checked(built, "file", frozenset({_uid()}))
        if fd is None:
            raise FileNotFoundError(f"the compiler wrote no {built}")
        try:
            os.fsync(fd)
            size, digest = _digest(fd)
        finally:
            os.close(fd)
        manifest = {**manifest, "sha256": digest, "size": size}
        note = built.with_suffix(".json")
        nfd = os.open(note, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        os.fchmod(nfd, 0o644)  # whatever the umask: the loader refuses group/other-writable
        with os.fdopen(nfd, "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(built, self.path / f"{stem}.so")  # atomic: a reader sees the old or the new
        os.rename(note, self.path / f"{stem}.json")
        with contextlib.suppress(OSError):
            os.fsync(self.fd)


def _manifest(raw: bytes) -> dict[str, Any] | None:
    """The manifest in ``raw``, or None when it is not one: not JSON (or nested too deep, or an
    integer too long to parse), not an object, or without a 64-hex-digit ``sha256`` string and
    a non-negative integer ``size`` (``1e400``, ``NaN``, ``"12"`` and ``true`` are not)."""
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        return None
    if not isinstance(manifest, dict):
        return None
    sha, size = manifest.get("sha256"), manifest.get("size")
    if not (isinstance(sha, str) and len(sha) == 64
            and all(ch in "0123456789abcdef" for ch in sha)):
        return None
    if type(size) is not int or size < 0:
        return None
    return manifest


def _digest(fd: int) -> tuple[int, str]:
    h, size, offset = hashlib.sha256(), 0, 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            return size, h.hexdigest()
        h.update(chunk)
        size += len(chunk)
        offset += len(chunk)


def _make_dir(path: Path) -> None:
    """Create ``path`` 0700 (its missing parents with the default mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)


def open_cache() -> tuple[CacheDir, list[str]]:
    """The cache directory to use, opened and checked, and what was refused on the way.

    ``SYNCBN_CACHE_DIR`` when set (owned by this user or root; it may be read-only), else the
    first usable of ``$XDG_CACHE_HOME/syncbn`` (or ``~/.cache/syncbn``) and ``<tmp>/syncbn-<uid>``
    (owned by this user and writable). When none is, a private directory (a fresh 0700
    ``mkdtemp``, removed once the library is loaded): this process then builds its own kernel.
    """
    uid = _uid()
    explicit = os.environ.get("SYNCBN_CACHE_DIR")
    refused: list[str] = []
    if explicit:
        choices = [(Path(explicit), frozenset({uid, 0}), False)]
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        choices = [(Path(base) / "syncbn", frozenset({uid}), True),
                   (Path(tempfile.gettempdir()) / f"syncbn-{uid}", frozenset({uid}), True)]
    for path, owners, need_write in choices:
        try:
            _make_dir(path)
        except OSError:
            if not explicit:
                continue  # a read-only home: the next place
        try:
            fd = _open_checked(path, "directory", owners)
        except Untrusted as e:
            refused.append(str(e))
            continue
        except OSError as e:
            refused.append(f"{path}: {e.strerror or e}")
            continue
        if fd is None:
            refused.append(f"{path} does not exist and cannot be created")
            continue
        cache = CacheDir(path, fd, owners, private=False)
        if need_write and not cache.writable:
            cache.close()
            continue
        return cache, refused
    return private_dir(), refused


def private_dir() -> CacheDir:
    """A fresh 0700 directory of this process (``mkdtemp``), removed by :meth:`CacheDir.close`."""
    path = Path(tempfile.mkdtemp(prefix=f"syncbn-kernel-{os.getpid()}-"))
    try:
        fd = _open_checked(path, "directory", frozenset({_uid()}))
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    if fd is None:
        raise FileNotFoundError(f"{path} vanished right after mkdtemp made it")
    return CacheDir(path, fd, frozenset({_uid()}), private=True)
