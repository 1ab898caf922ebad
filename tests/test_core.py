"""The core's promises: a steady-state pass makes few Python calls, layers have identities that
tell separately converted models apart, settings and threads are checked, counters live with the
process group, skipped batches are not counted."""

from __future__ import annotations

import pytest

import core_workers
import harness

pytestmark = pytest.mark.timeout(240)

MAX_CALLS = 20  # Python calls into syncbn per steady-state forward+backward at 2 ranks


def test_a_steady_state_pass_makes_few_python_calls(tmp_path):
    """Default settings, 2 ranks, SyncBatchNorm2d(8) over (4, 8, 5, 5), the third pass."""
    out = harness.run(core_workers.count_calls, 2, tmp_path, 3, kernel="auto")
    for rank in out:
        print(f"{len(rank['calls'])} calls ({rank['transport']}):", ", ".join(rank["calls"]))
        assert rank["transport"] == "shm"
        assert len(rank["calls"]) <= MAX_CALLS, rank["calls"]
        assert any("all_reduce" in c for c in rank["calls"])  # the profile saw the pass


def test_separately_converted_models_run_in_swapped_order_raise_everywhere(tmp_path):
    errors = harness.run(core_workers.two_models, 2, tmp_path, True, fresh=True)
    for e in errors:
        assert "ranks are out of step at SyncBatchNorm1d(3) '0'" in e, e
    assert harness.run(core_workers.two_models, 2, tmp_path, False) == ["", ""]


def test_a_layer_built_on_one_rank_only_does_not_shift_converted_models(tmp_path):
    assert harness.run(core_workers.throwaway_layer, 2, tmp_path, fresh=True) == ["", ""]


def test_pass_counters_start_again_with_a_new_process_group(tmp_path):
    assert harness.run(core_workers.restart, 2, tmp_path, str(tmp_path / "second-store"),
                       fresh=True) == ["", ""]


@pytest.mark.parametrize("name,value,words", [
    ("SYNCBN_DEBUG", "1", "SYNCBN_DEBUG differs between the ranks of the group"),
    ("SYNCBN_NONFINITE", "skip", "SYNCBN_NONFINITE differs between the ranks of the group"),
    ("SYNCBN_SHM", "off", "SYNCBN_SHM differs between the ranks of the group"),
])
def test_a_setting_that_differs_between_ranks_is_named_on_every_rank(tmp_path, name, value, words):
    errors = harness.run(core_workers.settings_differ, 2, tmp_path, name, value, fresh=True)
    for e in errors:
        assert e.startswith("SyncBatchNormError: syncbn: rank "), e
        assert words in e, e


def test_two_threads_on_one_group_are_refused(tmp_path):
    for errors in harness.run(core_workers.two_threads, 2, tmp_path, fresh=True):
        assert len(errors) == 2, errors
        for e in errors:
            assert "must run in one thread" in e, e


def test_a_checkpoint_recompute_in_the_backwards_thread_is_not_refused(tmp_path):
    """On a GPU autograd runs the backward (and a checkpoint's recompute) in a thread of its own:
    that is not a second thread of the program."""
    out = harness.run(core_workers.checkpoint_backward_in_another_thread, 2, tmp_path, fresh=True)
    assert out == [{"ok": True}] * 2


@pytest.mark.parametrize("policy", ["skip", "raise"])
def test_a_skipped_or_raised_batch_is_not_counted(tmp_path, policy):
    for rank in harness.run(core_workers.skipped_batch_not_counted, 2, tmp_path, policy,
                            fresh=True):
        assert rank["tracked"] == 2, rank  # the two clean batches only
        assert rank["mean"] == pytest.approx([4.0, 4.0]), rank  # (2 + 6) / 2, no drift
        assert bool(rank["error"]) == (policy == "raise"), rank
