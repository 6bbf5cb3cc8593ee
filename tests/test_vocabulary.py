"""The stored names live in one module, bbdecoder.store.vocabulary: every name a run stores (both
monitors, alerts, per-sample statistics) is in it, the writers pass no name of their own, and the
reader's filters find the rows by those names."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import bbdecoder
from bbdecoder.monitor import Analyzer
from bbdecoder.store import open_run
from bbdecoder.store import vocabulary as V

SRC = Path(bbdecoder.__file__).parent


def _vocabulary_strings() -> set[str]:
    names: set[str] = set(V.weight_stat_names())
    for value in vars(V).values():
        if isinstance(value, str):
            names.add(value)
        elif isinstance(value, tuple):
            names.update(v for v in value if isinstance(v, str))
    return names


def _run(path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].bias[2] = -50.0  # a dead unit: a dead_units event
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with Analyzer(model, path, activations=True, per_sample=True) as analyzer:
        analyzer.attach(optimizer)
        for i in range(3):
            x = torch.randn(8, 4)
            loss = F.mse_loss(model(x), torch.zeros(8, 2))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            analyzer.log(accuracy=0.5 + i / 10)
        analyzer.log(epoch=0, val_loss=1.0)
        analyzer.end_epoch()
        analyzer.function_graph(torch.randn(1, 4))


def test_every_stored_name_is_in_the_vocabulary(tmp_path: Path) -> None:
    _run(tmp_path)
    reader = open_run(tmp_path)
    known = _vocabulary_strings()
    scalars = reader.scalars()
    user = scalars.param.isin([V.USER_PARAM, V.OPTIMIZER_PARAM])  # the user's own names and lr
    assert set(scalars[~user].stat) <= known, set(scalars[~user].stat) - known
    epochs = reader.epoch_scalars()
    assert set(epochs["agg"]) <= {V.AGG_MEAN, V.AGG_VAR, V.AGG_VALUE}
    assert set(epochs[epochs.param != V.USER_PARAM].stat) <= known
    assert set(reader.events().kind) <= known and V.DEAD_UNITS in set(reader.events().kind)
    assert set(reader.histograms().kind) == {V.WEIGHT_HISTOGRAM}
    assert {V.META_MODEL, V.META_COVERAGE} <= set(reader.meta())
    for name in (V.GRAPH_TEXT, V.GRAPH_DOT, V.PARAMETERS_ARTIFACT):
        assert reader.artifact(name)
    # the reader's filters are the vocabulary's
    grads = reader.gradient_scalars()
    assert set(grads.stat) == set(V.GRAD_STATS) and (grads.param != V.ACTIVATION_PARAM).all()
    assert len(grads) == 3 * 4 * len(V.GRAD_STATS)  # 3 steps, 4 tensors
    assert reader.weight_histograms().equals(reader.histograms(kind=V.WEIGHT_HISTOGRAM))
    assert not reader.weight_histograms().empty
    activation = scalars[scalars.param == V.ACTIVATION_PARAM]
    assert set(activation.stat) == set(V.ACTIVATION_STATS)


WRITER_SOURCES = [
    *sorted((SRC / "monitor").glob("*.py")),
    *sorted((SRC / "keras").glob("monitor*.py")),
    *sorted((SRC / "integrations").glob("*.py")),
    *sorted((SRC / "alerts").glob("*.py")),
    *sorted((SRC / "report").glob("section*.py")),
    SRC / "report" / "blobs.py",
    SRC / "viz" / "monitor_plots.py",
]
_LITERAL = r"""(?<![fFrRbB\w])["'][^"']*["']"""
_CALLS = re.compile(
    r"\.(stat_id|add_event|add_blob|add_array|add_histogram)\(([^()]*(?:\([^()]*\)[^()]*)*)\)", re.S
)
_FILTER = re.compile(r"\.(blobs|histograms|events)\(\s*kind=\s*" + _LITERAL)


def test_writers_and_readers_pass_no_stored_name_of_their_own() -> None:
    """Stat names, event kinds, histogram and blob kinds are passed as vocabulary names, never as
    string literals, by everything that writes or filters the store."""
    offences = []
    for path in WRITER_SOURCES:
        text = path.read_text()
        for match in _CALLS.finditer(text):
            method, args = match.groups()
            first = args.split(",")[0] if method != "add_histogram" else ",".join(args.split(",")[3:4])
            if re.search(_LITERAL, first) and "SummaryWriter" not in text:
                offences.append(f"{path.name}: .{method}({args.strip()[:60]})")
        offences += [f"{path.name}: {m.group(0)}" for m in _FILTER.finditer(text)]
    assert not offences, offences


def test_the_vocabulary_module_imports_nothing_of_the_package() -> None:
    source = (SRC / "store" / "vocabulary.py").read_text()
    assert not re.search(r"^\s*(from|import) bbdecoder", source, re.M)
    assert V.weight_stat_names((0.5,)) == [V.WEIGHT_MEAN, V.WEIGHT_STD, V.WEIGHT_L2, "weight_q50"]
