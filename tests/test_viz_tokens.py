"""Token heat maps: sub-word joining, signed colours, escaping, the matplotlib figure."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bbdecoder.viz.tokens import merge_subwords, token_figure, tokens_html


def test_wordpiece_pieces_are_joined_and_their_scores_summed() -> None:
    words, scores = merge_subwords(["[CLS]", "play", "##ing", "fast", "[SEP]"], [1.0, 2.0, 3.0, 4.0, 5.0])
    assert words == ["[CLS]", "playing", "fast", "[SEP]"]
    assert scores == [1.0, 5.0, 4.0, 5.0]
    # A continuation right after a special token does not join it.
    words, _ = merge_subwords(["[CLS]", "##x"], [0.0, 1.0])
    assert words == ["[CLS]", "x"]


@pytest.mark.parametrize("marker", ["Ġ", "▁"])
def test_word_start_markers_byte_bpe_and_sentencepiece(marker: str) -> None:
    tokens = ["The", f"{marker}cat", "s", f"{marker}sat", "<|endoftext|>"]
    words, scores = merge_subwords(tokens, torch.tensor([0.5, 1.0, -0.25, 2.0, 3.0]))
    assert words == ["The", " cats", " sat", "<|endoftext|>"]
    assert scores == [0.5, 0.75, 2.0, 3.0]


def test_html_is_escaped_signed_and_self_contained() -> None:
    fragment = tokens_html(["<script>", "a&b", "neg", "zero"], [2.0, 1.0, -2.0, 0.0], merge=False)
    assert "<script>" not in fragment and "&lt;script&gt;" in fragment and "a&amp;b" in fragment
    colours = re.findall(r"rgba\((\d+),(\d+),(\d+),([\d.]+)\)", fragment)
    assert colours[0] == ("214", "39", "40", "1.0")  # the largest positive score: full red
    assert colours[1] == ("214", "39", "40", "0.5")
    assert colours[2] == ("31", "119", "180", "1.0")  # negative: blue
    assert colours[3][3] == "0.0"
    assert fragment.startswith('<div class="bbd-tokens"') and "<style" not in fragment
    assert 'title="-2"' in fragment
    with pytest.raises(ValueError, match="one score per token"):
        tokens_html(["a", "b"], [1.0])


def test_figure_has_one_cell_per_word(tmp_path: Path) -> None:
    fig = token_figure(["[CLS]", "play", "##ing", "well", "[SEP]"], [0.1, -0.3, 0.2, 0.4, 0.0], per_row=3)
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["[CLS]", "playing", "well", "[SEP]"]
    fig.savefig(tmp_path / "tokens.png")
    assert (tmp_path / "tokens.png").stat().st_size > 0
