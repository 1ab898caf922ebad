"""``syncbn demo``'s verdict and report: the exactness check, the table, the JSON and the picture.

The check. Two exact methods still differ by rounding, and training amplifies such a difference
step by step -- mildly when the dynamics are tame, exponentially when they are chaotic (a
BatchNorm1d over a global batch of 4 or fewer: after a few hundred steps even float64 runs part
ways). So rank 0 also trains ``single`` a second time with every global batch reversed
(``single-rev``): the same math in another summation order, whose distance from ``single`` is
the float noise of this very run. ``syncbn`` (W processes) and ``dataparallel`` (one process, W
replicas through :class:`syncbn.DataParallel`) each pass if at every step its loss differs from
``single``'s by at most ``max(tol, 100 x the largest noise difference so far)``, and its final
parameters and buffers by at most ``max(tol_param, 100 x the noise's)`` (``TOLERANCES``). A
synchronization bug shows at the very first step, before any amplification, as a loss
difference of 1e-2 or more (``local-bn``: 5e-2 to 2e-1 at step 0), 10 times the float32
tolerance.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from torch import Tensor

from ._table import WIDTH, table

__all__ = ["CHECKED", "CONFIGS", "NOISE", "NOISE_FACTOR", "TOLERANCES", "check_exactness",
           "format_summary", "format_table", "shape_label", "shape_of", "write_report"]

CONFIGS = ("syncbn", "dataparallel", "local-bn", "single")  # in the table's order
CHECKED = ("syncbn", "dataparallel")  # must reproduce single up to rounding
NOISE = "single-rev"  # single again, each global batch reversed: the float noise of the run
LAST_STEPS = 100  # "train loss" = mean global-batch loss of the last 100 steps

#: The absolute part of the allowed |syncbn - single|, per dtype: per step's global-batch loss,
#: and final parameters and buffers (``|a - b| / max(1, |b|)``). See the module docstring.
TOLERANCES: dict[str, dict[str, float]] = {
    "float64": {"loss": 1e-8, "param": 1e-6},
    "float32": {"loss": 1e-3, "param": 1e-2},
}
#: The relative part: syncbn may differ from single by this many times the float noise so far.
NOISE_FACTOR = 100.0
TOLERANCE_RULE = (
    "for syncbn and for dataparallel, at every step t: |loss(t) - loss_single(t)| <= max(tol_loss, 100 * max over s <= t of "
    "|loss_single_reversed(s) - loss_single(s)|); final parameters and buffers: "
    "max |a - b| / max(1, |b|) <= max(tol_param, 100 * the same for single_reversed)"
)
TOLERANCE_REASON = (
    "syncbn and single are the same computation in a different summation order, so they differ "
    "by rounding, and training amplifies that difference step by step: mildly when the dynamics "
    "are tame (defaults, 500 steps: float64 ~1e-12; float32 ~1e-7 at step 0, 5e-6 to 2e-4 at "
    "the end depending on the seed), exponentially when they are chaotic (a BatchNorm1d over a "
    "global batch of 4: O(1) after a few hundred steps, float64 too). single_reversed (single "
    "with each global batch reversed: same math, other rounding) measures that amplification in "
    "the same run, and the check follows it. The absolute parts (float32: 1e-3 and 1e-2; float64: "
    "1e-8 and 1e-6) hold wherever the noise is small, which includes the first steps, where a "
    "synchronization bug shows before any amplification, as a loss difference of 1e-2 or more "
    "(see local-bn)."
)


def shape_of(config: str, world_size: int, batch: int) -> tuple[int, int]:
    """(ranks, images per rank) of a configuration (``dataparallel``: 1 process, all images)."""
    return (world_size, batch) if config in ("syncbn", "local-bn") else (1, world_size * batch)


def shape_label(config: str, world_size: int, batch: int) -> str:
    """``"2 x 2"``, ``"1 x 4"``, or for ``dataparallel`` ``"1 x 2 replicas x 2"``."""
    if config == "dataparallel":
        return f"1 x {world_size} replicas x {batch}"
    return "{} x {}".format(*shape_of(config, world_size, batch))


# --------------------------------------------------------------------------- checking


def _step_diffs(a: list[float], b: list[float]) -> list[float]:
    """|a - b| per step; NaN counts as infinitely different, and so do runs of unequal length."""
    if len(a) != len(b):
        return [math.inf]
    return [math.inf if math.isnan(x - y) else abs(x - y) for x, y in zip(a, b)]


def _state_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[float, str]:
    """(max elementwise |a - b| / max(1, |b|) over all parameters and buffers, the tensor's name):
    absolute for entries up to 1, relative above (running variances reach the hundreds)."""
    worst, name = 0.0, ""
    for k, value in a.items():
        if value.numel() == 0:
            continue
        d = float(((value - b[k]).abs() / b[k].abs().clamp(min=1)).max())
        if math.isnan(d):
            d = math.inf
        if d > worst or not name:
            worst, name = d, k
    return worst, name


def _compare(results: dict[str, Any], name: str) -> dict[str, Any]:
    ref = results["single"]
    diffs = _step_diffs(results[name]["losses"], ref["losses"])
    at = max(range(len(diffs)), key=diffs.__getitem__) if diffs else 0
    param, tensor = _state_diff(results[name]["state"], ref["state"])
    return {"max_abs_loss_diff": diffs[at] if diffs else 0.0, "at_step": at,
            "first_step_loss_diff": diffs[0] if diffs else 0.0,
            "max_param_diff": param, "in_tensor": tensor, "loss_diff_per_step": diffs}


def check_exactness(results: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Compare ``syncbn`` and ``dataparallel`` with ``single`` (and, for scale, ``local-bn`` and
    the noise run).

    ``results`` maps ``"syncbn"``, ``"dataparallel"``, ``"local-bn"``, ``"single"`` and optionally
    ``"single-rev"`` (``single`` with each global batch reversed) to ``{"losses": [...],
    "state": {...}}`` (``local-bn``: or ``{"skipped": why}``).
    Returns the JSON report's ``exactness`` record: ``passed`` is False, ``failed`` names the
    configurations and ``message`` says what differed where, when ``syncbn`` or ``dataparallel``
    is not within the allowed difference (``TOLERANCE_RULE``), the same for both.
    """
    tol = TOLERANCES[dtype]
    checked = {name: _compare(results, name) for name in CHECKED}
    local = None if "skipped" in results["local-bn"] else _compare(results, "local-bn")
    noise = _compare(results, NOISE) if NOISE in results else None
    steps = len(checked["syncbn"]["loss_diff_per_step"])
    noise_steps = noise["loss_diff_per_step"] if noise else [0.0] * steps
    allowed, envelope = [], 0.0
    for n in noise_steps:
        envelope = max(envelope, n)
        allowed.append(max(tol["loss"], NOISE_FACTOR * envelope))
    allowed_param = max(tol["param"], NOISE_FACTOR * (noise["max_param_diff"] if noise else 0.0))
    problems, failed, first_bad = [], [], None
    for name, c in checked.items():
        bad = [t for t, (d, a) in enumerate(zip(c["loss_diff_per_step"], allowed)) if not d <= a]
        mine = []
        if bad:
            t = bad[0]
            first_bad = t if first_bad is None else min(first_bad, t)
            mine.append(
                f"the global-batch loss differs by {c['loss_diff_per_step'][t]:.3g} at step {t} "
                f"(allowed there: {allowed[t]:.3g}; {len(bad)} step(s) over)")
        if not c["max_param_diff"] <= allowed_param:
            mine.append(f"the final '{c['in_tensor']}' differs by {c['max_param_diff']:.3g} "
                        f"(allowed: {allowed_param:.3g})")
        if mine:
            failed.append(name)
            problems.append(f"{name}: " + "; ".join(mine))
    sync = checked["syncbn"]
    return {
        "compared": [*CHECKED, "single"], "dtype": dtype,
        "tolerance": {"loss_per_step": tol["loss"], "param": tol["param"],
                      "noise_factor": NOISE_FACTOR, "allowed_param": allowed_param,
                      "allowed_loss_per_step_max": max(allowed, default=tol["loss"]),
                      "rule": TOLERANCE_RULE, "why": TOLERANCE_REASON},
        "syncbn_vs_single": sync, "dataparallel_vs_single": checked["dataparallel"],
        "local_bn_vs_single": local, "noise_single_reversed_vs_single": noise,
        "passed": not problems, "failed": failed, "first_failing_step": first_bad,
        "message": " / ".join(problems),
    }


# --------------------------------------------------------------------------- reporting


def format_table(report: dict[str, Any]) -> str:
    """The table of the configurations, as printed."""
    ex = report["exactness"]
    rows = []
    for name in CONFIGS:
        c = report["configs"][name]
        shape = shape_label(name, report["world_size"], report["batch_per_rank"])
        if "skipped" in c:
            rows.append([name, shape, "-", "-", "-", "not run", "not run"])
            continue
        if name == "single":
            dl = dp = "(reference)"
        else:
            d = ex[name.replace("-", "_") + "_vs_single"]
            dl, dp = f"{d['max_abs_loss_diff']:.2e}", f"{d['max_param_diff']:.2e}"
        rows.append([name, shape, f"{c['final_train_loss']:.4f}",
                     f"{100 * c['test_accuracy']:.2f} %", f"{c['wall_time_s']:.1f} s", dl, dp])
    return table(["configuration", "ranks x batch", "train loss", "test acc", "wall time",
                  "max|dloss| vs single", "param diff vs single"], rows)


def format_summary(report: dict[str, Any]) -> str:
    """The verdict and what the table's columns mean, as printed (lines of at most 120)."""
    ex = report["exactness"]
    s, dp, lb, n, tol = (ex["syncbn_vs_single"], ex["dataparallel_vs_single"],
                         ex["local_bn_vs_single"], ex["noise_single_reversed_vs_single"],
                         ex["tolerance"])
    acc = {k: 100 * c.get("test_accuracy", math.nan) for k, c in report["configs"].items()}
    lines = [
        (f"exactness ({report['dtype']}): {'PASS' if ex['passed'] else 'FAIL'}: syncbn vs single "
         f"over {report['steps']} steps: max |dloss| {s['max_abs_loss_diff']:.2e}, param diff "
         f"{s['max_param_diff']:.2e}; dataparallel (1 process, {report['world_size']} replicas) "
         f"vs single: max |dloss| {dp['max_abs_loss_diff']:.2e}, param diff "
         f"{dp['max_param_diff']:.2e}; allowed {tol['loss_per_step']:g} and {tol['param']:g}, or "
         f"{tol['noise_factor']:g}x the float noise where larger"),
    ]
    if n is not None:
        lines.append(
            f"float noise: single again with each global batch reversed (same math, other "
            f"rounding): max |dloss| {n['max_abs_loss_diff']:.2e}, param diff "
            f"{n['max_param_diff']:.2e}")
    if lb is None:
        lines.append(f"local-bn {report['configs']['local-bn']['skipped']}")
    else:
        lines.append(
            f"local-bn vs single: max |dloss| {lb['max_abs_loss_diff']:.2e} "
            f"({lb['first_step_loss_diff']:.2e} at step 0), param diff {lb['max_param_diff']:.2e} "
            f"(in {lb['in_tensor']}); test accuracy {acc['local-bn']:.2f} % vs "
            f"{acc['single']:.2f} %")
    lines += [
        (f"train loss: mean of the last {min(LAST_STEPS, report['steps'])} steps; test acc: "
         f"{report['data']['n_test']} held-out images, eval mode; param diff: "
         "max |a-b|/max(1,|b|) over parameters and buffers"),
    ]
    return "\n".join(textwrap.fill(line, WIDTH, subsequent_indent="  ", break_long_words=False,
                                   break_on_hyphens=False) for line in lines)


def write_report(results: dict[str, Any], meta: dict[str, Any], opts: dict[str, Any],
                 out_dir: Path, t_start: float) -> int:
    """Print the table, write the PNG and JSON, and return the exit status (1: the exactness
    check failed)."""
    exactness = check_exactness(results, opts["dtype"])
    world, b = meta["world_size"], opts["batch_per_rank"]
    norms = {"syncbn": "syncbn.SyncBatchNorm2d and SyncBatchNorm1d (global-batch statistics)",
             "dataparallel": "syncbn.SyncBatchNorm2d and SyncBatchNorm1d in syncbn.DataParallel "
                             f"({world} replicas of {b} images in one process; global-batch "
                             "statistics)",
             "local-bn": "torch.nn.BatchNorm2d and BatchNorm1d (each rank's own statistics; DDP "
                         "broadcasts rank 0's running statistics before every forward)",
             "single": "torch.nn.BatchNorm2d and BatchNorm1d"}
    configs = {}
    for name in CONFIGS:
        r = results[name]
        ranks, batch = shape_of(name, world, b)
        if "skipped" in r:
            configs[name] = {"ranks": ranks, "batch_per_rank": batch, "batch_norm": norms[name],
                             "skipped": r["skipped"]}
            continue
        last = r["losses"][-LAST_STEPS:]
        configs[name] = {
            "ranks": ranks, "batch_per_rank": batch, "batch_norm": norms[name],
            **({"replicas": world, "batch_per_replica": b} if name == "dataparallel" else {}),
            "steps": r["steps"], "final_train_loss": sum(last) / max(1, len(last)),
            "test_accuracy": r["evals"][-1][1] if r["evals"] else float("nan"),
            "wall_time_s": r["wall_time_s"], "loss_per_step": r["losses"],
            "test_accuracy_curve": [{"step": s, "accuracy": a} for s, a in r["evals"]],
        }
    noise = None
    if NOISE in results:
        r = results[NOISE]
        noise = {"what": "single trained again with each global batch in reverse order: the same "
                         "math in another summation order; its distance from single is the float "
                         "noise of this run",
                 "wall_time_s": r["wall_time_s"], "loss_per_step": r["losses"],
                 "test_accuracy": r["evals"][-1][1] if r["evals"] else float("nan")}
    png, js = out_dir / "syncbn-demo.png", out_dir / "syncbn-demo.json"
    report = {
        **meta,
        "batch_per_rank": b, "global_batch": world * b, "epochs": opts["epochs"],
        "steps": results["single"]["steps"],
        "steps_per_epoch": results["single"]["steps_per_epoch"],
        "max_steps": opts["max_steps"], "seed": opts["seed"], "dtype": opts["dtype"],
        "optimizer": {"name": "SGD", "lr": opts["lr"], "momentum": opts["momentum"]},
        "definitions": {
            "final_train_loss": f"mean global-batch cross-entropy of the last {LAST_STEPS} steps",
            "test_accuracy": "held-out test images, eval mode (running statistics), after the "
                             "last step",
            "loss_per_step": "cross-entropy averaged over the whole global batch at each step "
                             "(every rank's sum, all-reduced)",
            "max_param_diff": "max over parameters and buffers of |a - b| / max(1, |b|), "
                              "elementwise, after the last step",
            "wall_time_s": "training and evaluation of one configuration, measured on rank 0",
        },
        "configs": configs, "noise_run": noise, "exactness": exactness,
        "outputs": {"png": str(png.resolve()), "json": str(js.resolve())},
    }
    print(format_table(report))
    print()
    print(format_summary(report))
    report["total_wall_time_s"] = time.perf_counter() - t_start
    _plot(report, png)
    js.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {png.resolve()}\n      {js.resolve()}")
    sys.stdout.flush()
    if not exactness["passed"]:
        who = " and ".join(f"{n} ({shape_label(n, world, b)})" for n in exactness["failed"])
        print(f"syncbn demo: EXACTNESS CHECK FAILED ({opts['dtype']}): {who} does not reproduce "
              f"single (1 x {world * b}): {exactness['message']}. "
              f"They should train the same model up to rounding; the per-step numbers are in "
              f"{js}.", file=sys.stderr)
        return 1
    return 0


def _plot(report: dict[str, Any], path: Path) -> None:
    """Three panels: train loss per step, |loss - single's loss| per step, test accuracy."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    world, b = report["world_size"], report["batch_per_rank"]
    ex = report["exactness"]
    style: dict[str, dict[str, Any]] = {
        "syncbn": {"color": "#1f77b4", "ls": "-", "lw": 2.2, "zorder": 3},
        "dataparallel": {"color": "#2ca02c", "ls": (0, (1, 2)), "lw": 2.0, "zorder": 5},
        "local-bn": {"color": "#d62728", "ls": "-", "lw": 1.6, "zorder": 2},
        "single": {"color": "#ff7f0e", "ls": (0, (4, 3)), "lw": 1.6, "zorder": 4},
    }
    label = {"syncbn": f"syncbn: {world} ranks × {b}, SyncBN",
             "dataparallel": f"dataparallel: 1 × {world} replicas × {b}, SyncBN",
             "local-bn": f"local-bn: {world} ranks × {b}, plain BN (DDP)",
             "single": f"single: 1 process × {world * b}, plain BN"}
    fig = Figure(figsize=(17, 6.6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_diff, ax_acc = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.25, 1.25, 1]})
    steps = report["steps"]
    x = np.arange(steps)
    window = max(1, min(50, steps // 20))
    for name in ("local-bn", "syncbn", "single", "dataparallel"):
        c = report["configs"][name]
        if "skipped" in c:
            continue
        y = np.asarray(c["loss_per_step"], dtype=float)
        if name in ("syncbn", "local-bn"):
            ax_loss.plot(x, y, color=style[name]["color"], alpha=0.12, lw=0.6, zorder=1)
        if len(y) >= window:
            smooth = np.convolve(y, np.ones(window) / window, mode="valid")
            ax_loss.plot(x[window - 1:], smooth, label=label[name], **style[name])
        acc = c["test_accuracy_curve"]
        ax_acc.plot([p["step"] for p in acc], [100 * p["accuracy"] for p in acc], marker="o",
                    ms={"single": 8, "dataparallel": 11}.get(name, 4),
                    mfc="none" if name in ("single", "dataparallel") else None,
                    label=f"{name}: {100 * c['test_accuracy']:.2f} %", **style[name])

    def diff_line(diffs: list[float], color: str, text: str, lw: float = 0.8) -> None:
        d = np.asarray(diffs, dtype=float)
        d[d == 0] = np.nan  # exactly equal: no point on a log scale
        top = np.nanmax(np.r_[d, 0])
        ax_diff.plot(x[:len(d)], d, color=color, lw=lw, label=f"{text} (max {top:.1e})")

    if ex["local_bn_vs_single"] is not None:
        diff_line(ex["local_bn_vs_single"]["loss_diff_per_step"], style["local-bn"]["color"],
                  "local-bn vs single")
    diff_line(ex["syncbn_vs_single"]["loss_diff_per_step"], style["syncbn"]["color"],
              "syncbn vs single")
    diff_line(ex["dataparallel_vs_single"]["loss_diff_per_step"],
              style["dataparallel"]["color"], "dataparallel vs single")
    if ex["noise_single_reversed_vs_single"] is not None:
        diff_line(ex["noise_single_reversed_vs_single"]["loss_diff_per_step"], "#7f7f7f",
                  "float noise: single, batch reversed", lw=0.6)
    tol = ex["tolerance"]
    noise = ex["noise_single_reversed_vs_single"]
    env = np.maximum.accumulate(np.asarray(noise["loss_diff_per_step"] if noise else [0.0] * steps))
    allowed = np.maximum(tol["loss_per_step"], tol["noise_factor"] * env)
    ax_diff.plot(x[:len(allowed)], allowed, color="black", ls=":", lw=1.3,
                 label=f"allowed for syncbn, dataparallel ({report['dtype']})")
    def finish(ax: Any, ylabel: str, heading: str, log: bool, **legend: Any) -> None:
        """The labels, grid and legend (below the plot) every panel has."""
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(heading)
        ax.grid(True, which="both" if log else "major", alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=8.5, **legend)

    finish(ax_loss, "train loss of the global batch (log scale)",
           f"Train loss (faint: per step; lines: mean of {window} steps)", True, ncol=2)
    finish(ax_diff, "|loss − loss of single| (log scale)",
           f"Difference from 1 process × {world * b}, step by step", True, ncol=2)
    finish(ax_acc, "test accuracy (%)",
           f"Test accuracy (eval mode, {report['data']['n_test']} test images)", False, ncol=2,
           title="final test accuracy", title_fontsize=8.5)
    s, dp, lb = ex["syncbn_vs_single"], ex["dataparallel_vs_single"], ex["local_bn_vs_single"]
    local = ("local-bn: not run (plain BatchNorm1d cannot train on 1 image per rank)" if lb is None
             else f"local-bn vs single: max |Δloss| {lb['max_abs_loss_diff']:.1e}, param diff "
                  f"{lb['max_param_diff']:.1e}")
    fig.suptitle(
        f"syncbn demo, {report['data']['source']}: {world} ranks × {b} images vs 1 process × "
        f"{world * b}  ({report['dtype']}, {steps} steps, seed {report['seed']})\n"
        f"syncbn vs single: max |Δloss| {s['max_abs_loss_diff']:.1e}, param diff "
        f"{s['max_param_diff']:.1e}    ·    dataparallel (1 process × {world} replicas) vs single: "
        f"{dp['max_abs_loss_diff']:.1e}, {dp['max_param_diff']:.1e}: "
        f"{'PASS' if ex['passed'] else 'FAIL'}\n{local}",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path)
