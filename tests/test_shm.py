"""The shared-memory all_reduce (``_shm.py``, ``_native/csrc/local.h``) in one process: its ranks are
threads (the kernel's call releases the GIL), so sums, errors and bounds are tested without
spawning. The multi-process behaviour is in test_distributed.py (every CPU test there runs on it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from syncbn import _shm
from syncbn._native import kernel as _kernel

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def kernel_needed():
    if not _shm.available():
        pytest.skip(f"the kernel is not available here: {_kernel.build_info()['error']}")


def _groups(tmp_path, world, slot_len=16, timeout=5.0, pids=None):
    path = str(tmp_path / "segment")
    pids = pids or [os.getpid()] * world
    first = _shm.LocalGroup(path, world, 0, slot_len, timeout, pids[0], create=True)
    rest = [_shm.LocalGroup(path, world, r, slot_len, timeout, pids[r], create=False)
            for r in range(1, world)]
    first.unlink()
    return [first, *rest]


def _run(groups, buffers, spin_us=2000.0):
    """Every rank's all_reduce in a thread of its own; returns each one's error (or None)."""
    errors = [None] * len(groups)

    def rank(r):
        try:
            groups[r].all_reduce(buffers[r], spin_us=spin_us)
        except _shm.LocalError as e:
            errors[r] = str(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(len(groups))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return errors


@pytest.mark.parametrize("world", [2, 3, 5])
def test_sums_are_exact_and_identical_on_every_rank(tmp_path, world):
    groups = _groups(tmp_path, world)
    g = torch.Generator().manual_seed(world)
    for step in range(6):  # both slots, several times
        data = [torch.randn(11, dtype=torch.float64, generator=g) * 10 ** step for _ in groups]
        buffers = [d.clone() for d in data]
        assert _run(groups, buffers, spin_us=0 if step % 2 else 2000) == [None] * world
        expected = data[0].clone()
        for d in data[1:]:
            expected += d  # rank order, as the kernel adds
        for b in buffers:
            assert torch.equal(b, expected), (step, b, expected)


def test_a_rank_that_never_arrives_times_out(tmp_path):
    groups = _groups(tmp_path, 2, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(_shm.LocalError, match=r"timed out after 0.3 s waiting for rank 1 of "
                                                r"the group \(shared-memory all_reduce, pass 1"):
        groups[0].all_reduce(torch.ones(4, dtype=torch.float64))
    assert time.monotonic() - start < 5
    with pytest.raises(_shm.LocalError, match="failed earlier"):  # unusable afterwards
        groups[0].all_reduce(torch.ones(4, dtype=torch.float64))


def test_a_rank_that_exited_is_reported_at_once(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(gone.stdout)  # reaped: no such process any more
    groups = _groups(tmp_path, 2, timeout=30.0, pids=[os.getpid(), dead_pid])
    start = time.monotonic()
    with pytest.raises(_shm.LocalError, match="rank 1 of the group exited while this rank "
                                                "waited for it"):
        groups[0].all_reduce(torch.ones(4, dtype=torch.float64))
    assert time.monotonic() - start < 5, "the exit should be seen long before the timeout"


def test_buffers_of_different_lengths_are_an_error_on_every_rank(tmp_path):
    groups = _groups(tmp_path, 2)
    errors = _run(groups, [torch.ones(5, dtype=torch.float64), torch.ones(7, dtype=torch.float64)])
    assert "rank 1 of the group sent 7 numbers, this rank 5" in errors[0], errors
    assert "rank 0 of the group sent 5 numbers, this rank 7" in errors[1], errors


def test_a_buffer_longer_than_the_slots_is_refused(tmp_path):
    groups = _groups(tmp_path, 2, slot_len=8)
    with pytest.raises(_shm.LocalError, match="9 numbers do not fit the group's shared-memory "
                                                "slots of 8"):
        groups[0].all_reduce(torch.ones(9, dtype=torch.float64))


def test_the_segment_has_no_name_once_mapped(tmp_path):
    groups = _groups(tmp_path, 2)
    assert not os.path.exists(groups[0].path)
    buffers = [torch.full((3,), 1.0, dtype=torch.float64), torch.full((3,), 2.0, dtype=torch.float64)]
    assert _run(groups, buffers) == [None, None]
    assert buffers[0].tolist() == [3.0, 3.0, 3.0]


def test_a_wait_can_be_interrupted(tmp_path):
    """The kernel hands back to Python every 100 ms of waiting, so a signal (Ctrl-C) is handled
    long before the group's timeout; the segment is then marked unusable."""
    import signal

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    groups = _groups(tmp_path, 2, timeout=30.0)
    previous = signal.signal(signal.SIGUSR1, handler)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
    start = time.monotonic()
    timer.start()
    try:
        with pytest.raises(Interrupted):
            groups[0].all_reduce(torch.ones(4, dtype=torch.float64))
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, previous)
    assert time.monotonic() - start < 5, "the signal waited for the timeout"
    with pytest.raises(_shm.LocalError, match="interrupted while waiting"):
        groups[0].all_reduce(torch.ones(4, dtype=torch.float64))


def test_a_segment_that_cannot_be_made_leaves_nothing(tmp_path, monkeypatch):
    """No room for the segment (a full /dev/shm): an OSError at set-up (the group then uses the
    backend), never a SIGBUS at the first write, and no file left behind."""
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate on this platform: nothing reserves the segment")

    def full(fd, offset, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    path = tmp_path / "segment"
    with pytest.raises(OSError, match="No space left"):
        _shm.LocalGroup(str(path), 2, 0, 16, 5.0, os.getpid(), create=True)
    assert not path.exists()


# --- who may touch a segment, and what is left behind ------------------------------------------

OTHER = 65534  # nobody


def _chown_or_skip(path, uid):
    try:
        os.chown(path, uid, -1)
    except PermissionError as e:
        pytest.skip(f"cannot chown a file to uid {uid} here ({e}): run as root to test ownership")


@pytest.mark.parametrize("problem", ["owner", "mode 644", "mode 660", "symlink"])
def test_a_segment_of_another_user_or_mode_is_not_mapped(tmp_path, problem):
    """The ranks that map the segment by name accept only a regular file of their own user with
    mode 0600 (O_NOFOLLOW, checked on the descriptor): a planted file is an OSError at set-up
    (the group then uses the backend), never a segment another user can read or write."""
    real = tmp_path / "segment"
    first = _shm.LocalGroup(str(real), 2, 0, 16, 5.0, os.getpid(), create=True)
    path = real
    if problem == "owner":
        _chown_or_skip(real, OTHER)
        match = f"owned by uid {OTHER}"
    elif problem == "symlink":
        path = tmp_path / "link"
        path.symlink_to(real)
        match = "symbolic link|Too many levels"
    else:
        os.chmod(real, int(problem[-3:], 8))
        match = f"its mode is {problem[-3:]}, not 600"
    with pytest.raises(OSError, match=match):
        _shm.LocalGroup(str(path), 2, 1, 16, 5.0, os.getpid(), create=False)
    first.unlink()
    first.close()


def test_a_segment_is_made_0600_whatever_the_umask(tmp_path):
    previous = os.umask(0o277)  # would make it 0400: the other ranks would refuse it
    try:
        group = _shm.LocalGroup(str(tmp_path / "segment"), 2, 0, 16, 5.0, os.getpid(),
                                  create=True)
    finally:
        os.umask(previous)
    assert oct(os.stat(group.path).st_mode & 0o777) == oct(0o600)
    group.unlink()
    group.close()


def _dead_pid():
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(gone.stdout)  # reaped: no such process any more


def test_segments_of_dead_creators_are_swept(tmp_path, monkeypatch):
    """``new_path()`` (the first rank, at set-up) removes this user's segments whose creator's
    pid is gone and that are over a minute old; a live creator's, a fresh one, another user's
    and other names stay."""
    monkeypatch.setattr(_shm, "directory", lambda: str(tmp_path))
    dead, old = _dead_pid(), time.time() - 3600
    files = {name: tmp_path / name for name in (
        f"syncbn-{dead}-{'a' * 32}", f"syncbn-{os.getpid()}-{'b' * 32}",
        f"syncbn-{dead}-{'c' * 32}", f"syncbn-{dead}-{'d' * 32}", f"other-{dead}-{'e' * 32}")}
    for name, path in files.items():
        path.write_bytes(b"\0" * 64)
        if "c" * 32 not in name:
            os.utime(path, (old, old))
    try:
        os.chown(files[f"syncbn-{dead}-{'d' * 32}"], OTHER, -1)
    except PermissionError:
        print("cannot chown here: the other user's segment is this user's in this run")
        files[f"syncbn-{dead}-{'d' * 32}"].unlink()
        del files[f"syncbn-{dead}-{'d' * 32}"]
    fresh = _shm.new_path()
    assert os.path.dirname(fresh) == str(tmp_path) and not os.path.exists(fresh)
    left = sorted(p.name for p in tmp_path.iterdir())
    expected = sorted(n for n in files if not n.startswith(f"syncbn-{dead}-{'a' * 32}"))
    assert left == expected, left


def test_unlink_and_close_can_be_called_on_every_path(tmp_path):
    """Set-up failure paths may unlink or close a group more than once; a closed group is an
    error, not a crash, if used."""
    groups = _groups(tmp_path, 2)
    groups[0].unlink()
    groups[1].unlink()  # not its creator: a no-op
    for g in groups:
        g.close()
        g.close()
    with pytest.raises(_shm.LocalError, match="closed"):
        groups[0].all_reduce(torch.ones(2, dtype=torch.float64))


def test_a_long_wait_costs_little_cpu(tmp_path):
    """A rank waiting for a peer that arrives a second later (a checkpoint on rank 0) sleeps
    after its spin budget instead of polling: under 5% of a core (gloo's wait costs ~0.2%; 50 us
    sleeps and a /proc read per ms cost ~15%), and it wakes promptly when the peer arrives."""
    groups = _groups(tmp_path, 2, timeout=30.0)
    spent = {}

    def waiter():
        cpu, start = time.thread_time(), time.monotonic()
        groups[0].all_reduce(torch.ones(4, dtype=torch.float64))
        spent["cpu"], spent["done"] = time.thread_time() - cpu, time.monotonic()
        spent["wall"] = spent["done"] - start

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(1.0)
    arrived = time.monotonic()
    groups[1].all_reduce(torch.ones(4, dtype=torch.float64))
    t.join(10)
    print(f"waited {spent['wall']:.2f} s with {spent['cpu'] * 1e3:.1f} ms of CPU; woke "
          f"{(spent['done'] - arrived) * 1e3:.2f} ms after the peer arrived")
    assert spent["cpu"] < 0.05 * spent["wall"], spent
    assert spent["done"] - arrived < 0.1, "the waiter slept past its peer's arrival"
