"""One writer per run store: a second one is refused at open time, naming the holder; a killed holder
leaves the store usable (issue 16, item 2)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from bbdecoder.monitor import Analyzer
from bbdecoder.store import RunWriter, StoreError, StoreLockedError, open_run
from tests.store_child import STORE_ONLY_PRELUDE

HOLDER = STORE_ONLY_PRELUDE + textwrap.dedent(
    """
    import sys
    from bbdecoder.store.writer import RunWriter
    writer = RunWriter(sys.argv[1])
    writer.add_step(0, 0, 1.5)
    writer.flush()
    print("holding", flush=True)
    sys.stdin.readline()  # hold the store until the parent says so (or kills us)
    writer.close()
    print("closed", flush=True)
    """
)


def _start_holder(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "run")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdout is not None and proc.stdout.readline() == "holding\n"
    return proc


@pytest.mark.timeout(120)
def test_second_process_is_refused_naming_the_holder_then_admitted_after_close(tmp_path) -> None:
    proc = _start_holder(tmp_path)
    try:
        with pytest.raises(StoreLockedError) as refused:
            RunWriter(tmp_path / "run")
        message = str(refused.value)
        assert f"pid {proc.pid}" in message and socket.gethostname() in message
        assert "since 20" in message and "holder.py" in message  # when, and which command
        assert "another save_path" in message and str(tmp_path / "run" / "run.sqlite") in message
        assert isinstance(refused.value, StoreError)
        with open_run(tmp_path / "run") as run:  # readers need no lock
            assert run.steps()["step"].tolist() == [0]
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "closed\n"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with RunWriter(tmp_path / "run") as writer:  # released by close
        assert writer.next_step() == 1


@pytest.mark.timeout(120)
def test_a_killed_holder_does_not_keep_the_store(tmp_path) -> None:
    proc = _start_holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    writer = RunWriter(tmp_path / "run")  # the OS released the dead process's lock
    assert writer.next_step() == 1
    writer.add_step(1, 0, None)
    writer.close()
    with open_run(tmp_path / "run") as run:
        assert run.steps()["step"].tolist() == [0, 1]


def test_second_writer_in_the_same_process_is_refused(tmp_path) -> None:
    first = RunWriter(tmp_path)
    with pytest.raises(StoreLockedError, match=rf"this process \(pid {os.getpid()}\).*\.close\(\)"):
        RunWriter(tmp_path)
    first.close()
    RunWriter(tmp_path).close()


def test_rerun_notebook_cell_refuses_the_new_analyzer_before_any_hook(tmp_path) -> None:
    """The notebook case: the old Analyzer was never closed (its attach hook still fires). Creating
    another one on the same save_path is refused in its constructor, and training goes on."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    old = Analyzer(model, tmp_path).attach(optimizer)
    hooks_before = [dict(p._post_accumulate_grad_hooks or {}) for p in model.parameters()]
    with pytest.raises(StoreLockedError, match="still open"):
        Analyzer(model, tmp_path).attach(optimizer)
    assert [dict(p._post_accumulate_grad_hooks or {}) for p in model.parameters()] == hooks_before
    for _ in range(3):  # on main this raised sqlite3.IntegrityError (UNIQUE constraint failed: steps.step)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 2, (5,))).backward()
        optimizer.step()
    old.close()
    with open_run(tmp_path) as run:
        assert run.steps()["step"].tolist() == [0, 1, 2]


def test_lock_file_lives_while_the_writer_is_open(tmp_path) -> None:
    writer = RunWriter(tmp_path)
    lock = tmp_path / "run.sqlite.lock"
    assert lock.exists() and f'"pid": {os.getpid()}' in lock.read_text()
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.sqlite"]


def test_a_forked_child_neither_writes_nor_keeps_the_store(tmp_path) -> None:
    writer = RunWriter(tmp_path)
    writer.add_step(0, 0, None)  # buffered in the parent, and in the child's copy of memory
    pid = os.fork()
    if pid == 0:  # the child (a DataLoader worker, say) drops its copy of the writer
        code = 0
        try:
            writer.close()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with pytest.raises(StoreLockedError):  # the parent still holds the store
        RunWriter(tmp_path)
    writer.close()
    with open_run(tmp_path) as run:
        assert run.steps()["step"].tolist() == [0]  # written once, by the parent
