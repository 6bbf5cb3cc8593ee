"""The run store: schema, round trips, SIGKILL safety and a concurrent reader."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bbdecoder.store import SCHEMA_VERSION, RunWriter, StoreError, open_run
from bbdecoder.store.reader import SCALAR_COLUMNS


def _writer_with_rows(path):
    w = RunWriter(path)
    w.set_layers([(0, "fc", "Linear", 12, "[1, 3]"), (1, "act", "ReLU", 0, None)])
    sid = w.series_id(0, "fc.weight")
    mean, l2 = w.stat_id("mean"), w.stat_id("l2")
    for step in range(3):
        w.add_step(step, 0, float(step))
        w.add_scalars([(step, 0, sid, mean, step * 0.5), (step, 0, sid, l2, float("nan"))])
    w.add_histogram(2, 0, sid, "weight", -1.0, 1.0, np.array([1, 0, 5, 2]))
    w.add_event("note", "hello", step=1, epoch=0, layer_id=0, data={"channels": [1, 2]})
    w.add_epoch_scalars([(0, sid, mean, "mean", 0.5), (0, sid, mean, "var", 1 / 6)])
    w.flush()
    return w


def test_round_trip_and_columns(tmp_path):
    w = _writer_with_rows(tmp_path)
    w.close()
    run = open_run(tmp_path)
    sc = run.scalars()
    assert list(sc.columns) == SCALAR_COLUMNS
    assert len(sc) == 6
    means = sc[sc.stat == "mean"]
    np.testing.assert_allclose(means["value"], [0.0, 0.5, 1.0])
    assert set(means["layer"]) == {"fc"} and set(means["param"]) == {"fc.weight"}
    assert sc[sc.stat == "l2"]["value"].isna().all()  # NaN is stored as NULL, read back as NaN
    hist = run.histograms()
    assert hist["count"].tolist() == [1, 0, 5, 2]
    np.testing.assert_allclose(hist["left"], [-1.0, -0.5, 0.0, 0.5])
    np.testing.assert_allclose(hist["right"], [-0.5, 0.0, 0.5, 1.0])
    ev = run.events()
    assert ev.loc[0, "data"] == {"channels": [1, 2]} and ev.loc[0, "layer"] == "fc"
    ep = run.epoch_scalars()
    assert ep.set_index("agg").loc["var", "value"] == pytest.approx(1 / 6)
    assert run.layers()["name"].tolist() == ["fc", "act"]
    assert run.steps()["loss"].tolist() == [0.0, 1.0, 2.0]
    assert run.integrity_check() == "ok"
    conn = sqlite3.connect(run.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    paths = run.to_csv(tmp_path / "csv")
    assert all(p.exists() for p in paths)


def test_reopen_appends_and_relabel(tmp_path):
    _writer_with_rows(tmp_path).close()
    w = RunWriter(tmp_path)
    assert w.next_step() == 3 and w.last_epoch() == 0
    w.relabel_epoch(0, 2, 7)
    w.close()
    run = open_run(tmp_path)
    assert set(run.scalars()["epoch"]) == {7} and run.epochs() == [7]


def test_unflushed_rows_are_not_visible_and_rollback_keeps_old(tmp_path):
    w = _writer_with_rows(tmp_path)
    sid, mean = w.series_id(0, "fc.weight"), w.stat_id("mean")
    w.add_step(3, 0, None)
    w.add_scalars([(3, 0, sid, mean, 9.0)])
    assert len(open_run(tmp_path).scalars()) == 6  # buffered, not yet written
    w.add_step(3, 0, None)  # duplicate step: the flush transaction fails and rolls back as a whole
    with pytest.raises(sqlite3.IntegrityError):
        w.flush()
    run = open_run(tmp_path)
    assert len(run.scalars()) == 6 and len(run.steps()) == 3


def test_bad_store_paths(tmp_path):
    with pytest.raises(StoreError, match="no run store"):
        open_run(tmp_path / "missing")
    _writer_with_rows(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "run.sqlite")
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="schema version"):
        open_run(tmp_path)
    with pytest.raises(StoreError, match="schema version"):
        RunWriter(tmp_path)


CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch, torch.nn as nn, torch.nn.functional as F
    from bbdecoder.monitor import Analyzer
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    an = Analyzer(model, sys.argv[1], flush_every=int(sys.argv[4]))
    if an.flush_every > 1:  # the ratios measured in step(): the ratio pass waits for the writer
        an._prefetch = None  # thread, which would hide whether a held step waits for the flush
    kill_in_flush = int(sys.argv[2])  # -1: never; else die inside the flush transaction of that step
    wait = sys.argv[3] == "wait"  # acknowledge each step after its commit (else right after recording)
    conn = an.writer._conn
    calls = []
    slow_flush = int(sys.argv[5])  # -1: never; else the flush handed over at that step stalls 0.5 s

    def stall():
        if calls.append(1) is None and len(calls) == 1:
            import time
            time.sleep(0.5)
        return 0

    def inside_flush():  # called every 20 SQLite instructions of the step's flush, its only statements
        calls.append(1)
        if len(calls) == 3:  # some of the step's rows are inserted, the commit is not done
            os.kill(os.getpid(), signal.SIGKILL)
        return 0

    step = 0
    while True:
        if step == kill_in_flush:
            conn.set_progress_handler(inside_flush, 20)
        if step == slow_flush:
            conn.set_progress_handler(stall, 20)
        x = torch.randn(16, 8)
        loss = F.cross_entropy(an.forward_propagation(x), torch.randint(0, 4, (16,)))
        opt.zero_grad()
        an.backward_propagation(loss)  # records the step, its commit goes to the writer thread
        if wait:
            an.writer.wait()  # the commit of this step is done
        opt.step()
        print(step, flush=True)  # acknowledges the step (with wait: its commit)
        if sys.stdin.readline() != "go\\n":  # wait: the parent reads, then lets us go on or kills us
            break
        step += 1
    """
)


def _check_complete(run, n_params: int) -> list[int]:
    """The stored steps (0..n-1, each with all its gradient statistics and nothing of other steps)."""
    sc = run.scalars()
    grads = sc[sc.stat.isin(["mean", "mean_abs", "max_abs", "var", "l1", "l2"])]
    per_step = grads.groupby("step").size()
    assert (per_step == n_params * 6).all(), per_step[per_step != n_params * 6]
    steps = run.steps()["step"].tolist()
    assert steps == list(range(len(steps)))
    assert sorted(per_step.index) == steps and set(sc["step"]) <= set(steps)
    return steps


def _run_child(
    tmp_path,
    kill_in_flush: int,
    kill_after: int,
    wait: bool = True,
    flush_every: int = 1,
    slow_flush: int = -1,
):
    """Drive the child step by step; read the store while it waits; kill it while it waits after
    acknowledging step ``kill_after`` (or let it die inside a flush). Returns the acknowledged steps
    and the step counts the concurrent reader saw."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(tmp_path / "run"),
            str(kill_in_flush),
            "wait" if wait else "-",
            str(flush_every),
            str(slow_flush),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    acknowledged: list[int] = []
    seen: list[int] = []
    try:
        assert proc.stdin is not None and proc.stdout is not None
        while True:
            line = proc.stdout.readline()
            if not line:
                break  # the child died (inside its flush)
            acknowledged.append(int(line))
            if wait and acknowledged[-1] % 10 == 5:  # read while the child is alive, between two commits
                with open_run(tmp_path / "run") as run, run.snapshot():
                    seen.append(len(_check_complete(run, 4)))
                assert seen[-1] == len(acknowledged)
            if acknowledged[-1] == kill_after or acknowledged[-1] == kill_in_flush:
                proc.send_signal(signal.SIGKILL)  # it is blocked waiting: it committed exactly this
                break
            proc.stdin.write("go\n")
            proc.stdin.flush()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return acknowledged, seen


@pytest.mark.timeout(180)
def test_sigkill_keeps_exactly_the_acknowledged_steps_with_concurrent_reader(tmp_path):
    acknowledged, seen = _run_child(tmp_path, kill_in_flush=-1, kill_after=40)
    assert acknowledged == list(range(41))
    assert seen == [6, 16, 26, 36]
    with open_run(tmp_path / "run") as run:
        assert run.integrity_check() == "ok"
        assert _check_complete(run, 4) == acknowledged  # exactly what was acknowledged, no more, no less


@pytest.mark.timeout(180)
def test_sigkill_inside_a_flush_leaves_no_partial_step(tmp_path):
    acknowledged, _ = _run_child(tmp_path, kill_in_flush=12, kill_after=-1)
    assert acknowledged == list(range(12))  # died inside the flush of step 12
    with open_run(tmp_path / "run") as run:
        assert run.integrity_check() == "ok"
        assert _check_complete(run, 4) == acknowledged
        assert 12 not in set(run.scalars()["step"]) | set(run.steps()["step"])  # nothing of step 12


@pytest.mark.timeout(180)
def test_sigkill_with_the_commit_on_the_writer_thread_loses_at_most_flush_every_steps(tmp_path):
    # acknowledged right after recording: the commit of the last step may still be in flight, the
    # commit of every earlier one is done (the next step's first row waits for it)
    acknowledged, _ = _run_child(tmp_path, kill_in_flush=-1, kill_after=15, wait=False)
    assert acknowledged == list(range(16))
    with open_run(tmp_path / "run") as run:
        assert run.integrity_check() == "ok"
        assert _check_complete(run, 4) in (acknowledged, acknowledged[:-1])


@pytest.mark.timeout(180)
def test_sigkill_with_flush_every_3_loses_at_most_the_steps_since_the_last_flush(tmp_path):
    # steps 0-2, 3-5, ... are flushed together (their bookkeeping held until the flush); the flush
    # of steps 12-14 stalls, and step 15, the first one held after it, waits for it to commit
    acknowledged, _ = _run_child(
        tmp_path, kill_in_flush=-1, kill_after=16, wait=False, flush_every=3, slow_flush=14
    )
    assert acknowledged == list(range(17))
    with open_run(tmp_path / "run") as run:
        assert run.integrity_check() == "ok"
        assert _check_complete(run, 4) == list(range(15))


def test_blobs_and_arrays_round_trip(tmp_path) -> None:
    writer = RunWriter(tmp_path)
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    first = writer.add_array("features", "conv1", array, step=3, epoch=1, layer_id=0)
    second = writer.add_blob("image", "grid.png", b"\x89PNG...", meta={"mime": "image/png"})
    reader = open_run(tmp_path)  # visible at once: blobs are not buffered
    listing = reader.blobs()
    assert listing["blob_id"].tolist() == [first, second]
    assert listing.loc[0, "meta"] == {"shape": [2, 3, 4], "dtype": "float32"}
    assert (listing.loc[0, "step"], listing.loc[0, "epoch"], listing.loc[0, "layer_id"]) == (3, 1, 0)
    np.testing.assert_array_equal(reader.array(first), array)
    assert reader.blob(second) == b"\x89PNG..."
    assert reader.blobs(kind="image")["name"].tolist() == ["grid.png"]
    with pytest.raises(KeyError, match="no blob"):
        reader.blob(999)
    reader.close()
    writer.close()


def test_has_histograms_next_step_and_last_epoch_see_stored_and_buffered_rows(tmp_path) -> None:
    writer = RunWriter(tmp_path)
    assert (writer.has_histograms(), writer.next_step(), writer.last_epoch()) == (False, 0, None)
    sid = writer.series_id(0, "w")
    writer.add_step(0, 2, None)
    writer.add_histogram(0, 2, sid, "weight", 0.0, 1.0, np.array([1, 2]))
    assert (writer.has_histograms(), writer.next_step(), writer.last_epoch()) == (True, 1, 2)  # buffered
    writer.close()
    writer = RunWriter(tmp_path)
    assert (writer.has_histograms(), writer.next_step(), writer.last_epoch()) == (True, 1, 2)  # stored
    writer.close()


def test_next_step_and_last_epoch_take_the_monitors_meta_counters(tmp_path) -> None:
    """A monitor with ``every > 1`` notes the steps it ran past the last stored row; a value that is
    not an integer (a damaged store) is ignored, not raised."""
    from bbdecoder.store import vocabulary as V

    w = RunWriter(tmp_path)
    w.add_step(3, 1, 0.5)
    assert (w.next_step(), w.last_epoch()) == (4, 1)
    w.set_meta(V.META_NEXT_STEP, "9")
    w.set_meta(V.META_LAST_EPOCH, "2")
    assert (w.next_step(), w.last_epoch()) == (9, 2)  # buffered
    w.flush()
    assert (w.next_step(), w.last_epoch()) == (9, 2)  # stored
    w.set_meta(V.META_NEXT_STEP, "nine")
    w.set_meta(V.META_LAST_EPOCH, "")
    assert (w.next_step(), w.last_epoch()) == (4, 1)
    w.close()
