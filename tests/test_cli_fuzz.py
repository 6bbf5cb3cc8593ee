"""Fuzz the CLI: random argument combinations of every subcommand never end in a Python traceback,
always exit with a documented code, print errors as ``bbdecoder <cmd>: error: ...``, and never run
the payload of a malicious model file without ``--trust-pickle`` (issue 16).

Deterministic (``derandomize=True``, no example database) and bounded (a few hundred examples on
an 8x8 model, a tiny image and a tiny store). ``export --tensorboard`` is left out: importing
TensorBoard's writer takes seconds.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import sqlite3
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bbdecoder.cli import EXIT_CODES, METHODS, main
from bbdecoder.demo.digits import DigitsCNN
from bbdecoder.store import RunWriter

ROOT: Path | None = None
FUZZ = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _png_header(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module", autouse=True)
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every file the strategies name, made once."""
    global ROOT
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    model = DigitsCNN().eval()
    torch.save(model.state_dict(), root / "weights.pt")
    torch.save(model, root / "whole.pt")
    torch.jit.save(torch.jit.script(model), root / "scripted.pt")
    torch.save({"fc.weight": torch.zeros(1), "fc.bias": Payload(root / "marker")}, root / "evil.pt")
    (root / "junk.pt").write_text("not a model")
    (root / "folder").mkdir()
    (root / "folder.npy").mkdir()
    (root / "file").write_text("x")
    pixels = (np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(root / "digit.png")
    Image.fromarray(np.stack([pixels] * 3, axis=2)).save(root / "rgb.png")
    _png_header(root / "bomb.png", 100_000, 100_000)
    writer = RunWriter(root / "run")
    writer.set_layers([(0, "fc", "Linear", 42, None)])
    writer.close()
    (root / "empty_run").mkdir()
    (root / "junk_run").mkdir()
    (root / "junk_run" / "run.sqlite").write_text("junk junk junk")
    shutil.copytree(root / "run", root / "damaged_run")
    with sqlite3.connect(root / "damaged_run" / "run.sqlite") as db:
        db.execute("DROP TABLE scalars")
    ROOT = root
    return root


def option(
    flag: str, good: list[str], bad: Sequence[str] = (), absent: int = 3, broken: bool | None = None
) -> st.SearchStrategy[list[str]]:
    """``[]`` or ``[flag, good value]`` (``absent`` : 3), or ``[flag, bad value]``: always when
    ``broken``, never when ``broken`` is False, now and then when it is None."""
    if broken:
        return st.sampled_from(list(bad)).map(lambda v: [flag, v])
    kinds = ["absent"] * absent + ["good"] * (3 if good else 0) + (["bad"] if bad and broken is None else [])

    def pick(kind: str) -> st.SearchStrategy[list[str]]:
        if kind == "absent":
            return st.just([])
        return st.sampled_from(list(good if kind == "good" else bad)).map(lambda v: [flag, v])

    return st.sampled_from(kinds).flatmap(pick)


def flag(name: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[], [name]])


def at(*names: str) -> list[str]:
    """Paths in the fixture folder, written ``@name`` until :func:`check` knows the folder."""
    return [f"@{name}" for name in names]


def model_args(broken: bool | None = None) -> st.SearchStrategy[list[str]]:
    """``--model`` and its companions: mostly the state_dict with its class; bad ones include a whole
    pickle without the flag, a malicious pickle (with and without it), junk, a missing file."""
    weights = ["--model", "@weights.pt", "--model-class"]
    good = st.sampled_from(
        [[*weights, DIGITS]] * 4
        + [
            [*weights, DIGITS, "--model-kwargs", "{}"],
            ["--model", "@scripted.pt"],
            ["--model", "@whole.pt", "--trust-pickle"],
        ]
    )
    bad = st.sampled_from(
        [[*weights, "nomodule"], [*weights, "x:Y"], [*weights, "bbdecoder.demo.digits:No"]]
        + [[*weights, DIGITS, "--model-kwargs", k] for k in ('{"width": 8}', "[1]", "{bad", "null")]
        + [
            ["--model", f"@{name}"]
            for name in ("weights.pt", "whole.pt", "evil.pt", "junk.pt", "missing.pt", "folder")
        ]
        + [["--model", "@evil.pt", "--model-class", DIGITS], ["--model", "@evil.pt", "--trust-pickle"]]
    )
    if broken is None:
        return st.one_of(good, good, bad)
    return bad if broken else good


DIGITS = "bbdecoder.demo.digits:DigitsCNN"
NOISE = st.sampled_from([[]] * 12 + [["--bogus"], ["--help"], ["-x", "1"]])


def explain_options(broken: int | None) -> st.SearchStrategy[list[str]]:
    """Every explain option; option number ``broken`` gets a bad value, the others good ones (or,
    with ``broken=None``, each may be bad)."""

    def b(k: int) -> bool | None:
        return None if broken is None else broken == k

    def method_and_layer(bad: bool | None) -> st.SearchStrategy[list[str]]:
        gradcam = st.tuples(
            st.just(["--method", "gradcam"]),
            option(
                "--layer", ["0", "2", "conv1", "conv3", "bn1", "fc"], ["999", "nope", "*", "conv*"], 2, bad
            ),
        )
        others = st.tuples(option("--method", list(METHODS), absent=1, broken=False), st.just([]))
        wrong = st.tuples(
            st.sampled_from([["--method", "lime"], ["--method", "ig"]]), st.just(["--layer", "0"])
        )
        if bad:
            return st.one_of(wrong, gradcam).map(lambda t: [*t[0], *t[1]])
        return st.one_of(others, gradcam).map(lambda t: [*t[0], *t[1]])

    parts = [
        model_args(b(0)),
        option("--image", at("digit.png", "rgb.png"), at("junk.pt", "folder", "bomb.png"), 0, b(1)),
        method_and_layer(b(2)),
        option("--target", ["0", "3", "9"], ["x", "-1", "10", "999"], broken=b(3)),
        option("--channels", ["1"], ["3", "2", "0"], 0, b(4)),
        option("--size", ["8,8", "4,4", "16,16"], ["0,8", "8", "a,b", "99999,99999", "-8,8"], 6, b(5)),
        option("--scale", ["255", "1", "1e-3"], ["0", "-1", "nan", "inf", "x"], 6, b(6)),
        option("--mean", ["0.5", "0.1"], ["0.1,0.2", "0.1,0.2,0.3", "nan", "a", ""], 6, b(7)),
        option("--std", ["0.25", "2"], ["0", "1,1", "-1", "inf"], 6, b(8)),
        option("--steps", ["1", "2", "3"], ["0", "-3", "10001", "x", "2.5"], 1, b(9)),
        option("--samples", ["1", "2", "3"], ["0", "-3", "10001", "x"], 1, b(10)),
        option("--out", at("out.png", "new/o.png", "out.jpg"), at("folder", "o.xyz", "file/o"), 0, b(11)),
        option("--save-map", at("m.npy", "missing_dir/m.npy"), at("folder.npy", "file/m.npy"), broken=b(12)),
        option("--output-key", [], ["logits", "0", "x"], 9, b(13)),  # the model returns one tensor
        st.sampled_from([["--bogus"], ["--help"], ["-x", "1"]]) if broken == 14 else st.just([]),
    ]  # fmt: skip
    return st.tuples(*parts).map(lambda groups: ["explain", *[a for g in groups for a in g]])


EXPLAIN_OPTIONS = 15


def explain_argv() -> st.SearchStrategy[list[str]]:
    """One bad option among good ones, or (about half the examples) none, so that many run an explainer."""
    return st.integers(-EXPLAIN_OPTIONS, EXPLAIN_OPTIONS - 1).flatmap(
        lambda k: explain_options(k if k >= 0 else -1)
    )


def explain_anything() -> st.SearchStrategy[list[str]]:
    """Any mix of good and bad values."""
    return explain_options(None)


def layers_argv() -> st.SearchStrategy[list[str]]:
    sizes = option(
        "--input-size", ["1,1,8,8", "2,1,8,8"], ["1,3,8,8", "x", "0", "5", "1,1,99999,99999", "1,1,8,8,8"]
    )
    return st.tuples(model_args(), sizes, NOISE).map(lambda g: ["layers", *g[0], *g[1], *g[2]])


def runs() -> st.SearchStrategy[str]:
    return st.sampled_from(
        at("run", "run", "run", "missing_run", "empty_run", "junk_run", "damaged_run", "file")
    )


def report_argv() -> st.SearchStrategy[list[str]]:
    outs = option("--out", at("r.html", "new/r.html"), at("folder", "file/r.html"))
    return st.tuples(runs(), outs, NOISE).map(lambda g: ["report", g[0], *g[1], *g[2]])


def export_argv() -> st.SearchStrategy[list[str]]:
    where = st.sampled_from(at("csv_out", "csv_out", "new/deep", "folder", "file"))
    target = st.tuples(st.sampled_from(["--csv", "--parquet"]), where).map(list)
    return st.tuples(runs(), st.sampled_from([False, True, True, True]), target, NOISE).map(
        lambda g: ["export", g[0], *(g[2] if g[1] else []), *g[3]]
    )


def demo_argv() -> st.SearchStrategy[list[str]]:
    """Demo arguments with a bad value last (it wins over the good one; a valid set would train)."""
    bad = st.sampled_from([["--epochs", "0"], ["--epochs", "-1"], ["--epochs", "x"], ["--images", "0"],
                           ["--images", "1000"], ["--out", "FILE"], ["--out", "FILE/sub"],
                           ["--bogus"]])  # fmt: skip
    good = option("--epochs", ["1", "2"])
    return st.tuples(good, flag("--quick"), flag("--no-progress"), bad).map(
        lambda g: ["demo", *g[0], *g[1], *g[2], *[a.replace("FILE", "@file", 1) for a in g[3]]]
    )


CODES: dict[str, list[int]] = {}


def check(argv: list[str]) -> None:
    assert ROOT is not None
    argv = [str(ROOT / a[1:]) if a.startswith("@") else a for a in argv]
    marker = ROOT / "marker"
    marker.unlink(missing_ok=True)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: --help (0) and its own usage errors (2)
            code = exit_.code if isinstance(exit_.code, int) else 2
            assert code in (0, 2), (argv, code)
    text = err.getvalue()
    CODES.setdefault(argv[0], []).append(code)
    assert code in EXIT_CODES, (argv, code, text)
    assert "Traceback" not in text, (argv, text)
    if code != 0:
        lines = [line for line in text.splitlines() if line.strip()]
        assert lines and lines[-1].startswith(f"bbdecoder {argv[0]}: error: "), (argv, text)
        assert len(lines) == 1 or lines[0].startswith("usage: "), (argv, text)
    if "--trust-pickle" not in argv:
        assert not marker.exists(), ("the payload ran", argv)
    for name in ("out.png", "out.jpg", "m.npy", "r.html", "csv_out", "new", "missing_dir"):
        target = ROOT / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def test_fuzz_explain() -> None:
    CODES["explain"] = []

    @settings(FUZZ, max_examples=150)
    @given(explain_argv())
    def fuzz(argv: list[str]) -> None:
        check(argv)

    fuzz()
    # Not degenerate: many examples ran an explainer to the end, many hit a check.
    assert CODES["explain"].count(0) >= 40 and CODES["explain"].count(2) >= 40, CODES["explain"]


@settings(FUZZ, max_examples=60)
@given(explain_anything())
def test_fuzz_explain_any_mix(argv: list[str]) -> None:
    check(argv)


@settings(FUZZ, max_examples=60)
@given(layers_argv())
def test_fuzz_layers(argv: list[str]) -> None:
    check(argv)


@settings(FUZZ, max_examples=30)
@given(report_argv())
def test_fuzz_report(argv: list[str]) -> None:
    check(argv)


@settings(FUZZ, max_examples=30)
@given(export_argv())
def test_fuzz_export(argv: list[str]) -> None:
    check(argv)


@settings(FUZZ, max_examples=20)
@given(demo_argv())
def test_fuzz_demo_refuses_bad_values_fast(argv: list[str]) -> None:
    check(argv)


def test_the_documented_codes_are_the_table() -> None:
    table = (Path(__file__).parents[1] / "docs" / "cli_and_report.md").read_text()
    section = table[table.index("## Exit codes") :]
    documented = {int(row.split("|")[1]) for row in section.splitlines() if row.startswith("| ") and
                  row.split("|")[1].strip().isdigit()}  # fmt: skip
    assert documented == set(EXIT_CODES)
