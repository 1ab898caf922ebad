"""The kernel cache (``_cache.py``, ``_kernel.py``): what is loaded, from where, what is refused.

Each rule of docs/troubleshooting.md ("The kernel cache") has a test: a directory or file of
another user, writable by group or others, a symbolic link in place of either, a damaged
library, a lock file of another user, the default directories, loading without a compiler, and
no leftovers after a failed or killed build. Loads run in a fresh interpreter (the kernel is
loaded once per process, and a damaged library must show as a failed child, not a dead test
run), always with ``SYNCBN_CACHE_DIR`` (or ``XDG_CACHE_HOME``/``TMPDIR``) under ``tmp_path``.
"Another user" is uid 65534 (``os.chown``; skipped with the reason where that is not allowed).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import harness
from syncbn._native import cache as _cache
from syncbn._native import kernel as _kernel

pytestmark = pytest.mark.timeout(120)

OTHER = 65534  # nobody

_LOAD = textwrap.dedent("""
    import json, warnings
    from syncbn._native import kernel as _kernel
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = _kernel.get(warn=True)  # as SYNCBN_KERNEL=auto asks for it
        if lib is not None:  # the library works: one call of its own
            assert lib.syncbn_kernel_version() == _kernel._VERSION
    print(json.dumps({"info": _kernel.build_info(),
                      "warnings": [str(w.message) for w in caught if "syncbn" in str(w.message)]}))
""")


def _load(tmp_path: Path, cache: Path | None, **env: str | None) -> tuple[dict, str]:
    """Load the kernel in a fresh interpreter; (its report, its warning text)."""
    overrides: dict[str, str | None] = {"SYNCBN_KERNEL": "auto", "TMPDIR": str(_tmp(tmp_path))}
    overrides["SYNCBN_CACHE_DIR"] = str(cache) if cache is not None else None
    overrides.update(env)
    proc = subprocess.run([sys.executable, "-c", _LOAD], env=harness.child_env(**overrides),
                          capture_output=True, text=True, timeout=100, check=False)
    assert proc.returncode == 0, (f"the loading process failed (exit {proc.returncode}: a "
                                  f"signal if negative)\n{proc.stdout}\n{proc.stderr}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print("warnings:", report["warnings"])
    return report, "\n".join(report["warnings"])


def _tmp(tmp_path: Path) -> Path:
    """The children's TMPDIR (private builds go there): checked for leftovers."""
    path = tmp_path / "tmpdir"
    path.mkdir(exist_ok=True)
    return path


def _no_leftovers(tmp_path: Path) -> None:
    left = [p.name for p in _tmp(tmp_path).iterdir() if p.name.startswith("syncbn-kernel-")]
    assert not left, f"private build directories left behind: {left}"


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> tuple[Path, str]:
    """A cache with a verified build for this machine (built once): (directory, file stem)."""
    if _kernel._compiler() is None:
        pytest.skip("no C compiler on this machine (CC unset, no cc/gcc/clang on PATH)")
    cache = tmp_path_factory.mktemp("golden") / "cache"
    proc = subprocess.run([sys.executable, "-m", "syncbn", "kernel"], capture_output=True,
                          text=True, timeout=100, check=False,
                          env=harness.child_env(SYNCBN_CACHE_DIR=str(cache)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stem = Path(proc.stdout.split()[3]).stem  # "syncbn kernel: built <path> in ..."
    assert (cache / f"{stem}.so").is_file(), proc.stdout
    return cache, stem


@pytest.fixture
def cache(tmp_path, golden) -> Path:
    """A private copy of the golden cache (0700, files as the build left them)."""
    path = tmp_path / "cache"
    shutil.copytree(golden[0], path)
    os.chmod(path, 0o700)
    return path


@pytest.fixture
def stem(golden) -> str:
    return golden[1]


@pytest.fixture
def chown_ok(tmp_path) -> None:
    probe = tmp_path / "chown-probe"
    probe.touch()
    try:
        os.chown(probe, OTHER, -1)
    except (PermissionError, AttributeError) as e:
        pytest.skip(f"cannot chown a file to uid {OTHER} here ({e}): run as root to test "
                    "ownership rules")


def _fresh_build(report: dict, path: Path) -> None:
    """The kernel was rebuilt in place at ``path``, which now passes the rules."""
    info = report["info"]
    assert info["available"] and info["compiled"] and info["path"] == str(path), info
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _built_privately(report: dict, tmp_path: Path) -> None:
    info = report["info"]
    assert info["available"] and info["private"] and info["compiled"], info
    assert Path(info["path"]).parent.parent == _tmp(tmp_path), info
    _no_leftovers(tmp_path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, golden) -> tuple[Path, Path]:
    """(a library whose constructor creates a marker file: what an attacker would plant,
    that marker's path)."""
    tmp_path = tmp_path_factory.mktemp("planted")
    marker = tmp_path / "constructor-ran"
    src = tmp_path / "planted.c"
    src.write_text(textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void planted(void) {{
          FILE *f = fopen("{marker}", "w");
          if (f) fclose(f);
        }}
        int syncbn_kernel_version(void) {{ return {_kernel._VERSION}; }}
    """))
    out = tmp_path / "planted.so"
    subprocess.run([_kernel._compiler() or "cc", "-shared", "-fPIC", "-o", str(out), str(src)],
                   check=True, timeout=60)
    return out, marker


def _forge(cache: Path, stem: str, library: Path) -> None:
    """Put ``library`` in place of the kernel with a manifest that matches it."""
    shutil.copy(library, cache / f"{stem}.so")
    old = cache / f"{stem}.json"
    manifest = json.loads(old.read_text()) if old.exists() else {}
    with open(library, "rb") as f:
        size, digest = _cache._digest(f.fileno())
    manifest.update(size=size, sha256=digest)
    (cache / f"{stem}.json").write_text(json.dumps(manifest))


# --- the directory -------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["owner", "group-writable", "world-writable"])
def test_a_directory_others_can_write_is_not_loaded_from(tmp_path, cache, stem, problem, planted,
                                                         chown_ok):
    """The issue's reproduction: a planted library (with a manifest that matches it) in a
    directory of another user, or one others can write: its constructor must never run."""
    library, marker = planted
    _forge(cache, stem, library)
    if problem == "owner":
        for p in (cache, *cache.iterdir()):
            os.chown(p, OTHER, -1)
    os.chmod(cache, {"owner": 0o755, "group-writable": 0o770, "world-writable": 0o757}[problem])
    report, text = _load(tmp_path, cache)
    assert not marker.exists(), "the planted library's constructor ran"
    expected = {"owner": f"{cache} is owned by uid {OTHER}", "group-writable":
                f"{cache} is writable by group (mode 770", "world-writable":
                f"{cache} is writable by others (mode 757"}[problem]
    assert expected in text and "not used as the kernel cache" in text, text
    assert "fix:" in text, text
    _built_privately(report, tmp_path)


def test_a_symbolic_link_in_place_of_the_directory_is_refused(tmp_path, cache):
    link = tmp_path / "link"
    link.symlink_to(cache)
    report, text = _load(tmp_path, link)
    assert f"{link} is a symbolic link (to {cache}" in text, text
    _built_privately(report, tmp_path)


def test_default_directories(tmp_path, chown_ok):
    """No SYNCBN_CACHE_DIR: ``$XDG_CACHE_HOME/syncbn`` is made 0700; when it cannot be made,
    ``<tmp>/syncbn-<uid>`` is used, unless another user made it first (the issue's attack)."""
    xdg = tmp_path / "xdg"
    report, text = _load(tmp_path, None, XDG_CACHE_HOME=str(xdg))
    assert stat.S_IMODE(os.stat(xdg / "syncbn").st_mode) == 0o700
    assert report["info"]["path"].startswith(str(xdg / "syncbn")) and not text, report
    blocked = tmp_path / "a-file"
    blocked.touch()  # XDG_CACHE_HOME/syncbn cannot be made: the temp dir is next
    squatted = _tmp(tmp_path) / f"syncbn-{os.getuid()}"
    squatted.mkdir(mode=0o777)
    os.chmod(squatted, 0o777)
    os.chown(squatted, OTHER, -1)
    report, text = _load(tmp_path, None, XDG_CACHE_HOME=str(blocked))
    assert f"{squatted} is owned by uid {OTHER}" in text, text
    _built_privately(report, tmp_path)
    assert not list(squatted.iterdir()), "wrote into a directory another user owns"


def test_a_root_owned_prebuilt_cache_is_trusted_only_when_set_explicitly(tmp_path, cache, stem,
                                                                         monkeypatch):
    """As a user other than root (uid 4321, pretended in this process: the interpreter may not
    be readable by another account), a root-owned cache nobody else can write is accepted as
    ``SYNCBN_CACHE_DIR`` (a prebuilt cache in an image), never as a default directory."""
    if os.getuid() != 0:
        pytest.skip("the cache must be owned by root for this test: run it as root")
    monkeypatch.setattr(_cache, "_uid", lambda: 4321)
    os.chmod(cache, 0o755)
    monkeypatch.setenv("SYNCBN_CACHE_DIR", str(cache))
    opened, refused = _cache.open_cache()
    try:
        assert not refused and not opened.private and opened.path == cache, refused
        fd, manifest = opened.open_verified(stem)
        assert fd is not None and manifest["size"] == os.fstat(fd).st_size
        os.close(fd)
    finally:
        opened.close()
    monkeypatch.delenv("SYNCBN_CACHE_DIR")
    default = tmp_path / "syncbn"  # $XDG_CACHE_HOME/syncbn
    os.rename(cache, default)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", str(_tmp(tmp_path)))
    monkeypatch.setattr(_cache, "private_dir", lambda: None)  # root's mkdtemp: not 4321's
    opened, refused = _cache.open_cache()
    assert opened is None, opened.path
    assert refused and f"{default} is owned by uid 0 (root), not by uid 4321" in refused[0], refused


# --- the files -----------------------------------------------------------------------------


@pytest.mark.parametrize("which,problem", [
    ("so", "owner"), ("so", "group-writable"), ("json", "world-writable"), ("so", "symlink"),
    ("json", "missing")])
def test_a_file_others_could_write_is_replaced(tmp_path, cache, stem, which, problem, chown_ok):
    """The library or its manifest of another user, writable by others, or a symbolic link: not
    loaded, one warning naming it, rebuilt in place (the directory is this user's)."""
    path = cache / f"{stem}.{which}"
    if problem == "owner":
        os.chown(path, OTHER, -1)
    elif problem == "group-writable":
        os.chmod(path, 0o775)
    elif problem == "world-writable":
        os.chmod(path, 0o757)
    elif problem == "symlink":
        elsewhere = tmp_path / f"elsewhere.{which}"
        shutil.copy(path, elsewhere)  # the same bytes: only the link is wrong
        path.unlink()
        path.symlink_to(elsewhere)
    else:
        path.unlink()
    report, text = _load(tmp_path, cache)
    expected = {"owner": f"{path} is owned by uid {OTHER}",
                "group-writable": f"{path} is writable by group (mode 775",
                "world-writable": f"{path} is writable by others (mode 757",
                "symlink": f"{path} is a symbolic link (to {tmp_path / ('elsewhere.' + which)}",
                "missing": f"{cache / stem}.so has no manifest {stem}.json"}[problem]
    assert expected in text and "syncbn kernel --rebuild" in text, text
    _fresh_build(report, cache / f"{stem}.so")
    if problem == "symlink":
        assert not (cache / f"{stem}.{which}").is_symlink()


def test_a_lock_file_of_another_user_sends_the_build_elsewhere(tmp_path, cache, stem, chown_ok):
    (cache / f"{stem}.so").unlink()  # a build is needed, under the lock
    lock = cache / f"{stem}.lock"
    lock.touch()
    os.chown(lock, OTHER, -1)
    report, text = _load(tmp_path, cache)
    assert f"{lock} is owned by uid {OTHER}" in text, text
    _built_privately(report, tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "zero-tailed"])
def test_a_damaged_library_is_rebuilt_or_named(tmp_path, cache, stem, damage):
    """A truncated or zero-tailed library (a full disk, a killed copy) is never dlopen'ed (that
    was a SIGBUS/SIGSEGV on every run): rebuilt under the lock with a compiler; without one, a
    warning names the file and how to fix it, and the plain path is used."""
    path = cache / f"{stem}.so"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        if damage == "truncated":
            f.truncate(size // 2)
        else:
            f.seek(size // 2)
            f.write(b"\0" * (size - size // 2))
    if damage == "truncated":  # no compiler: named, with the fix
        report, text = _load(tmp_path, cache, PATH=str(tmp_path / "no-bin"), CC=None)
        assert not report["info"]["available"], report
        assert f"{path} does not match its manifest" in text, text
        assert "syncbn kernel --rebuild" in text and "or delete it" in text, text
        assert "plain ATen path" in text, text
    report, text = _load(tmp_path, cache)
    assert f"{path} does not match its manifest" in text, text
    _fresh_build(report, path)
    if damage == "zero-tailed":
        report, text = _load(tmp_path, cache)  # repaired: loads quietly
        assert report["info"]["available"] and not report["info"]["compiled"] and not text


# Manifests that are not syncbn's: each must read as "not a manifest" (a rebuild), never as an
# exception that escapes (``"size": 1e400`` raised OverflowError: the kernel was off on every run).
_SHA = '"' + "0" * 64 + '"'


def _manifest_text(size: str, sha: str = _SHA) -> str:
    return '{"sha256": ' + sha + ', "size": ' + size + "}"


BAD_MANIFESTS = {
    "size-1e400": _manifest_text("1e400"),
    "size--1e400": _manifest_text("-1e400"),
    "size-NaN": _manifest_text("NaN"),
    "size-Infinity": _manifest_text("Infinity"),
    "size-string": _manifest_text('"7"'),
    "size-true": _manifest_text("true"),
    "size-negative": _manifest_text("-7"),
    "size-huge-int": _manifest_text("9" * 5000),
    "sha-number": _manifest_text("7", sha="12"),
    "sha-short": _manifest_text("7", sha='"abc"'),
    "list": "[1, 2]",
    "string": '"kernel"',
    "null": "null",
    "nested": "[" * 60000,
    "not-utf8": b'{"sha256": "\xff\xfe", "size": 7}',
    "empty": "",
}


@pytest.mark.parametrize("content", BAD_MANIFESTS.values(), ids=BAD_MANIFESTS.keys())
def test_an_unreadable_manifest_is_untrusted_not_an_error(tmp_path, monkeypatch, content):
    """In this process, no compiler needed: ``open_verified`` reads any of these as "not a
    syncbn manifest" (which the loader reports and rebuilds); a valid one is accepted."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    library = cache / "kernel-test.so"
    library.write_bytes(b"library!")  # hashed, never loaded
    library.chmod(0o644)
    manifest = cache / "kernel-test.json"
    manifest.write_bytes(content if isinstance(content, bytes) else content.encode())
    manifest.chmod(0o644)
    monkeypatch.setenv("SYNCBN_CACHE_DIR", str(cache))
    opened, refused = _cache.open_cache()
    try:
        assert not refused and opened.path == cache, refused
        with pytest.raises(_cache.Untrusted, match=f"{manifest} is not a syncbn manifest"):
            opened.open_verified("kernel-test")
        with open(library, "rb") as f:
            size, digest = _cache._digest(f.fileno())
        manifest.write_text(json.dumps({"sha256": digest, "size": size}))
        fd, read = opened.open_verified("kernel-test")
        assert fd is not None and read == {"sha256": digest, "size": size}
        os.close(fd)
    finally:
        opened.close()


@pytest.mark.parametrize("which", ["size-1e400", "nested"])
def test_an_unreadable_manifest_means_a_rebuild(tmp_path, cache, stem, which):
    """The issue's reproduction, in a fresh process: the kernel is rebuilt in place (with a
    valid manifest) and used, not disabled."""
    (cache / f"{stem}.json").write_text(BAD_MANIFESTS[which])
    report, text = _load(tmp_path, cache)
    assert f"{cache / stem}.json is not a syncbn manifest" in text, text
    assert "syncbn kernel --rebuild" in text, text
    _fresh_build(report, cache / f"{stem}.so")
    assert json.loads((cache / f"{stem}.json").read_text())["size"] == (
        cache / f"{stem}.so").stat().st_size


# --- without a compiler, and what builds leave behind ----------------------------------------


def test_a_valid_cache_loads_without_a_compiler(tmp_path, cache, stem):
    """``syncbn kernel`` in an image, then training where no compiler is installed."""
    report, text = _load(tmp_path, cache, PATH=str(tmp_path / "no-bin"), CC=None)
    info = report["info"]
    assert info["available"] and not info["compiled"], info
    assert info["path"] == str(cache / f"{stem}.so") and not text, report


def test_a_build_under_a_permissive_umask_loads(tmp_path):
    """umask 002 (common on shared machines): the compiler writes the library 775 and a plain
    open() the manifest 664; both are set to what the loader accepts, not refused as unsafe."""
    old = os.umask(0o002)  # inherited by the child, and by its compiler
    try:
        report, text = _load(tmp_path, tmp_path / "cache")
    finally:
        os.umask(old)
    info = report["info"]
    assert info["available"] and info["compiled"] and not text, report
    for name in os.listdir(tmp_path / "cache"):
        assert not os.lstat(tmp_path / "cache" / name).st_mode & 0o022, name
    report, text = _load(tmp_path, tmp_path / "cache")  # and the next process loads it
    assert report["info"]["available"] and not report["info"]["compiled"] and not text, report


def test_a_failed_build_leaves_nothing(tmp_path):
    cache = tmp_path / "cache"
    report, text = _load(tmp_path, cache, CC="false")
    assert not report["info"]["available"] and "compiler refused every set of flags" in text
    left = sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))
    assert not left, f"a failed build left {left} in the cache"
    assert not list(_tmp(tmp_path).iterdir())


def test_a_killed_build_is_swept_by_the_next(tmp_path, golden):
    """A builder killed mid-compile (SIGKILL: no cleanup runs) leaves its build directory; the
    next build of the same kernel removes it."""
    cache, started = tmp_path / "cache", tmp_path / "started"
    slow_cc = tmp_path / "slow-cc"
    slow_cc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        while [ "$1" != "-o" ]; do shift; done
        echo half-written > "$2"
        : > "{started}"
        exec sleep 60
    """))
    slow_cc.chmod(0o755)
    env = harness.child_env(SYNCBN_CACHE_DIR=str(cache), CC=str(slow_cc),
                            TMPDIR=str(_tmp(tmp_path)))
    proc = subprocess.Popen([sys.executable, "-c", _LOAD], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the loader and its compiler
        proc.wait(timeout=10)
    left = [p.name for p in cache.iterdir() if not p.name.endswith(".lock")]
    assert left and all(n.startswith(".build-") for n in left), left
    report, _ = _load(tmp_path, cache)
    stem = golden[1]
    assert report["info"]["compiled"] and report["info"]["path"] == str(cache / f"{stem}.so")
    after = sorted(p.name for p in cache.iterdir())
    assert after == sorted(f"{stem}.{e}" for e in ("json", "lock", "so")), after
