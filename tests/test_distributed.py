"""Multi-process tests (gloo on CPU; the same workers on CUDA when GPUs are present).

The property behind each: syncbn over per-rank shards == plain batch norm over torch.cat(shards),
computed in float64 (outputs, grad_input, summed weight/bias grads, running stats).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import harness
import workers

# Every test here runs twice: ranks on the fused C kernel and on the plain ATen path (the
# ``kernel`` fixture, conftest.py); half-precision and CUDA inputs take the ATen path in both.
pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("kernel")]

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _run(worker, world_size, tmp_path, cfg, device="cpu", env=None):
    if device == "cuda":
        reason = harness.cuda_skip_reason(world_size)
        if reason:
            pytest.skip(reason)
        cfg = dataclasses.replace(cfg, device="cuda")
        return harness.run(worker, world_size, tmp_path, cfg, device="cuda", env=env,
                           backend=harness.cuda_backend(world_size))
    return harness.run(worker, world_size, tmp_path, cfg, env=env)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    "sizes",
    [[4], [3, 5], [3, 0, 5], [1, 1, 1, 1], [2, 0, 0, 3]],
    ids=lambda s: "x".join(map(str, s)),
)
def test_exact_2d(tmp_path, sizes, dtype, device):
    cfg = workers.Exactness(sizes=sizes, tail=(3, 4, 5), dtype=dtype, layer="2d", steps=2)
    _run(workers.exactness, len(sizes), tmp_path, cfg, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "layer,tail",
    [("1d", (5,)), ("1d", (4, 7)), ("3d", (2, 3, 2, 4)), ("generic", (3, 2, 2, 2, 2)),
     ("functional", (3, 4, 4))],
)
def test_exact_layers(tmp_path, layer, tail, device):
    cfg = workers.Exactness(sizes=[2, 0, 3], tail=tail, dtype="float64", layer=layer, steps=2)
    _run(workers.exactness, 3, tmp_path, cfg, device)


@pytest.mark.parametrize("device", DEVICES)
def test_one_value_per_rank_1x1(tmp_path, device):
    """One sample of 1x1 per rank: each shard alone could not be normalized, the global batch can."""
    cfg = workers.Exactness(sizes=[1, 1], tail=(4, 1, 1), dtype="float64", layer="2d", steps=3)
    _run(workers.exactness, 2, tmp_path, cfg, device)


@pytest.mark.parametrize(
    "options",
    [{"momentum": None, "steps": 3}, {"affine": False}, {"track": False},
     {"affine": False, "track": False}, {"eps": 1e-3, "momentum": 0.5}],
    ids=["cumulative", "no-affine", "no-running", "bare", "eps-momentum"],
)
def test_exact_options(tmp_path, options):
    cfg = workers.Exactness(sizes=[3, 1, 4], tail=(3, 2, 3), dtype="float64", layer="2d",
                            **{"steps": 2, **options})
    _run(workers.exactness, 3, tmp_path, cfg)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs(tmp_path, dtype, device):
    cfg = workers.Exactness(sizes=[3, 2], tail=(4, 5, 5), dtype=dtype, layer="2d", steps=2)
    _run(workers.exactness, 2, tmp_path, cfg, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "layer,tail,fmt",
    [("2d", (3, 4, 5), "channels_last"), ("3d", (3, 2, 3, 4), "channels_last_3d")],
)
def test_channels_last(tmp_path, layer, tail, fmt, device):
    cfg = workers.Exactness(sizes=[2, 3], tail=tail, dtype="float32", layer=layer, memory_format=fmt)
    _run(workers.exactness, 2, tmp_path, cfg, device)


@pytest.mark.parametrize("dtype,layout", [("float32", None), ("float64", "channels_last")])
def test_ranks_on_different_paths_agree(tmp_path, dtype, layout):
    """A rank on the fused kernel and ranks on the ATen path (e.g. a node without a compiler)
    share one collective: their buffers have the same layout, and the result is exact."""
    cfg = workers.Exactness(sizes=[3, 2, 4], tail=(3, 4, 5), dtype=dtype, layer="2d", steps=2,
                            kernels=["fused", "aten", "fused"], memory_format=layout)
    _run(workers.exactness, 3, tmp_path, cfg)


@pytest.mark.parametrize("poll", ["0", "1e9"], ids=["block-at-once", "poll-only"])
def test_wait_policies_are_exact(tmp_path, poll):
    """SYNCBN_POLL_US=0 blocks in every collective at once; a huge budget never blocks (polls
    until done). Both give the exact result."""
    cfg = workers.Exactness(sizes=[3, 0, 4], tail=(3, 4, 5), dtype="float64", layer="2d", steps=2)
    _run(workers.exactness, 3, tmp_path, cfg, env={"SYNCBN_POLL_US": poll})


def test_large_mean_over_std_float32(tmp_path):
    """mean/std = 1e4 in float32: no catastrophic cancellation in the variance."""
    cfg = workers.Moments(sizes=[40, 24], tail=(3, 8, 8), dtype="float32", mean=1e4, std=1.0)
    _run(workers.variance_accuracy, 2, tmp_path, cfg)


def test_subgroups(tmp_path):
    """Groups of 2 out of 4 ranks: each pair syncs within itself only."""
    cfg = workers.Exactness(sizes=[2, 3, 1, 4], tail=(3, 2, 2), dtype="float64", layer="2d",
                            groups=[[0, 1], [2, 3]])
    _run(workers.exactness, 4, tmp_path, cfg)


@pytest.mark.parametrize("shm,transport", [("auto", "shm"), ("off", "gloo")])
def test_one_collective_per_pass(tmp_path, shm, transport):
    """One all_reduce per pass on either transport: ranks of one machine in shared memory
    (SYNCBN_SHM=auto, the default), or the process group's (SYNCBN_SHM=off)."""
    out = harness.run(workers.uses_one_collective, 3, tmp_path,
                      workers.Shards(channels=5, sizes=[2, 0, 3]), env={"SYNCBN_SHM": shm},
                      fresh=True)  # fresh processes: no wider layer was built before
    # payload 2C + 1 (forward) or 2C (backward), padded to the group's width (at least 64
    # channels: 2 * 64 + 1), plus the header: two sentinels and (f, f^2) for 6 fields
    length = 2 * 64 + 1 + 2 + 2 * 6
    for rank, calls in enumerate(out):
        assert calls["forward"] == [("all_reduce", length, torch.float64)], (rank, calls)
        assert calls["backward"] == [("all_reduce", length, torch.float64)], (rank, calls)
        assert calls["eval"] == [], (rank, calls)
        assert calls["transport"] == transport, (rank, calls)


def test_a_wider_layer_built_late_widens_the_shared_memory(tmp_path):
    out = harness.run(workers.late_wide_layer, 3, tmp_path,
                      workers.Shards(channels=100, sizes=[2, 0, 3]),
                      fresh=True)  # fresh processes: the group's segment is made here
    for rank in out:
        assert rank["transport"] == "shm", out
        # the group's width grows to the next power of two: 128 channels
        assert rank["slots"] == [2 * 64 + 15, rank["length"]] and rank["length"] == 2 * 128 + 15, out


@pytest.mark.parametrize("sizes", [[1, 0], [0, 1, 0]], ids=["1+0", "0+1+0"])
def test_global_batch_of_one_raises_everywhere(tmp_path, sizes):
    shapes = [(n, 3) for n in sizes]
    out = harness.run(workers.expect_error, len(sizes), tmp_path,
                      workers.ExpectError(layer="1d", channels=3, shapes=shapes))
    for msg in out:
        assert msg.startswith("ValueError: Expected more than 1 value per channel when training"), msg


def test_global_batch_of_zero_is_empty(tmp_path):
    harness.run(workers.empty_everywhere, 2, tmp_path)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_ddp_training_equals_single_process(tmp_path, dtype):
    cfg = workers.DDPTraining(sizes=[3, 2], steps=3, dtype=dtype)
    harness.run(workers.ddp_training, 2, tmp_path, cfg)


@pytest.mark.parametrize("ddp", [
    {"find_unused_parameters": True}, {"broadcast_buffers": False}, {"static_graph": True},
], ids=["find_unused", "no_broadcast_buffers", "static_graph"])
def test_ddp_options(tmp_path, ddp):
    cfg = workers.DDPTraining(sizes=[2, 3], steps=2, dtype="float64", ddp=ddp)
    harness.run(workers.ddp_training, 2, tmp_path, cfg)


def test_ddp_gradient_accumulation(tmp_path):
    cfg = workers.DDPTraining(sizes=[2, 4], steps=2, accumulate=2, dtype="float64")
    harness.run(workers.ddp_training, 2, tmp_path, cfg)


def test_autocast_bfloat16(tmp_path):
    harness.run(workers.autocast_training, 2, tmp_path, workers.Shards(sizes=[2, 3]))


def test_double_backward_raises_clearly(tmp_path):
    for msg in harness.run(workers.double_backward_is_refused, 2, tmp_path):
        assert "differentiate twice" in msg, msg


# --- misuse: every rank that is left waiting or out of step raises a clear error, in bounded time

def _misuse(tmp_path, scenario, world_size=2, device="cpu", env=None, **cfg):
    kw = {}
    if device == "cuda":
        reason = harness.cuda_skip_reason(world_size)
        if reason:
            pytest.skip(reason)
        cfg["device"] = "cuda"
        kw = {"device": "cuda", "backend": harness.cuda_backend(world_size)}
    return harness.run(workers.misuse, world_size, tmp_path, workers.Misuse(scenario, **cfg),
                       pg_timeout=5, timeout=90, fresh=True, env=env, **kw)


@pytest.mark.parametrize("world_size,device", [(2, "cpu"), (3, "cpu"), pytest.param(2, "cuda", marks=pytest.mark.cuda)])
def test_rank_skips_a_layer(tmp_path, world_size, device):
    errors = _misuse(tmp_path, "skip", world_size, device)
    assert all("ranks are out of step at SyncBatchNorm1d(4)" in e for e in errors), errors
    if world_size == 2:
        assert "SyncBatchNorm1d(4) '0', forward pass #1" in errors[0], errors[0]
        assert "the other rank was at SyncBatchNorm1d(4) '1'" in errors[0], errors[0]
        assert "the other rank was at SyncBatchNorm1d(4) '0'" in errors[1], errors[1]
    assert all("a rank skipped this layer" in e for e in errors)


def test_ranks_call_layers_in_another_order(tmp_path):
    errors = _misuse(tmp_path, "order")
    assert "SyncBatchNorm1d(4) '0', forward pass #1" in errors[0]
    assert "the other rank was at SyncBatchNorm1d(4) '1'" in errors[0]
    assert "SyncBatchNorm1d(4) '1', forward pass #1" in errors[1]


def test_channel_counts_differ(tmp_path):
    errors = _misuse(tmp_path, "channels")
    assert "channels: this rank 3, the other rank 4" in errors[0], errors[0]
    assert "channels: this rank 4, the other rank 3" in errors[1], errors[1]


@pytest.mark.parametrize("scenario,waiting_rank,what", [
    ("eval-on-one", 1, "SyncBatchNorm1d(4) '0' failed in the all_reduce of its forward pass #1"),
    ("exit-mid-step", 0, "failed in the all_reduce of its backward pass #1"),
    ("steps", 0, "SyncBatchNorm1d(4) '0' failed in the all_reduce of its forward pass #3"),
])
def test_a_rank_that_never_arrives_gives_a_bounded_clear_error(tmp_path, scenario, waiting_rank, what):
    errors = _misuse(tmp_path, scenario)
    assert what in errors[waiting_rank], errors
    # the other rank's process ended: the error says so, and not that it timed out
    assert "Another rank's process ended while this rank waited for it" in errors[waiting_rank]
    assert "timed out" not in errors[waiting_rank].lower(), errors[waiting_rank]


@pytest.mark.parametrize("shm", ["auto", "off"])
def test_a_stalled_rank_gives_a_clear_error_at_the_timeout(tmp_path, shm):
    """A rank that is alive but never arrives: the waiting rank raises at the group's timeout
    (5 s here) on either transport (shared memory, or the process group's)."""
    errors = _misuse(tmp_path, "stall", stall_s=8, env={"SYNCBN_SHM": shm})
    assert "SyncBatchNorm1d(4) '0' failed in the all_reduce of its forward pass #2" in errors[0], errors
    assert "It timed out: another rank never reached this layer" in errors[0], errors
    assert "process ended" not in errors[0], errors
    if shm == "auto":
        assert "timed out after 5 s waiting for rank 1 of the group" in errors[0], errors
    assert errors[1] == "", errors


@pytest.mark.parametrize("shm", ["auto", "off"])
def test_three_ranks_at_symmetric_passes_all_get_the_out_of_step_error(tmp_path, shm):
    """Ranks at forward passes #2, #3, #4 of one layer (rank r ran r + 1 steps): rank 1's pass
    is the mean, so only the squares in the header catch it. Every rank raises, naming the layer,
    and none hangs."""
    errors = _misuse(tmp_path, "pass-spread", 3, env={"SYNCBN_SHM": shm})
    for rank, own in enumerate([2, 3, 4]):
        e = errors[rank]
        where = f"SyncBatchNorm1d(4) '0', forward pass #{own} on rank {rank}"
        assert f"ranks are out of step at {where}" in e, errors
        assert f"pass: this rank {own}, the mean over ranks 3" in e, e
        assert "the ranks ran different numbers of steps" in e, e


def test_revert_mid_training_copy_keeps_sync_and_in_place_warns_once(tmp_path):
    for result in harness.run(workers.revert_mid_training, 2, tmp_path):
        assert result["on_copy"] == [], result
        assert result["kept"] == ["SyncBatchNorm1d"] * 2, result
        assert result["exported"] == result["reverted"] == ["BatchNorm1d"] * 2, result
        assert len(result["in_place"]) == 1, result
        category, message = result["in_place"][0]
        assert category == "UserWarning", result
        assert "changes the module in place" in message, message
        assert "a live DistributedDataParallel wraps" in message, message
        assert "revert_sync_batchnorm(copy.deepcopy(model.module))" in message, message


def test_debug_mode_shows_every_ranks_view(tmp_path):
    errors = _misuse(tmp_path, "skip", debug=True)
    for e in errors:
        assert "syncbn (SYNCBN_DEBUG): ranks are out of step" in e, e
        assert "rank 0: SyncBatchNorm1d(4) '0', forward pass #1, 4 channels, input (3, 4)" in e, e
        assert "rank 1: SyncBatchNorm1d(4) '1', forward pass #1, 4 channels, input (3, 4)" in e, e


def test_debug_mode_names_the_rank_with_non_finite_statistics(tmp_path):
    errors = _misuse(tmp_path, "nan", debug=True)
    for e in errors:
        assert "non-finite values in the local statistics of SyncBatchNorm1d(4) '0' on rank(s) [1]" in e, e


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_activation_checkpointing(tmp_path, reentrant):
    harness.run(workers.checkpointing, 2, tmp_path, [3, 2], reentrant)


@pytest.mark.parametrize("policy", ["propagate", "skip", "raise"])
def test_nonfinite_policies(tmp_path, policy):
    errors = harness.run(workers.nonfinite, 2, tmp_path, policy, fresh=True)
    if policy == "raise":
        for e in errors:
            assert "non-finite values (NaN or Inf) in the global batch statistics of SyncBatchNorm1d(2)" in e, e
    else:
        assert errors == ["", ""]


def test_gradients_at_large_mean_over_std_float32(tmp_path):
    """mean/std = 1e3 in float32: grad_input as accurate as torch's own float32 BatchNorm."""
    out = harness.run(workers.large_mean_gradients, 2, tmp_path,
                      workers.Moments(sizes=[6, 10], tail=(3, 4, 4), mean=10.0, std=0.01))
    print("grad_input max error, syncbn vs torch float32:", out[0])
