"""Steps held for a later flush (``flush_every`` > 1): a read of the store on the training thread
commits them first, ``writer.wait()`` commits them, a read from another thread sees what was
flushed."""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder import Analyzer, open_run


def _steps(analyzer: Analyzer, model: nn.Module, opt: torch.optim.Optimizer, n: int) -> None:
    for _ in range(n):
        loss = F.cross_entropy(model(torch.randn(4, 3)), torch.randint(0, 2, (4,)))
        opt.zero_grad()
        loss.backward()
        analyzer.step(loss=loss)
        opt.step()


def test_a_read_on_the_training_thread_sees_the_held_steps(tmp_path) -> None:
    """With ``flush_every=8`` steps 1-4 are held; ``open_run`` on the training thread (figures
    drawn during training) commits them first; a read from another thread sees what was flushed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Analyzer(model, tmp_path, alerts=False, flush_every=8) as analyzer:
        _steps(analyzer, model, opt, 1)
        analyzer.writer.wait()  # step 0 committed
        _steps(analyzer, model, opt, 4)
        assert analyzer.writer._held  # steps 1-4 wait for the flush
        seen: list[list[int]] = []
        reader = threading.Thread(target=lambda: seen.append(open_run(tmp_path).steps()["step"].tolist()))
        reader.start()
        reader.join()
        assert seen == [[0]]  # another thread does not hand over the training thread's jobs
        assert open_run(tmp_path).steps()["step"].tolist() == [0, 1, 2, 3, 4]
        assert not analyzer.writer._held
        scalars = open_run(tmp_path).scalars()
        assert sorted(set(scalars[scalars.stat == "l2"].step)) == [0, 1, 2, 3, 4]


def test_wait_commits_the_held_steps(tmp_path) -> None:
    """``writer.wait()`` ran the held steps' bookkeeping without a flush: another process (a reader
    on another thread here) did not see them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Analyzer(model, tmp_path, alerts=False, flush_every=8) as analyzer:
        _steps(analyzer, model, opt, 3)
        assert analyzer.writer._held
        analyzer.writer.wait()
        seen: list[list[int]] = []
        reader = threading.Thread(target=lambda: seen.append(open_run(tmp_path).steps()["step"].tolist()))
        reader.start()
        reader.join()
        assert seen == [[0, 1, 2]]
