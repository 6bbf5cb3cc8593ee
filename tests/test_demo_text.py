"""The text demo: the planted-keyword check (issue 12), the generated task, and `bbdecoder demo --text`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bbdecoder import InputXGradient, IntegratedGradients
from bbdecoder.cli import main
from bbdecoder.demo.text import (
    KEYWORD_IDS,
    MAX_LENGTH,
    MIN_LENGTH,
    PAD_ID,
    VOCAB,
    make_text_data,
    shuffled_copy,
    text_accuracy,
    train_text_transformer,
)
from bbdecoder.demo.text_run import TextSettings, chance_rate, top_token_hits
from bbdecoder.hooks import count_hooks
from bbdecoder.report.section_tokens import TOKENS_KIND
from bbdecoder.store import open_run

N_SHUFFLED = 8
MARGIN = 0.15


@pytest.fixture(scope="module")
def trained() -> torch.nn.Module:
    torch.manual_seed(0)
    return train_text_transformer(make_text_data(1000, seed=0), epochs=4, seed=0)


@pytest.fixture(scope="module")
def test_set():
    return make_text_data(200, seed=10_000)


def test_the_generated_task_has_exactly_one_keyword_that_decides_the_label() -> None:
    data = make_text_data(300, seed=4)
    ids, mask = data.input_ids, data.attention_mask
    assert ids.shape == (300, MAX_LENGTH)
    lengths = mask.sum(1)
    assert int(lengths.min()) >= MIN_LENGTH and int(lengths.max()) <= MAX_LENGTH
    assert bool((ids[mask == 0] == PAD_ID).all()) and bool((ids[mask == 1] != PAD_ID).all())
    is_keyword = (ids == KEYWORD_IDS[0]) | (ids == KEYWORD_IDS[1])
    assert torch.equal(is_keyword.sum(1), torch.ones(300, dtype=torch.long))
    rows = torch.arange(300)
    assert torch.equal(ids[rows, data.keyword_at], torch.tensor(KEYWORD_IDS)[data.labels])
    assert torch.equal(make_text_data(300, seed=4).input_ids, ids)  # seeded
    assert data.tokens(0)[int(data.keyword_at[0])] == VOCAB[KEYWORD_IDS[int(data.labels[0])]]


def _hit_rates(model: torch.nn.Module, data) -> dict[str, float]:
    batch, labels = data.batch(), data.labels
    ig = IntegratedGradients(model).token_scores(
        batch, labels, baseline="pad", pad_token_id=PAD_ID, n_steps=16
    )
    ixg = InputXGradient(model).token_scores(batch, labels)
    return {name: float(top_token_hits(s, data).double().mean()) for name, s in (("ig", ig), ("ixg", ixg))}


def test_the_top_attributed_token_is_the_planted_keyword_and_not_for_shuffled_weights(
    trained: torch.nn.Module, test_set
) -> None:
    assert text_accuracy(trained, test_set) == 1.0
    trained_rates = _hit_rates(trained, test_set)
    # Chance: a random token per sentence hits the keyword with probability 1 / length; lengths are
    # uniform in 5..12, so about 0.12 here.
    chance = chance_rate(test_set)
    assert 0.10 < chance < 0.15
    assert trained_rates["ig"] >= 0.9 and trained_rates["ixg"] >= 0.9, trained_rates
    # A shuffled copy keeps the weights' values but not their structure: one copy's explanations
    # pick some token type systematically (its rate can be anywhere from 0 to ~0.5), so the mean over
    # 8 copies (fixed seeds) is compared with chance.
    controls = [_hit_rates(shuffled_copy(trained, seed=k), test_set) for k in range(N_SHUFFLED)]
    for method in ("ig", "ixg"):
        mean = sum(c[method] for c in controls) / N_SHUFFLED
        assert mean < chance + MARGIN, (method, mean, chance)
        assert trained_rates[method] - mean > 0.6
    assert count_hooks(trained) == 0


def test_the_shuffled_copy_leaves_the_model_alone(trained: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    control = shuffled_copy(trained, seed=3)
    for key, value in trained.state_dict().items():
        assert torch.equal(value, before[key])
        shuffled = control.state_dict()[key]
        assert torch.equal(shuffled.flatten().sort().values, value.flatten().sort().values)
    assert not torch.equal(control.state_dict()["embed.weight"], before["embed.weight"])


def test_demo_text_cli_writes_the_run_the_checks_and_the_token_maps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "text"
    assert main(["demo", "--text", "--quick", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "text_integrated_gradients_keyword_hit_rate" in printed
    written = ("run.sqlite", "report.html", "summary.json", "text/keyword_check.csv", "text/token_scores.csv")
    for name in (*written, "text_transformer_state_dict.pt"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["text_test_accuracy"] == 1.0
    assert summary["text_explanations_find_keyword"] == 1.0
    assert summary["text_integrated_gradients_keyword_hit_rate"] >= 0.9
    run = open_run(out)
    steps = run.steps()
    quick = TextSettings.quick()
    assert len(steps) == quick.epochs * -(-quick.n_train // quick.batch_size)
    assert steps["loss"].notna().all()
    for stat in ("act_rms", "act_kurtosis", "attn_entropy", "logit_max"):
        assert not run.scalars(stat).empty, stat
    heads = set(run.scalars("attn_entropy").param)
    assert heads == {f"encoder.layers.{i}.self_attn.head{h}" for i in range(2) for h in range(2)}
    records = run.blobs(kind=TOKENS_KIND)
    assert len(records) == 1
    meta = records.iloc[0].meta
    scores = run.array(int(records.iloc[0].blob_id))
    assert meta["methods"] == ["Integrated Gradients", "Input x Gradient"]
    assert scores.shape[:2] == (2, 4)
    run.close()
    page = (out / "report.html").read_text()
    assert "Token attributions" in page and "Transformer probes" in page and "planted-keyword task (" in page
    assert page.count('class="bbd-tokens"') == 2 * 4


def test_demo_text_refuses_the_image_demo_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--text", "--no-shapes", "--out", str(tmp_path / "x")]) == 2
    assert "--no-shapes applies to the image demo" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_demo_text_refuses_bad_values_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("x")
    for extra, code, message in (
        (["--epochs", "0"], 2, "--epochs must be between 1 and 1000, got 0"),
        (["--images", "101"], 2, "--images must be between 1 and 100, got 101"),
        (["--out", str(tmp_path / "file")], 2, "is a file; pass a folder"),
        (["--out", str(tmp_path / "file" / "sub")], 7, "cannot write the demo into"),
    ):
        assert main(["demo", "--text", "--quick", "--no-progress", *extra]) == code, extra
        assert message in capsys.readouterr().err, extra
