"""The GPU check's driver: every check and measurement of ``benchmarks/gpu_check.sh``, section by
section, each fail-soft, each result written into one summary JSON the moment it is known.

    python3 benchmarks/gpu_check.py --out OUT                     # every section, in order
    python3 benchmarks/gpu_check.py --out OUT --only timing --budget 120
    python3 benchmarks/gpu_check.py --out OUT --cpu-smoke --only gradients,numerics
    python3 benchmarks/gpu_check.py --out OUT --finish            # print the verdicts, exit status

``benchmarks/gpu_check.sh`` runs it section group by section group, each under ``timeout``; read
that script for the order, the limits and what comes back. Here:

* ``OUT/summary.json``: every number and verdict. Rewritten atomically after each result, so a
  section killed by its time limit loses nothing it had measured. ``steps[NAME]`` holds each
  section's ``status`` (``not run``, ``running``, ``passed``, ``failed``, ``error``, ``done``,
  ``skipped``, ``timed out``), ``reason``, ``seconds``, its numbers and its ``verdicts``
  (``{"check", "value", "target", "ok"}``); ``verdicts`` lists them all; ``recommended_default``
  is the fastest syncbn path whose variance error is <= 1e-6 and whose gradients passed.
* ``OUT/gpu_check.log``: everything, appended (tracebacks, pytest's output).
* stdout: one line per verdict, as it comes.

Sections (``--only``, comma-separated, run in the order given; all by default, in this order):

* ``env``: versions, device; exits 2 at once without torch or without a CUDA device.
* ``cuda_tests``: ``pytest -m cuda tests/`` (every CUDA-marked test, pytest-timeout per test).
* ``dataparallel``: syncbn.DataParallel's GPU tests in tests/test_parallel.py (``-k``: the
  names with ``gpu``/``cuda``, and the device-id validation that places a layer on the GPU).
* ``gradients``: output, input/weight/bias gradients and running statistics of every syncbn
  path against float64 at 32x256x56x56 bfloat16 channels_last and 32x64x112x112 float32;
  tolerance: the dtype's (float32 1e-5, bfloat16 1.6e-2, relative to the largest value) or twice
  the error of torch's own ``F.batch_norm`` in that dtype, whichever is larger.
* ``nosync``: ``torch.cuda.set_sync_debug_mode("error")`` around 2 forward+backward passes per
  path after a warm-up. Target: 0 host syncs.
* ``numerics``: float32 input with mean/std = 1e4, one step with momentum 1: the relative error
  of ``running_var`` against float64 (unbiased). Target: <= 1e-6.
* ``timing``: per layer forward+backward (``torch.autograd.grad``), median of CUDA-event times
  after a warm-up, contenders interleaved: plain ``F.batch_norm`` (``BN``, the floor), torch's
  ``SyncBatchNorm`` autograd Function (``SyncBN``), and syncbn's ``sync_batch_norm`` with
  ``SYNCBN_KERNEL`` = ``aten``, ``cuda``, ``triton``. ResNet-50 shapes at batch 32, bfloat16
  channels_last first, then float32 contiguous while ``--budget`` lasts. Targets: path/SyncBN <=
  0.8 (bfloat16 channels_last rows); at 32x256x56x56 <= 1.3x the memory floor (6 x the tensor's
  bytes over the device-to-device copy bandwidth measured here with a large ``copy_``).
* ``counts``: CUDA kernels, NCCL kernels, copies and memsets per direction (torch.profiler).
* ``graphs``: conv -> syncbn.SyncBatchNorm2d -> relu forward+backward captured with
  ``torch.cuda.graph`` after a side-stream warm-up, replayed on fresh inputs against an eager
  copy; then the layer alone on an empty shard (batch 0); per path.
* ``timm``: ``timm.create_model("efficientnet_b0")`` converted with
  ``syncbn.convert_sync_batchnorm``, one training step; records how many layers are syncbn's.
* ``gloo``: 2 processes sharing the GPU over gloo: every path on shards [5, 3] and [4, 0],
  float32 and bfloat16 channels_last, against float64 over the concatenated batch; then, per
  path on a subgroup of its own (timeout 20 s), a rank that skips a layer must raise on every rank.
* ``path_tests``: the CUDA tests of tests/test_distributed.py again with ``SYNCBN_KERNEL`` =
  ``triton`` and ``cuda`` (the ``kernel`` fixture follows the environment).
* ``resnet``: a compiled (``fullgraph=True``) ResNet-50 training step, bfloat16 autocast,
  channels_last: plain BatchNorm, then syncbn per path while ``--budget`` lasts.

syncbn synchronizes on the one-rank group (NCCL, or gloo with ``--cpu-smoke``) because
``SYNCBN_FORCE_SYNC=1`` makes training-mode layers synchronize, collective included, on a
one-rank group; without that setting (an older syncbn) a monkeypatch of ``will_sync`` and of the
collective does the same, and ``environment.force_sync`` says so. Paths are switched with
``SYNCBN_KERNEL`` and ``syncbn._settings.reload()``; a path missing from
``syncbn._settings.KERNELS`` is recorded as not available.

``--budget SECONDS``: what this process may use (gpu_check.sh passes its step's limit less 10 s):
timing, timm, gloo, path_tests and resnet start no new work once it is spent, and timing and
timm leave the sections after them in the same run the seconds they need (``NEEDS``).

``--cpu-smoke``: no GPU needed: the same code on CPU with tiny shapes, Triton through its
interpreter (``TRITON_INTERPRET=1``), gloo for the one-rank group; CUDA-only parts say skipped.
Its numbers measure nothing.
"""

# ruff: noqa: BLE001  (fail-soft by design: every error is recorded, the next check runs)
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

# torch is imported inside the sections: --finish and --mark-* run without it, in milliseconds.

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "cuda_tests", "dataparallel", "gradients", "nosync", "numerics", "timing",
            "counts", "graphs", "timm", "gloo", "path_tests", "resnet")
# Seconds a section needs at least: an earlier section of the same process (timing, timm)
# leaves them this much of --budget.
NEEDS = {"counts": 10, "timm": 30, "graphs": 25, "gloo": 60, "path_tests": 60}
# A failure of these makes the exit status non-zero; the others measure.
CORRECTNESS = ("env", "cuda_tests", "dataparallel", "gradients", "gloo", "graphs", "timm",
               "path_tests")
PATHS = ("aten", "cuda", "cuda-welford", "triton")
LOG_LIMIT = 12 << 20
EPS = 1e-5
VAR_TARGET = 1e-6  # numerics: relative running_var error at mean/std = 1e4
RATIO_TARGET = 0.8  # timing: syncbn path / torch SyncBN, bfloat16 channels_last, batch 32
FLOOR_TARGET = 1.3  # timing: x the memory-bandwidth floor at 32x256x56x56
FLOOR_SHAPE = (32, 256, 56, 56)
# (rtol, atol relative to the largest |expected|), as in tests/reference.py
TOLERANCES = {"float64": 1e-10, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
RESNET_SHAPES = [(32, 64, 112, 112), (32, 64, 56, 56), (32, 256, 56, 56), (32, 128, 28, 28),
                 (32, 512, 28, 28), (32, 256, 14, 14), (32, 1024, 14, 14), (32, 512, 7, 7),
                 (32, 2048, 7, 7)]
FP32_SHAPES = [(32, 256, 56, 56), (32, 64, 112, 112), (32, 1024, 14, 14), (32, 2048, 7, 7)]


# ------------------------------------------------------------------------------- the summary
def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Summary:
    """``OUT/summary.json`` and ``OUT/gpu_check.log``: loaded, updated, rewritten atomically."""

    def __init__(self, out: Path, smoke: bool = False) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.smoke = smoke
        self.path, self.log_path = out / "summary.json", out / "gpu_check.log"
        self.t0 = time.perf_counter()
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {"script": "benchmarks/gpu_check.sh", "started": now(), "environment": {},
                         "steps": {}, "verdicts": [], "recommended_default": None,
                         "exit_status": None}
        for name in SECTIONS:
            kind = "correctness" if name in CORRECTNESS else "measurement"
            self.data["steps"].setdefault(name, {"status": "not run", "kind": kind})

    def log(self, text: str) -> None:
        """Append to the log, which stops at LOG_LIMIT bytes (a device run brings back 16 MiB
        per file at most)."""
        with open(self.log_path, "a") as f:
            if f.tell() > LOG_LIMIT:
                return
            f.write(text if text.endswith("\n") else text + "\n")
            if f.tell() > LOG_LIMIT:
                f.write(f"[log truncated at {LOG_LIMIT} bytes; summary.json has every number]\n")

    def say(self, line: str) -> None:
        """A line for stdout and the log."""
        print(line, flush=True)
        self.log(f"[{time.perf_counter() - self.t0:7.1f}s] {line}")

    def step(self, name: str) -> dict[str, Any]:
        return self.data["steps"][name]  # type: ignore[no-any-return]

    def start(self, name: str) -> None:
        kind = self.step(name)["kind"]
        self.data["steps"][name] = {"status": "running", "kind": kind, "started": now(),
                                    "verdicts": []}
        self.save()

    def verdict(self, name: str, check: str, value: Any, target: str, ok: bool | None,
                **extra: Any) -> None:
        """Record one verdict (ok None: recorded, no target applies) and print it. With
        --cpu-smoke a measurement has no verdict (the numbers measure nothing)."""
        if self.smoke and self.step(name)["kind"] == "measurement" and ok is not None:
            ok, extra = None, {**extra, "note": f"--cpu-smoke: not a measurement (target {target})"}
        entry = {"check": check, "value": value, "target": target, "ok": ok, **extra}
        self.step(name).setdefault("verdicts", []).append(entry)
        mark = {True: "ok  ", False: "FAIL", None: "    "}[ok]
        shown = f"{value:.3g}" if isinstance(value, float) else value
        self.say((f"  [{mark}] {name}: {check} = {shown}"
                  + (f" (target {target})" if target else ""))[:240])
        self.save()

    def finish(self, name: str, status: str, reason: str = "") -> None:
        entry = self.step(name)
        entry["status"], entry["reason"] = status, reason
        self.say(f"== {name}: {status}" + (f" ({reason})" if reason else ""))
        self.save()

    def save(self) -> None:
        self.data["updated"] = now()
        self.data["verdicts"] = [{"step": name, **v} for name, step in self.data["steps"].items()
                                 for v in step.get("verdicts", [])]
        try:
            self.data["recommended_default"] = recommended_default(self.data["steps"])
        except Exception as e:  # the summary is written whatever this says
            self.data["recommended_default"] = {"path": None, "why": f"error: {e!r}"}
        tmp = self.path.with_name(".summary.json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def recommended_default(steps: dict[str, Any]) -> dict[str, Any]:
    """The fastest path (total ms over the bfloat16 channels_last rows every candidate has)
    whose variance error is <= 1e-6 and whose gradients did not fail, with each path's numbers."""
    numerics = steps.get("numerics", {}).get("paths", {})
    gradients = steps.get("gradients", {}).get("paths", {})
    rows = [r for r in steps.get("timing", {}).get("rows", [])
            if r.get("dtype") == "bfloat16" and r.get("layout") == "channels_last"]
    table: dict[str, Any] = {}
    for path in PATHS:
        err = numerics.get(path, {}).get("var_rel_err")
        table[path] = {"var_rel_err": err, "gradients": gradients.get(path, {}).get("status"),
                       "timed_rows": sum(path in r.get("ms", {}) for r in rows)}
    candidates = [p for p in PATHS if isinstance(table[p]["var_rel_err"], (int, float))
                  and table[p]["var_rel_err"] <= VAR_TARGET and table[p]["gradients"] != "failed"
                  and table[p]["timed_rows"]]
    common = [r for r in rows if all(p in r.get("ms", {}) for p in candidates)]
    for p in candidates:
        table[p]["total_ms_common_rows"] = sum(r["ms"][p] for r in common)
    best = (min(candidates, key=lambda p: table[p]["total_ms_common_rows"])
            if candidates and common else None)
    why = (f"fastest over {len(common)} bfloat16 channels_last rows among the paths with "
           f"running_var error <= {VAR_TARGET} and gradients not failed" if best else
           "not decided: needs the numerics and timing sections (and a path meeting the error)")
    return {"path": best, "why": why, "paths": table}


# ----------------------------------------------------------------------------- shared set-up
class Ctx:
    """What the sections share: options, summary, device, the one-rank group."""

    def __init__(self, args: argparse.Namespace, summary: Summary) -> None:
        self.args, self.summary = args, summary
        self.smoke = args.cpu_smoke
        self.start = time.perf_counter()
        self.group_ready = False
        self.plan = [s for s in args.sections if s != "env"]
        import torch

        self.torch = torch
        self.device = torch.device("cpu" if self.smoke else "cuda")

    def left(self, name: str | None = None) -> float:
        """Seconds left of ``--budget`` (counted from this process's start) for section
        ``name``: what the sections after it in this run need (NEEDS) is kept for them."""
        if self.args.budget is None:
            return float("inf")
        later = self.plan[self.plan.index(name) + 1:] if name in self.plan else []
        return (self.args.budget - (time.perf_counter() - self.start)
                - sum(NEEDS.get(s, 0) for s in later))

    def sync(self) -> None:
        if not self.smoke:
            self.torch.cuda.synchronize()


def available_paths(smoke: bool) -> dict[str, str]:
    """path -> "available" or why not."""
    from syncbn import _settings

    found = {}
    for path in PATHS:
        if path not in _settings.KERNELS:
            found[path] = f"not available (not in syncbn._settings.KERNELS {_settings.KERNELS})"
        elif path in ("cuda", "cuda-welford") and smoke:
            found[path] = "not available (--cpu-smoke: needs a CUDA device)"
        elif path == "triton" and not _importable("triton"):
            found[path] = "not available (triton is not importable)"
        else:
            found[path] = "available"
    return found


def usable(ctx: Ctx) -> list[str]:
    paths = available_paths(ctx.smoke)
    for path, state in paths.items():
        if state != "available":
            ctx.summary.log(f"path {path}: {state}")
    return [p for p, s in paths.items() if s == "available"]


def _importable(module: str) -> bool:
    try:
        __import__(module)
        return True
    except Exception:
        return False


def use_path(path: str | None) -> None:
    """Route syncbn's next passes to ``path`` (SYNCBN_KERNEL; settings re-read)."""
    from syncbn import _settings

    if path is None:
        os.environ.pop("SYNCBN_KERNEL", None)
    else:
        os.environ["SYNCBN_KERNEL"] = path
    _settings.reload()


def one_rank_group(ctx: Ctx) -> None:
    """A one-rank group (NCCL; gloo with --cpu-smoke) and syncbn forced to synchronize on it."""
    if ctx.group_ready:
        return
    import torch.distributed as dist

    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    if not ctx.smoke:
        ctx.torch.cuda.set_device(0)
    dist.init_process_group("gloo" if ctx.smoke else "nccl", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    ctx.summary.data["environment"]["force_sync"] = force_sync()
    ctx.summary.save()
    ctx.group_ready = True


def force_sync() -> str:
    """Make training-mode syncbn synchronize on a one-rank group: SYNCBN_FORCE_SYNC=1 where
    syncbn has that setting, else a monkeypatch (will_sync, and the collective's 1-rank
    shortcut). Returns how it was forced."""
    import syncbn.functional
    from syncbn import _settings

    os.environ["SYNCBN_FORCE_SYNC"] = "1"
    _settings.reload()
    if "force_sync" in {f.name for f in dataclasses.fields(_settings.Settings)}:
        if syncbn.functional.will_sync(True, None):
            return "SYNCBN_FORCE_SYNC=1"
        return ("SYNCBN_FORCE_SYNC=1 set, but syncbn.functional.will_sync(True) is False: the "
                "modules may still synchronize (not patched, to avoid a second collective)")
    import syncbn.batchnorm

    def forced(training: bool, process_group: Any = None) -> bool:
        return bool(training)

    syncbn.functional.will_sync = forced
    syncbn.batchnorm.will_sync = forced  # imported by name there
    how = "forced by monkeypatch (no Settings.force_sync): will_sync"
    try:
        import torch.distributed as dist

        comm = importlib.import_module("syncbn._comm")
        original = comm.all_reduce

        def all_reduce(buffer: Any, process_group: Any, *rest: Any, **kw: Any) -> Any:
            world = original(buffer, process_group, *rest, **kw)
            if world == 1:  # the collective a 1-rank group skips, run anyway
                dist.all_reduce(buffer, group=comm.resolve(process_group))
            return world

        comm.all_reduce = all_reduce
        how += " and the collective"
    except Exception as e:  # the private module moved: the collective stays skipped
        how += f"; collective NOT forced ({type(e).__name__}: {e})"
    return how


def child_env(**overrides: str) -> dict[str, str]:
    """The environment of a child process: syncbn from this checkout, none of the settings
    this process chose (kernel, forced sync), then ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in ("SYNCBN_KERNEL", "SYNCBN_FORCE_SYNC")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return {**env, **overrides}


def first_lines(e: BaseException | str, n: int = 3) -> str:
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return " | ".join(lines[:n])[:600] + (" | ..." if len(lines) > n else "")


def label(shape: tuple[int, ...], dtype: Any, layout: str) -> str:
    return f"{'x'.join(map(str, shape))} {str(dtype).replace('torch.', '')} {layout}"


# ------------------------------------------------------------------ tensors and the reference
def make_case(ctx: Ctx, shape: tuple[int, ...], dtype: Any, layout: str, seed: int = 0,
              mean: float = 0.0) -> dict[str, Any]:
    """Input, output gradient (dtype, layout), float32 weight and bias, made on the device from
    a seed (the same values on every call)."""
    torch = ctx.torch
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    c = shape[1]

    def randn(*size: int) -> Any:
        return torch.randn(*size, generator=g, device=ctx.device, dtype=torch.float32)

    x = (randn(*shape) + mean).to(dtype).contiguous(memory_format=fmt)
    dy = randn(*shape).to(dtype).contiguous(memory_format=fmt)
    w = 1 + 0.1 * randn(c)
    b = 0.1 * randn(c)
    return {"x": x, "dy": dy, "w": w, "b": b, "c": c}


def reference(x: Any, dy: Any, w: Any, b: Any, momentum: float) -> dict[str, Any]:
    """Batch norm in float64 in closed form: output, the three gradients, running statistics
    (from mean 0, var 1)."""
    x, dy, w, b = (t.double() for t in (x, dy, w, b))
    dims = [d for d in range(x.dim()) if d != 1]
    view = [1, x.shape[1]] + [1] * (x.dim() - 2)
    n = x.numel() // x.shape[1]
    mean = x.mean(dims)
    var = x.var(dims, unbiased=False)
    invstd = (var + EPS).rsqrt()
    xhat = (x - mean.view(view)) * invstd.view(view)
    db = dy.sum(dims)
    dw = (dy * xhat).sum(dims)
    dx = (w * invstd).view(view) * (dy - (db / n).view(view) - xhat * (dw / n).view(view))
    var_u = var * n / max(n - 1, 1)
    return {"y": xhat * w.view(view) + b.view(view), "dx": dx, "dw": dw, "db": db,
            "running_mean": momentum * mean, "running_var": (1 - momentum) + momentum * var_u}


def rel_err(got: Any, want: Any) -> float:
    """max |got - want| / max |want| (float64)."""
    scale = float(want.abs().max()) if want.numel() else 1.0
    if not got.numel():
        return 0.0
    return float((got.detach().double() - want).abs().max()) / max(scale, 1e-30)


def run_layer(ctx: Ctx, path: str | None, case: dict[str, Any], momentum: float,
              contender: str = "syncbn") -> dict[str, Any]:
    """One training forward + backward of ``contender`` (syncbn on ``path``, torch's SyncBN
    Function, or plain F.batch_norm): output, gradients and running statistics."""
    forward, leaves, (rm, rv) = bind(ctx, contender, path, case, momentum)
    y = forward()
    dx, dw, db = ctx.torch.autograd.grad(y, leaves, case["dy"])
    return {"y": y, "dx": dx, "dw": dw, "db": db, "running_mean": rm, "running_var": rv}


def bind(ctx: Ctx, contender: str, path: str | None, case: dict[str, Any],
         momentum: float) -> tuple[Callable[[], Any], tuple[Any, ...], tuple[Any, Any]]:
    """The forward of one contender on ``case`` as a closure (its path selected first), the
    leaves it differentiates (x, w, b) and its own running statistics (mean 0, var 1)."""

    x, w, b = (case[k].detach().requires_grad_() for k in ("x", "w", "b"))
    rm = ctx.torch.zeros(case["c"], device=ctx.device)
    rv = ctx.torch.ones(case["c"], device=ctx.device)
    return contender_fn(contender, path, x, w, b, rm, rv, momentum), (x, w, b), (rm, rv)


def contender_fn(contender: str, path: str | None, x: Any, w: Any, b: Any, rm: Any, rv: Any,
                 momentum: float) -> Callable[[], Any]:
    """The forward of one contender (its path selected first), as a closure."""
    import torch.nn.functional as F

    if contender == "BN":
        return lambda: F.batch_norm(x, rm, rv, w, b, True, momentum, EPS)
    if contender == "SyncBN":
        import torch.distributed as dist
        from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBNFunction

        group = dist.group.WORLD
        return lambda: TorchSyncBNFunction.apply(x, w, b, rm, rv, EPS, momentum, group, 1)
    from syncbn.functional import sync_batch_norm

    def forward() -> Any:
        return sync_batch_norm(x, rm, rv, w, b, True, momentum, EPS)

    use_path(path)
    return forward


# --------------------------------------------------------------------------------- sections
def section_env(summary: Summary, args: argparse.Namespace) -> int:
    """Versions and device; 2 when torch is missing or (without --cpu-smoke) CUDA is."""
    env = summary.data["environment"]
    env.update({"python": sys.version.split()[0], "executable": sys.executable,
                "mode": "cpu-smoke" if args.cpu_smoke else "gpu"})
    try:
        import torch
    except Exception as e:
        summary.finish("env", "failed", f"torch is not importable: {type(e).__name__}: {e}")
        return 2
    env.update({"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "cuda_available": torch.cuda.is_available()})
    if not args.cpu_smoke and not torch.cuda.is_available():
        summary.finish("env", "failed", "no CUDA device (torch.cuda.is_available() is False): "
                       "nothing to check")
        return 2
    if torch.cuda.is_available():
        env.update({"device": torch.cuda.get_device_name(),
                    "capability": list(torch.cuda.get_device_capability()),
                    "device_count": torch.cuda.device_count()})
        with contextlib.suppress(Exception):
            env["nccl"] = str(torch.cuda.nccl.version())
    for package in ("triton", "timm", "pytest", "pytest-timeout"):  # versions, not imported
        try:
            env[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            env[package] = "not installed"
    try:
        import syncbn
        from syncbn import _settings

        env.update({"syncbn": syncbn.__version__, "syncbn_from": os.path.dirname(syncbn.__file__),
                    "kernels": list(_settings.KERNELS), "paths": available_paths(args.cpu_smoke),
                    "settings_fields": [f.name for f in dataclasses.fields(_settings.Settings)]})
    except Exception as e:
        summary.finish("env", "failed", f"syncbn is not importable: {type(e).__name__}: {e}")
        return 2
    summary.say(f"device {env.get('device', 'CPU (--cpu-smoke)')}, torch {env['torch']} "
                f"(CUDA {env['torch_cuda']}), triton {env['triton']}, python {env['python']}, "
                f"syncbn kernels {env['kernels']}")
    summary.finish("env", "passed")
    return 0


def run_pytest(ctx: Ctx, name: str, pytest_args: list[str], env: dict[str, str] | None = None,
               limit: float | None = None) -> dict[str, Any]:
    """pytest in a subprocess (output to the log); each test's outcome is recorded as it comes."""
    cmd = [sys.executable, "-m", "pytest", "-v", "-rs", "--tb=short", "-p", "no:cacheprovider",
           "-o", "addopts="]
    if _importable("pytest_timeout"):
        cmd += ["--timeout", "90"]  # per test
    cmd += pytest_args
    outcome: dict[str, Any] = {"command": " ".join(cmd[1:]), "passed": 0, "failed": [],
                               "errors": [], "skipped": 0, "skip_reasons": []}
    ctx.summary.step(name).setdefault("runs", []).append(outcome)
    ctx.summary.log(f"$ {' '.join(cmd)}")
    deadline = time.perf_counter() + (limit if limit is not None else ctx.left(name))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(**(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    result = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")
    assert proc.stdout is not None
    for line in proc.stdout:
        ctx.summary.log(line.rstrip("\n"))
        m = result.match(line)
        if m:
            test, what = m.groups()
            if what in ("PASSED", "XPASS"):
                outcome["passed"] += 1
            elif what == "FAILED":
                outcome["failed"].append(test)
                ctx.summary.say(f"  [FAIL] {name}: {test}")
            elif what == "ERROR":
                outcome["errors"].append(test)
                ctx.summary.say(f"  [FAIL] {name}: {test} (error)")
            else:
                outcome["skipped"] += 1
            ctx.summary.save()
        elif line.startswith("SKIPPED ["):
            outcome["skip_reasons"].append(line.strip()[:300])
        if time.perf_counter() > deadline:
            proc.kill()
            outcome["killed"] = "out of time"
            break
    outcome["returncode"] = proc.wait()
    ctx.summary.save()
    return outcome


def pytest_verdict(ctx: Ctx, name: str, runs: list[dict[str, Any]]) -> None:
    bad = [t for r in runs for t in r["failed"] + r["errors"]]
    passed = sum(r["passed"] for r in runs)
    killed = [r["command"] for r in runs if r.get("killed")]
    broken = [r["command"] for r in runs
              if r["returncode"] not in (0, 1, 5) and not r.get("killed")]  # 5: none collected
    ctx.summary.verdict(name, "tests passed / failed", f"{passed} / {len(bad)}",
                        "0 failed, > 0 passed",
                        not bad and not killed and not broken and (passed > 0 or ctx.smoke))
    if bad or broken:
        ctx.summary.finish(name, "failed", "; ".join(bad[:10] + broken)[:800])
    elif killed:
        ctx.summary.finish(name, "failed", "out of time: " + "; ".join(killed))
    elif passed == 0:
        status = "skipped" if ctx.smoke else "failed"
        ctx.summary.finish(name, status, "no test ran (all skipped or none selected)")
    else:
        ctx.summary.finish(name, "passed")


def section_cuda_tests(ctx: Ctx) -> None:
    """(a) every CUDA-marked test."""
    run = run_pytest(ctx, "cuda_tests", ["-m", "cuda", "tests/"])
    pytest_verdict(ctx, "cuda_tests", [run])


def section_dataparallel(ctx: Ctx) -> None:
    """(b) syncbn.DataParallel on the GPU (test names with gpu or cuda; the device-id check)."""
    run = run_pytest(ctx, "dataparallel", ["tests/test_parallel.py", "-k",
                                           "gpu or cuda or device_ids_validation"])
    pytest_verdict(ctx, "dataparallel", [run])


def gradient_shapes(ctx: Ctx) -> list[tuple[tuple[int, ...], Any, str]]:
    torch = ctx.torch
    if ctx.smoke:
        return [((4, 8, 3, 3), torch.bfloat16, "channels_last"),
                ((4, 8, 4, 4), torch.float32, "contiguous")]
    return [((32, 256, 56, 56), torch.bfloat16, "channels_last"),
            ((32, 64, 112, 112), torch.float32, "contiguous")]


def section_gradients(ctx: Ctx) -> None:
    """(c) every path's output, gradients and running statistics against float64."""
    one_rank_group(ctx)
    summary, paths = ctx.summary, usable(ctx)
    entry = summary.step("gradients")
    entry["paths"] = {p: {"status": "not run"} for p in paths}
    entry["available"] = available_paths(ctx.smoke)
    momentum = 0.1
    for shape, dtype, layout in gradient_shapes(ctx):
        what = label(shape, dtype, layout)
        case = make_case(ctx, shape, dtype, layout)
        ref = reference(case["x"], case["dy"], case["w"], case["b"], momentum)
        tol = TOLERANCES[str(dtype).replace("torch.", "")]
        try:  # torch's own error in this dtype: the tolerance where it is larger
            floor = {k: rel_err(v, ref[k]) for k, v in
                     run_layer(ctx, None, case, momentum, "BN").items()}
        except Exception as e:
            summary.log(f"gradients {what}: torch F.batch_norm failed: {e!r}")
            floor = dict.fromkeys(ref, 0.0)
        summary.log(f"gradients {what}: torch F.batch_norm errors {floor}")
        row = {"shape": what, "torch_BN_err": floor, "errors": {}}
        entry.setdefault("rows", []).append(row)
        others = [("SyncBN", None)] if not ctx.smoke else []
        for contender, path in [("syncbn", p) for p in paths] + others:
            who = path or contender
            try:
                got = run_layer(ctx, path, case, momentum, contender)
                errs = {k: rel_err(got[k], ref[k]) for k in ref}
                row["errors"][who] = errs
                limits = {k: max(tol if k in ("y", "dx") else TOLERANCES["float32"],
                                 2 * floor[k]) for k in ref}
                worst = max(errs, key=lambda k: errs[k] / limits[k])
                ok = all(errs[k] <= limits[k] for k in errs)
                if contender == "SyncBN":  # torch's: for comparison, no verdict
                    summary.verdict("gradients", f"{what} torch SyncBN worst ({worst})",
                                    errs[worst], "", None)
                    continue
                summary.verdict("gradients", f"{what} {who} worst ({worst}) vs float64",
                                errs[worst], f"<= {limits[worst]:.2g}", ok)
                state = entry["paths"][who]
                if state.get("status") != "failed":
                    state["status"] = "passed" if ok else "failed"
            except Exception as e:
                summary.log(traceback.format_exc())
                summary.verdict("gradients", f"{what} {who}", f"error: {first_lines(e)}", "", False)
                if who in entry["paths"]:
                    entry["paths"][who]["status"] = "failed"
        del case, ref
    bad = [p for p, s in entry["paths"].items() if s["status"] != "passed"]
    if not paths:
        summary.finish("gradients", "failed", "no syncbn path available")
    else:
        summary.finish("gradients", "failed" if bad else "passed",
                       f"failed: {bad}" if bad else "")


def section_nosync(ctx: Ctx) -> None:
    """0 host syncs per forward+backward pass, per path."""
    if ctx.smoke:
        ctx.summary.finish("nosync", "skipped", "needs CUDA (torch.cuda.set_sync_debug_mode)")
        return
    one_rank_group(ctx)
    torch = ctx.torch
    case = make_case(ctx, (32, 64, 56, 56), torch.bfloat16, "channels_last")
    contenders = [(p, "syncbn", p) for p in usable(ctx)] + [("SyncBN", "SyncBN", None)]
    for who, contender, path in contenders:
        try:
            for _ in range(3):  # warm-up: compiles, the group's buffer width, NCCL's set-up
                run_layer(ctx, path, case, 0.1, contender)
            ctx.sync()
            failures = []
            torch.cuda.set_sync_debug_mode("error")
            try:
                for i in (1, 2):  # the second pass runs the first's deferred header check
                    try:
                        run_layer(ctx, path, case, 0.1, contender)
                    except RuntimeError as e:
                        failures.append(f"pass {i}: {first_lines(e, 2)}")
            finally:
                torch.cuda.set_sync_debug_mode("default")
            value = "0 host syncs" if not failures else "; ".join(failures)
            target = "0 host syncs" if who != "SyncBN" else ""
            ctx.summary.verdict("nosync", f"{who} forward+backward x2", value, target,
                                (not failures) if who != "SyncBN" else None)
        except Exception as e:
            ctx.summary.log(traceback.format_exc())
            ctx.summary.verdict("nosync", who, f"error: {first_lines(e)}", "0 host syncs",
                                False if who != "SyncBN" else None)
    ctx.summary.finish("nosync", "done")


def section_numerics(ctx: Ctx) -> None:
    """Relative running_var error at mean/std = 1e4, float32, momentum 1, per path."""
    one_rank_group(ctx)
    torch = ctx.torch
    entry = ctx.summary.step("numerics")
    entry["paths"] = {}
    shapes = [(4, 8, 3, 3)] if ctx.smoke else [(32, 64, 56, 56), (32, 512, 7, 7)]
    contenders = [(p, "syncbn", p) for p in usable(ctx)]
    if not ctx.smoke:
        contenders.append(("SyncBN", "SyncBN", None))
    for who, contender, path in contenders:
        errs = {}
        try:
            for shape in shapes:
                case = make_case(ctx, shape, torch.float32, "contiguous", seed=1, mean=1e4)
                ref = reference(case["x"], case["dy"], case["w"], case["b"], 1.0)
                got = run_layer(ctx, path, case, 1.0, contender)
                errs["x".join(map(str, shape))] = rel_err(got["running_var"], ref["running_var"])
            worst = max(errs.values())
            entry["paths"][who] = {"var_rel_err": worst, "per_shape": errs}
            ctx.summary.verdict("numerics", f"{who} running_var rel. error at mean/std 1e4", worst,
                                f"<= {VAR_TARGET}" if who != "SyncBN" else "",
                                worst <= VAR_TARGET if who != "SyncBN" else None)
        except Exception as e:
            ctx.summary.log(traceback.format_exc())
            entry["paths"][who] = {"error": first_lines(e)}
            ctx.summary.verdict("numerics", who, f"error: {first_lines(e)}", "", None)
    ctx.summary.finish("numerics", "done")


def copy_bandwidth(ctx: Ctx) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (a 1 GiB ``copy_``)."""
    torch = ctx.torch
    size = (1 << 30) if not ctx.smoke else (1 << 24)
    a = torch.empty(size, dtype=torch.uint8, device=ctx.device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    ctx.sync()
    reps = 10
    t0 = time.perf_counter()
    if ctx.smoke:
        for _ in range(reps):
            b.copy_(a)
        seconds = time.perf_counter() - t0
    else:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            b.copy_(a)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    return 2 * size * reps / seconds


def median_ms(ctx: Ctx, fns: dict[str, tuple[str | None, Callable[[], Any]]], warmup: int,
              rounds: int, iters: int) -> tuple[dict[str, float], dict[str, str]]:
    """Median ms per call of each function (warm-up first, then ``rounds`` interleaved)."""
    torch = ctx.torch
    failed: dict[str, str] = {}
    for name, (path, fn) in fns.items():
        try:
            use_path(path)
            for _ in range(warmup):
                fn()
        except Exception as e:
            ctx.summary.log(traceback.format_exc())
            failed[name] = first_lines(e)
    ctx.sync()
    times: dict[str, list[float]] = {n: [] for n in fns if n not in failed}
    for _ in range(rounds):
        for name, spent in times.items():
            path, fn = fns[name]
            use_path(path)
            for _ in range(iters):
                if ctx.smoke:
                    t0 = time.perf_counter()
                    fn()
                    spent.append((time.perf_counter() - t0) * 1e3)
                    continue
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                spent.append(start.elapsed_time(end))
    return {n: statistics.median(t) for n, t in times.items()}, failed


def timing_rows(ctx: Ctx) -> list[tuple[tuple[int, ...], Any, str]]:
    torch = ctx.torch
    if ctx.smoke:
        return [((4, 8, 4, 4), torch.bfloat16, "channels_last"),
                ((4, 8, 4, 4), torch.float32, "contiguous")]
    return ([(s, torch.bfloat16, "channels_last") for s in RESNET_SHAPES]
            + [(s, torch.float32, "contiguous") for s in FP32_SHAPES])


def section_timing(ctx: Ctx) -> None:
    """Per layer forward+backward, every contender, ResNet-50 shapes at batch 32."""
    one_rank_group(ctx)
    torch = ctx.torch
    entry = ctx.summary.step("timing")
    bandwidth = copy_bandwidth(ctx)
    entry.update({"copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
                  "method": "median ms of forward+backward (torch.autograd.grad), CUDA events, "
                            "synchronized per call, contenders interleaved", "rows": []})
    ctx.summary.say(f"  device-to-device copy: {bandwidth / 1e9:.0f} GB/s (read + write)")
    paths = usable(ctx)
    warmup, rounds, iters = (1, 1, 2) if ctx.smoke else (10, 5, 10)
    for shape, dtype, layout in timing_rows(ctx):
        what = label(shape, dtype, layout)
        if ctx.left("timing") <= 0:
            entry["rows"].append({"shape": "x".join(map(str, shape)), "skipped": "--budget spent"})
            ctx.summary.say(f"  {what}: skipped (--budget spent)")
            continue
        try:
            case = make_case(ctx, shape, dtype, layout)
            fns = {}
            for who, contender, path in ([("BN", "BN", None)]
                                         + ([("SyncBN", "SyncBN", None)] if not ctx.smoke else [])
                                         + [(p, "syncbn", p) for p in paths]):
                fns[who] = (path, fwd_bwd(ctx, contender, path, case))
            ms, failed = median_ms(ctx, fns, warmup, rounds, iters)
            row = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
                   "layout": layout, "ms": {k: round(v, 4) for k, v in ms.items()},
                   "failed": failed}
            entry["rows"].append(row)
            ctx.summary.say(f"  {what}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
                            + (f"; failed: {failed}" if failed else ""))
            timing_verdicts(ctx, row, what, shape, dtype, layout, paths, bandwidth)
        except Exception as e:
            ctx.summary.log(traceback.format_exc())
            entry["rows"].append({"shape": "x".join(map(str, shape)), "error": first_lines(e)})
            ctx.summary.say(f"  {what}: error {first_lines(e)}")
        ctx.summary.save()
        case = fns = None  # type: ignore[assignment]
        if not ctx.smoke:
            torch.cuda.empty_cache()
    ctx.summary.finish("timing", "done")


def fwd_bwd(ctx: Ctx, contender: str, path: str | None, case: dict[str, Any]) -> Callable[[], Any]:
    """Forward + backward (grads of x, w, b; nothing accumulated) with buffers of its own."""
    forward, leaves, _ = bind(ctx, contender, path, case, 0.1)

    def fn() -> Any:
        return ctx.torch.autograd.grad(forward(), leaves, case["dy"])
    return fn


def timing_verdicts(ctx: Ctx, row: dict[str, Any], what: str, shape: tuple[int, ...], dtype: Any,
                    layout: str, paths: list[str], bandwidth: float) -> None:
    ms = row["ms"]
    main = str(dtype) == "torch.bfloat16" and layout == "channels_last"
    for path in paths:
        if path in ms and "BN" in ms:
            row.setdefault("vs_BN", {})[path] = round(ms[path] / ms["BN"], 3)
        if path in ms and "SyncBN" in ms:
            ratio = ms[path] / ms["SyncBN"]
            row.setdefault("vs_SyncBN", {})[path] = round(ratio, 3)
            ctx.summary.verdict("timing", f"{what} {path}/SyncBN", ratio,
                                f"<= {RATIO_TARGET}" if main else "",
                                ratio <= RATIO_TARGET if main else None)
    if main and tuple(shape) == FLOOR_SHAPE:
        floor_ms = 6 * math.prod(shape) * ctx.torch.finfo(dtype).bits / 8 / bandwidth * 1e3
        row["floor_ms"] = round(floor_ms, 4)
        for path in paths:
            if path in ms:
                ctx.summary.verdict("timing", f"{what} {path}/memory floor ({floor_ms:.3f} ms)",
                                    ms[path] / floor_ms, f"<= {FLOOR_TARGET}",
                                    ms[path] / floor_ms <= FLOOR_TARGET)


def cuda_events(ctx: Ctx, fn: Callable[[], Any]) -> dict[str, list[str]]:
    """The CUDA-side events of one call of ``fn``, by kind: kernel, collective, copy, memset."""
    from torch.profiler import ProfilerActivity, profile

    ctx.sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        ctx.sync()
    try:  # the raw kineto events: one per kernel, memcpy, memset
        names = [e.name() for e in prof.profiler.kineto_results.events()
                 if "cuda" in str(e.device_type()).lower()]
    except AttributeError:
        names = [e.name for e in prof.events() if "cuda" in str(e.device_type).lower()]
    kinds: dict[str, list[str]] = {"kernel": [], "collective": [], "copy": [], "memset": []}
    for name in names:
        low = name.lower()
        if "activity buffer" in low or "overhead" in low:
            continue
        kind = ("collective" if "nccl" in low else "copy" if low.startswith("memcpy")
                else "memset" if low.startswith("memset") else "kernel")
        kinds[kind].append(name[:80])
    return kinds


def section_counts(ctx: Ctx) -> None:
    """Kernels, collectives, copies per direction at 32x64x56x56 bf16 channels_last."""
    if ctx.smoke:
        ctx.summary.finish("counts", "skipped", "needs CUDA (the profiler's CUDA activity)")
        return
    one_rank_group(ctx)
    torch = ctx.torch
    entry = ctx.summary.step("counts")
    entry["shape"] = label((32, 64, 56, 56), torch.bfloat16, "channels_last")
    case = make_case(ctx, (32, 64, 56, 56), torch.bfloat16, "channels_last")
    for who, contender, path in ([("BN", "BN", None), ("SyncBN", "SyncBN", None)]
                                 + [(p, "syncbn", p) for p in usable(ctx)]):
        try:
            forward, leaves, _ = bind(ctx, contender, path, case, 0.1)
            for _ in range(3):
                torch.autograd.grad(forward(), leaves, case["dy"])
            fwd = cuda_events(ctx, forward)
            out = forward()
            bwd = cuda_events(ctx, lambda out=out, leaves=leaves: torch.autograd.grad(
                out, leaves, case["dy"]))
            entry[who] = {"forward": {k: len(v) for k, v in fwd.items()},
                          "backward": {k: len(v) for k, v in bwd.items()},
                          "names": {"forward": [n for v in fwd.values() for n in v][:25],
                                    "backward": [n for v in bwd.values() for n in v][:25]}}
            ctx.summary.verdict("counts", f"{who} forward / backward (kernel, collective, copy, "
                                "memset)", f"{tuple(entry[who]['forward'].values())} / "
                                f"{tuple(entry[who]['backward'].values())}", "", None)
        except Exception as e:
            ctx.summary.log(traceback.format_exc())
            entry[who] = {"error": first_lines(e)}
    ctx.summary.finish("counts", "done")


# ------------------------------------------------------------------------ 2 ranks over gloo
GLOO_SHARDS = ([5, 3], [4, 0])


def gloo_cases(smoke: bool) -> list[tuple[tuple[int, ...], str, str]]:
    tail = (4, 3, 3) if smoke else (16, 8, 8)
    return [(tail, "float32", "contiguous"), (tail, "bfloat16", "channels_last")]


def gloo_data(sizes: list[int], tail: tuple[int, ...], dtype: str, layout: str) -> dict[str, Any]:
    """The global batch (every rank builds the same one from the seed), CPU, in ``dtype``."""
    import torch

    g = torch.Generator().manual_seed(sum(sizes) * 100 + tail[0])
    shape = (sum(sizes), *tail)
    x = (torch.randn(shape, generator=g) * 2 + torch.arange(tail[0]).view(1, -1, 1, 1))
    dy = torch.randn(shape, generator=g)
    w = 1 + 0.1 * torch.randn(tail[0], generator=g)
    b = 0.1 * torch.randn(tail[0], generator=g)
    cast = getattr(torch, dtype)
    return {"x": x.to(cast), "dy": dy.to(cast), "w": w, "b": b}


def gloo_rank(args: argparse.Namespace) -> int:
    """One of the 2 gloo ranks: every path on every case; saves its tensors for the parent;
    then the skipped-layer check per path on its own subgroup."""
    import torch
    import torch.distributed as dist
    from torch import nn

    import syncbn

    rank, work = args.gloo_rank, Path(args.gloo_dir)
    device = torch.device("cpu" if args.cpu_smoke else "cuda:0")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    store = dist.FileStore(str(work / "store"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    paths = args.gloo_paths.split(",") if args.gloo_paths else []
    subgroups = {p: dist.new_group([0, 1], timeout=datetime.timedelta(seconds=20)) for p in paths}
    results: dict[str, Any] = {}
    for path in paths:
        use_path(path)
        for sizes in GLOO_SHARDS:
            for tail, dtype, layout in gloo_cases(args.cpu_smoke):
                key = f"{path} {sizes} {'x'.join(map(str, tail))} {dtype} {layout}"
                try:
                    results[key] = gloo_step(device, rank, sizes, tail, dtype, layout)
                except Exception as e:
                    results[key] = {"error": f"{type(e).__name__}: {first_lines(e)}"}
    torch.save(results, work / f"rank{rank}.pt")
    skips = {}
    for path in paths:
        use_path(path)
        model = syncbn.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(4), nn.BatchNorm1d(4)),
                                              process_group=subgroups[path]).to(device)
        x = torch.randn(3, 4, device=device, requires_grad=True)
        t0 = time.perf_counter()
        raised = None
        try:  # rank 1 skips the first layer
            h = x if rank == 1 else model[0](x)
            model[1](h).sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            model(x).sum().backward()  # a check deferred on the device surfaces at the next pass
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as e:
            raised = f"{type(e).__name__}: {first_lines(e, 4)}"
        skips[path] = {"raised": raised, "seconds": round(time.perf_counter() - t0, 2)}
        (work / f"rank{rank}-skip.json").write_text(json.dumps(skips))
    return 0


def gloo_step(device: Any, rank: int, sizes: list[int], tail: tuple[int, ...], dtype: str,
              layout: str) -> dict[str, Any]:
    """This rank's shard through a SyncBatchNorm2d, forward + backward: its tensors (CPU)."""
    import torch

    import syncbn

    data = gloo_data(sizes, tail, dtype, layout)
    lo = sum(sizes[:rank])
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = data["x"][lo:lo + sizes[rank]].to(device).contiguous(memory_format=fmt).requires_grad_()
    dy = data["dy"][lo:lo + sizes[rank]].to(device).contiguous(memory_format=fmt)
    bn = syncbn.SyncBatchNorm2d(tail[0]).to(device)
    with torch.no_grad():
        bn.weight.copy_(data["w"])
        bn.bias.copy_(data["b"])
    y = bn(x)
    y.backward(dy)
    return {"y": y.detach().cpu(), "dx": x.grad.cpu(), "dw": bn.weight.grad.cpu(),
            "db": bn.bias.grad.cpu(), "running_mean": bn.running_mean.cpu(),
            "running_var": bn.running_var.cpu(),
            "num_batches_tracked": int(bn.num_batches_tracked)}


def section_gloo(ctx: Ctx) -> None:
    """2 ranks over gloo on the one GPU: exactness per path, and the skipped layer."""
    paths = usable(ctx)
    entry = ctx.summary.step("gloo")
    entry["available"] = available_paths(ctx.smoke)
    if not paths:
        ctx.summary.finish("gloo", "failed", "no syncbn path available")
        return
    work = Path(tempfile.mkdtemp(prefix="gpu-check-gloo-"))
    limit = min(ctx.left("gloo"), 100.0 if not ctx.smoke else 300.0)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--gloo-dir", str(work),
           "--gloo-paths", ",".join(paths), "--out", str(ctx.args.out)]
    if ctx.smoke:
        cmd.append("--cpu-smoke")
    with open(ctx.summary.log_path, "a") as log:
        procs = [subprocess.Popen(cmd + ["--gloo-rank", str(r)], env=child_env(), stdout=log,
                                  stderr=subprocess.STDOUT) for r in (0, 1)]
        deadline = time.perf_counter() + limit
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(deadline - time.perf_counter(), 1)))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(f"killed after {limit:.0f} s")
    entry["rank_exit"] = codes
    ok = gloo_compare(ctx, work, paths)
    ok = gloo_skip_verdicts(ctx, work, paths) and ok
    ctx.summary.finish("gloo", "passed" if ok and codes == [0, 0] else "failed",
                       "" if codes == [0, 0] else f"rank exit codes {codes}")


def gloo_compare(ctx: Ctx, work: Path, paths: list[str]) -> bool:
    """Both ranks' tensors against float64 over the concatenated batch."""
    import torch

    try:
        ranks = [torch.load(work / f"rank{r}.pt") for r in (0, 1)]
    except Exception as e:
        ctx.summary.verdict("gloo", "exactness", f"no results ({type(e).__name__}: {e})", "", False)
        return False
    ok_all = True
    for path in paths:
        for sizes in GLOO_SHARDS:
            for tail, dtype, layout in gloo_cases(ctx.smoke):
                key = f"{path} {sizes} {'x'.join(map(str, tail))} {dtype} {layout}"
                got = [r.get(key, {"error": "missing"}) for r in ranks]
                errors = [g["error"] for g in got if "error" in g]
                if errors:
                    ctx.summary.verdict("gloo", key, f"error: {errors[0]}", "", False)
                    ok_all = False
                    continue
                data = gloo_data(sizes, tail, dtype, layout)
                ref = reference(data["x"], data["dy"], data["w"], data["b"], 0.1)
                whole = {"y": torch.cat([g["y"] for g in got]),
                         "dx": torch.cat([g["dx"] for g in got]),
                         "dw": got[0]["dw"] + got[1]["dw"], "db": got[0]["db"] + got[1]["db"],
                         "running_mean": got[0]["running_mean"],
                         "running_var": got[0]["running_var"]}
                errs = {k: rel_err(whole[k], ref[k]) for k in ref}
                tol = {k: TOLERANCES[dtype] if k in ("y", "dx") else TOLERANCES["float32"]
                       for k in ref}
                same = all(torch.equal(got[0][k], got[1][k]) for k in ("running_mean",
                                                                        "running_var"))
                counted = all(g["num_batches_tracked"] == 1 for g in got)
                worst = max(errs, key=lambda k: errs[k] / tol[k])
                ok = all(errs[k] <= tol[k] for k in errs) and same and counted
                ok_all = ok_all and ok
                extra = ("" if same else "; running stats differ between ranks") + (
                    "" if counted else "; num_batches_tracked != 1")
                ctx.summary.verdict("gloo", f"{key} worst ({worst}) vs float64{extra}",
                                    errs[worst], f"<= {tol[worst]:.2g}", ok)
    return ok_all


def gloo_skip_verdicts(ctx: Ctx, work: Path, paths: list[str]) -> bool:
    ok_all = True
    try:
        skips = [json.loads((work / f"rank{r}-skip.json").read_text()) for r in (0, 1)]
    except Exception as e:
        ctx.summary.verdict("gloo", "a rank skips a layer", f"no result ({e})",
                            "raises on every rank", False)
        return False
    for path in paths:
        got = [s.get(path, {}) for s in skips]
        raised = [bool(g.get("raised")) for g in got]
        ok = all(raised)
        ok_all = ok_all and ok
        ctx.summary.verdict("gloo", f"{path}: a rank skips a layer", [
            f"rank {r}: " + (f"raised after {g.get('seconds')} s: {g['raised'][:300]}"
                             if g.get("raised") else "did NOT raise") for r, g in enumerate(got)],
            "raises on every rank", ok)
    return ok_all


# ---------------------------------------------------------------------------- CUDA graphs
def small_model(ctx: Ctx, channels: int = 16) -> Any:
    from torch import nn

    import syncbn

    ctx.torch.manual_seed(0)
    bn = syncbn.SyncBatchNorm2d(channels)
    with ctx.torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(nn.Conv2d(8, channels, 3, padding=1), bn, nn.ReLU()).to(ctx.device)


def compare(name: str, got: Any, want: Any, tol: float = 1e-5) -> str | None:
    """None when equal within tolerance, else what differs."""
    import torch

    if got is None or want is None:
        return None if got is None and want is None else f"{name}: one is None"
    try:
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        return None
    except AssertionError as e:
        return f"{name}: {first_lines(e, 2)}"


def capture_and_replay(ctx: Ctx, model: Any, x_shape: tuple[int, ...]) -> list[str]:
    """Side-stream warm-up, capture forward+backward, 3 replays on fresh inputs against an
    eager copy: what differed (empty when everything matched)."""
    torch = ctx.torch
    bn = model[1] if isinstance(model, torch.nn.Sequential) else model
    static_x = torch.randn(x_shape, device="cuda", requires_grad=True)
    static_dy = torch.randn((x_shape[0], bn.num_features, *x_shape[2:]), device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            static_x.grad = None
            model(static_x).backward(static_dy)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    eager = copy.deepcopy(model)
    eager_bn = eager[1] if isinstance(eager, torch.nn.Sequential) else eager
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=True)
    static_x.grad = None
    with torch.cuda.graph(graph):
        static_y = model(static_x)
        static_y.backward(static_dy)
    problems: list[str] = []
    previous = bn.running_mean.clone()
    for i in range(3):
        fresh = (torch.randn(x_shape, device="cuda") + i).requires_grad_()
        with torch.no_grad():
            static_x.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        eager.zero_grad(set_to_none=True)
        y = eager(fresh)
        y.backward(static_dy)
        found = [p for p in (
            compare("output", static_y, y),
            compare("grad input", static_x.grad, fresh.grad, 1e-4),
            *(compare(f"grad {n}", p.grad, q.grad, 1e-4)
              for (n, p), q in zip(model.named_parameters(), eager.parameters())),
            compare("running_mean", bn.running_mean, eager_bn.running_mean),
            compare("running_var", bn.running_var, eager_bn.running_var),
            compare("num_batches_tracked", bn.num_batches_tracked, eager_bn.num_batches_tracked),
        ) if p]
        advanced = not torch.equal(bn.running_mean, previous)
        if advanced != (x_shape[0] > 0):
            found.append(f"running_mean {'advanced' if advanced else 'did not advance'}")
        previous = bn.running_mean.clone()
        problems += [f"replay {i + 1}: {p}" for p in found]
    return problems


def section_graphs(ctx: Ctx) -> None:
    """CUDA-graph capture and replay per path (conv -> SyncBatchNorm2d -> relu; empty shard)."""
    if ctx.smoke:
        ctx.summary.finish("graphs", "skipped", "needs CUDA (torch.cuda.graph)")
        return
    one_rank_group(ctx)
    paths, bad = usable(ctx), []
    for path in paths:
        use_path(path)
        for what, make, shape in (
                ("conv -> SyncBatchNorm2d -> relu, batch 8", lambda: small_model(ctx),
                 (8, 8, 16, 16)),
                ("SyncBatchNorm2d alone, empty shard (batch 0)", lambda: small_model(ctx)[1],
                 (0, 16, 8, 8))):
            try:
                problems = capture_and_replay(ctx, make(), shape)
            except Exception as e:
                ctx.summary.log(traceback.format_exc())
                problems = [f"capture failed: {type(e).__name__}: {first_lines(e, 4)}"]
                with contextlib.suppress(Exception):
                    ctx.torch.cuda.synchronize()
            ctx.summary.verdict("graphs", f"{path}: {what}, 3 replays vs eager",
                                "equal" if not problems else "; ".join(problems)[:800],
                                "equal", not problems)
            if problems:
                bad.append(f"{path}: {what}")
    if not paths:
        ctx.summary.finish("graphs", "failed", "no syncbn path available")
    else:
        ctx.summary.finish("graphs", "failed" if bad else "passed", "; ".join(bad))


# ------------------------------------------------------------------------------------ models
def section_timm(ctx: Ctx) -> None:
    """timm efficientnet_b0 converted, one synchronized training step per path."""
    try:
        import timm
    except Exception as e:
        ctx.summary.finish("timm", "skipped", f"timm is not importable ({type(e).__name__}: {e})")
        return
    import warnings

    import torch.nn.functional as F
    from torch.nn.modules.batchnorm import _BatchNorm

    import syncbn

    one_rank_group(ctx)
    torch, entry = ctx.torch, ctx.summary.step("timm")
    batch, size = (2, 32) if ctx.smoke else (8, 128)
    ran, failed = [], []
    for path in usable(ctx) if not ctx.smoke else ["aten"]:  # the interpreter: ~50 layers, slow
        if ctx.left("timm") <= 0:
            entry.setdefault("skipped", []).append(f"{path}: --budget spent")
            continue
        t0 = time.perf_counter()
        try:
            torch.manual_seed(0)
            model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)
            before = sum(isinstance(m, _BatchNorm) for m in model.modules())
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = syncbn.convert_sync_batchnorm(model)
            synced = sum(isinstance(m, syncbn.SyncBatchNorm) for m in model.modules())
            left = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _BatchNorm)
                           and not isinstance(m, syncbn.SyncBatchNorm)})
            model = model.to(ctx.device).train()
            if not ctx.smoke:
                model = model.to(memory_format=torch.channels_last)
            use_path(path)
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            x = torch.randn(batch, 3, size, size, device=ctx.device)
            labels = torch.randint(0, 10, (batch,), device=ctx.device)
            loss = F.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            entry[path] = {"batch_norm_layers": before, "synchronized_layers": synced,
                           "left_unsynchronized": left, "loss": value,
                           "convert_warnings": sorted({str(w.message)[:200] for w in caught})[:5],
                           "seconds": round(time.perf_counter() - t0, 1)}
            ctx.summary.verdict("timm", f"{path}: efficientnet_b0 step (synchronized layers "
                                f"{synced} of {before}; left: {left or 'none'})",
                                value, "a finite loss", math.isfinite(value))
            (ran if math.isfinite(value) else failed).append(path)
        except Exception as e:
            ctx.summary.log(traceback.format_exc())
            ctx.summary.verdict("timm", f"{path}: efficientnet_b0 step", f"error: {first_lines(e)}",
                                "a finite loss", False)
            failed.append(path)
    ctx.summary.finish("timm", "failed" if failed else "passed" if ran else "skipped",
                       f"failed: {failed}" if failed else "" if ran else "nothing ran")


def section_path_tests(ctx: Ctx) -> None:
    """The CUDA tests of tests/test_distributed.py with SYNCBN_KERNEL=triton, =cuda."""
    if ctx.smoke:
        ctx.summary.finish("path_tests", "skipped", "--cpu-smoke: the CUDA tests would skip")
        return
    paths = [p for p in ("triton", "cuda") if p in usable(ctx)]
    runs = []
    for i, path in enumerate(paths):
        limit = ctx.left("path_tests") / (len(paths) - i) if ctx.args.budget is not None else None
        runs.append(run_pytest(ctx, "path_tests", ["-m", "cuda", "tests/test_distributed.py"],
                               env={"SYNCBN_KERNEL": path}, limit=limit))
    if not runs:
        ctx.summary.finish("path_tests", "skipped", "neither triton nor cuda is available")
        return
    pytest_verdict(ctx, "path_tests", runs)


def bottleneck(cin: int, mid: int, stride: int) -> Any:
    """1x1 -> 3x3 (stride) -> 1x1 (x4), BN after each conv, projection shortcut when needed."""
    import torch.nn.functional as F
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            cout = 4 * mid
            self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
            self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(mid)
            self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

        def forward(self, x: Any) -> Any:
            out = F.relu(self.bn1(self.conv1(x)))
            out = F.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return F.relu(out + (x if self.down is None else self.down(x)))

    return Bottleneck()


def resnet50(width: int = 64, depths: tuple[int, ...] = (3, 4, 6, 3)) -> Any:
    """ResNet-50-style: 7x7/2 stem + BN + max-pool, bottleneck stages of widths
    ``width * (1, 2, 4, 8)`` (outputs x4), average pool, a 1000-way linear layer."""
    from torch import nn

    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    cin = width
    for i, (blocks, mult) in enumerate(zip(depths, (1, 2, 4, 8))):
        for j in range(blocks):
            layers.append(bottleneck(cin, width * mult, 2 if i > 0 and j == 0 else 1))
            cin = 4 * width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1000)]
    return nn.Sequential(*layers)


def resnet_variant(ctx: Ctx, path: str | None) -> dict[str, Any]:
    """Build, compile (fullgraph=True), warm up and time one variant: median ms per step."""
    import torch.nn.functional as F

    import syncbn

    torch, smoke = ctx.torch, ctx.smoke
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = resnet50(8, (1, 1, 1, 1)) if smoke else resnet50()
    model = model.to(ctx.device).to(memory_format=torch.channels_last)
    if path:
        use_path(path)
        model = syncbn.convert_sync_batchnorm(model)
    shape = (2, 3, 32, 32) if smoke else (32, 3, 224, 224)
    x = torch.randn(shape, device=ctx.device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (shape[0],), device=ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    compiled = torch.compile(model, backend="aot_eager" if smoke else "inductor", fullgraph=True)
    autocast = (contextlib.nullcontext() if smoke
                else torch.autocast("cuda", dtype=torch.bfloat16))

    def train_step() -> Any:
        with autocast:
            loss = F.cross_entropy(compiled(x).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    first = float(train_step().detach())
    ctx.sync()
    compile_s = time.perf_counter() - t0
    for _ in range(0 if smoke else 5):
        train_step()
    times = []
    for _ in range(2 if smoke else 20):
        if smoke:
            t1 = time.perf_counter()
            loss = train_step()
            times.append((time.perf_counter() - t1) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = train_step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": round(statistics.median(times), 3),
            "compile_and_first_step_s": round(compile_s, 1),
            "loss_first_last": [first, float(loss.detach())]}


def section_resnet(ctx: Ctx) -> None:
    """A compiled ResNet-50 training step: plain BatchNorm, then syncbn per path (--budget)."""
    one_rank_group(ctx)
    entry = ctx.summary.step("resnet")
    entry["setup"] = ("batch 32 x 3x224x224, channels_last, bf16 autocast, inductor, "
                      "fullgraph=True; forward, cross-entropy, backward, SGD step"
                      if not ctx.smoke else "--cpu-smoke: width 8, one block per stage, batch 2, "
                      "32x32, aot_eager")
    took = 0.0
    for name, path in [("plain", None)] + [(p, p) for p in ("triton", "cuda", "aten")
                                           if p in usable(ctx)]:
        if ctx.left("resnet") < took or ctx.left("resnet") <= 0:
            left = max(ctx.left("resnet"), 0)
            entry[name] = {"skipped": f"--budget: {left:.0f} s left, the last variant took "
                                      f"{took:.0f} s"}
            ctx.summary.say(f"  resnet {name}: skipped (budget)")
            ctx.summary.save()
            continue
        t0 = time.perf_counter()
        try:
            entry[name] = resnet_variant(ctx, path)
            if name != "plain" and "ms" in entry.get("plain", {}):
                ratio = entry[name]["ms"] / entry["plain"]["ms"]
                ctx.summary.verdict("resnet", f"{name}/plain step time", ratio, "<= 1.02",
                                    ratio <= 1.02)
            else:
                ctx.summary.verdict("resnet", f"{name} ms per step", entry[name]["ms"], "", None)
        except Exception as e:
            ctx.summary.log(traceback.format_exc())
            entry[name] = {"error": first_lines(e, 6)}
            ctx.summary.verdict("resnet", name, f"error: {first_lines(e)}", "", None)
        took = time.perf_counter() - t0
        if not ctx.smoke:
            ctx.torch.cuda.empty_cache()
    ctx.summary.finish("resnet", "done")


# ---------------------------------------------------------------------------------- driver
def mark(summary: Summary, names: list[str], status: str, reason: str) -> None:
    """After the wrapper killed a step (or skipped it): its running sections time out, the
    ones it never reached are skipped."""
    for name in names:
        current = summary.step(name)["status"]
        if current == "running":
            summary.finish(name, status, reason)
        elif current == "not run":
            summary.finish(name, "skipped", reason if status == "skipped" else
                           f"not reached: its step was killed ({reason})")


def finish(summary: Summary) -> int:
    """Print every step's status and the failed verdicts; 0 when no correctness step failed."""
    steps = summary.data["steps"]
    print("\n== summary (" + str(summary.path) + ")")
    for name, step in steps.items():
        print(f"   {name:<13} {step['status']:<10} {step.get('reason', '')}"[:200])
    failing = [v for v in summary.data["verdicts"] if v.get("ok") is False]
    for v in failing:
        print(f"   FAIL {v['step']}: {v['check']} = {v['value']} (target {v['target']})"[:300])
    best = summary.data.get("recommended_default") or {}
    print(f"   recommended_default: {best.get('path')} ({best.get('why')})")
    failed = [n for n in CORRECTNESS if steps[n]["status"] in ("failed", "error", "timed out")]
    code = 2 if steps["env"]["status"] != "passed" else 1 if failed else 0
    summary.data["exit_status"] = code
    summary.data["failed_correctness_steps"] = failed
    summary.save()
    print(f"== exit status {code}" + (f": failed {failed}" if failed else ""))
    return code


SECTION_FUNCS: dict[str, Callable[[Ctx], None]] = {
    "cuda_tests": section_cuda_tests, "dataparallel": section_dataparallel,
    "gradients": section_gradients, "nosync": section_nosync, "numerics": section_numerics,
    "timing": section_timing, "counts": section_counts, "gloo": section_gloo,
    "graphs": section_graphs, "timm": section_timm, "path_tests": section_path_tests,
    "resnet": section_resnet,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(doc.splitlines()[1:]))
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out",
                        help="folder for summary.json and gpu_check.log (default: $OUT)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections (default: all: {','.join(SECTIONS)})")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds this process may use: timing, path_tests, gloo, timm and "
                             "resnet stop starting new work after it")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="no GPU: the code paths on CPU, tiny shapes, Triton's interpreter")
    parser.add_argument("--finish", action="store_true",
                        help="print the summary; exit 0 / 1 (a correctness step failed) / 2 "
                             "(no CUDA or no torch)")
    parser.add_argument("--mark-timeout", type=float, default=None, metavar="SECONDS",
                        help="(for gpu_check.sh) the --only sections were killed at this limit")
    parser.add_argument("--mark-skipped", default=None, metavar="REASON",
                        help="(for gpu_check.sh) the --only sections were skipped, why")
    parser.add_argument("--gloo-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gloo-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--gloo-paths", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {unknown}; expected some of {SECTIONS}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before syncbn builds its Triton kernels
    if args.gloo_rank is not None:
        return gloo_rank(args)
    summary = Summary(Path(args.out), args.cpu_smoke)
    if args.finish:
        return finish(summary)
    if args.mark_timeout is not None:
        mark(summary, args.sections, "timed out",
             f"killed at its limit of {args.mark_timeout:.0f} s")
        return 0
    if args.mark_skipped is not None:
        mark(summary, args.sections, "skipped", args.mark_skipped)
        return 0
    if "env" in args.sections:
        summary.start("env")
        code = section_env(summary, args)
        if code:
            mark(summary, [s for s in SECTIONS if s != "env"], "skipped",
                 f"env failed: {summary.step('env')['reason']}")
            return code
    rest = [s for s in args.sections if s != "env"]
    if not rest:
        return 0
    try:
        ctx = Ctx(args, summary)
    except ImportError as e:
        mark(summary, rest, "skipped", f"torch is not importable ({e})")
        return 2
    if not args.cpu_smoke and not ctx.torch.cuda.is_available():
        mark(summary, rest, "skipped", "no CUDA device")
        return 2
    for name in rest:
        summary.start(name)
        summary.say(f"== {name}: {(SECTION_FUNCS[name].__doc__ or '').strip()}")
        t0 = time.perf_counter()
        try:
            SECTION_FUNCS[name](ctx)
        except Exception as e:  # every section reports, whatever the others did
            summary.log(traceback.format_exc())
            summary.finish(name, "error", f"{type(e).__name__}: {first_lines(e)}")
        summary.step(name)["seconds"] = round(time.perf_counter() - t0, 1)
        if summary.step(name)["status"] == "running":
            summary.finish(name, "done")
        summary.save()
    if ctx.group_ready:
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
