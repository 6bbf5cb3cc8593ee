"""Token heat maps: one signed score per token as an HTML fragment or a matplotlib figure.

Scores are signed (``token_scores``): red pushes the target score up, blue pushes it down, the colour's
strength is ``|score| / max |score|`` (or ``/ max_abs``). Sub-word pieces are joined into words and
their scores summed (sums, because token scores add up: IG's completeness holds for the words too):

* WordPiece (BERT): a piece starting with ``##`` continues the previous word;
* byte-level BPE (GPT-2, RoBERTa) and SentencePiece (T5, Llama): when any token starts with ``Ġ`` or
  ``▁`` (the start-of-word markers), a token without the marker continues the previous word and the
  marker is shown as a space; ``Ċ`` is a newline.

Special tokens (``[CLS]``, ``<s>``, ``<|endoftext|>``, ...) stay words of their own.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

_SPECIAL = re.compile(r"^(\[[A-Za-z_]+\]|<[^<>\s]+>|<\|[^|]+\|>)$")
_WORD_STARTS = ("Ġ", "▁")


def _as_scores(scores: Any, count: int) -> np.ndarray:
    array = (
        scores.detach().cpu().double().numpy()
        if isinstance(scores, torch.Tensor)
        else np.asarray(scores, float)
    )
    array = np.squeeze(array)
    if array.ndim != 1 or array.shape[0] != count:
        raise ValueError(
            f"need one score per token: {count} tokens but scores of shape {np.shape(scores)}; pass one "
            "sample's row, e.g. token_scores(...)[0]"
        )
    return array


def merge_subwords(tokens: Sequence[str], scores: Any) -> tuple[list[str], list[float]]:
    """Join sub-word pieces into words and sum their scores; see the module docstring for the rules.

    Returns:
        ``(words, word_scores)``: display strings (a leading space where the word starts with one) and
        one summed score per word.
    """
    values = _as_scores(scores, len(tokens))
    marked = any(str(t).startswith(_WORD_STARTS) for t in tokens)
    words: list[str] = []
    sums: list[float] = []
    previous_special = True
    for token, value in zip(tokens, values, strict=True):
        text = str(token)
        special = bool(_SPECIAL.match(text))
        if special or not words or previous_special:
            continues = False
        elif text.startswith("##"):
            continues = True
        else:
            continues = marked and not text.startswith(_WORD_STARTS)
        shown = text[2:] if text.startswith("##") and not special else text
        if marked and not special:
            shown = shown.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n")
        if continues:
            words[-1] += shown
            sums[-1] += float(value)
        else:
            words.append(shown)
            sums.append(float(value))
        previous_special = special
    return words, sums


def _colour(value: float, scale: float) -> tuple[int, int, int, float]:
    strength = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    red, blue = (214, 39, 40), (31, 119, 180)
    rgb = red if value >= 0 else blue
    return (*rgb, round(strength, 3))


def tokens_html(
    tokens: Sequence[str], scores: Any, *, merge: bool = True, max_abs: float | None = None
) -> str:
    """A self-contained HTML fragment (inline styles, no scripts) colouring each word by its score.

    Args:
        tokens: the token strings, e.g. ``tokenizer.convert_ids_to_tokens(ids)``.
        scores: one signed score per token ``(L,)`` (a tensor, array or list).
        merge: join sub-word pieces into words (scores summed), see :func:`merge_subwords`.
        max_abs: the score of full colour; default the largest ``|score|`` shown.

    Returns:
        ``<div class="bbd-tokens">...</div>``: one ``<span>`` per word with its score in ``title``;
        every token's text is HTML-escaped.
    """
    if merge:
        words, values = merge_subwords(tokens, scores)
    else:
        words, values = [str(t) for t in tokens], [float(v) for v in _as_scores(scores, len(tokens))]
    scale = float(max_abs) if max_abs is not None else max((abs(v) for v in values), default=0.0)
    spans = []
    for word, value in zip(words, values, strict=True):
        r, g, b, a = _colour(value, scale)
        lead = " " if word.startswith(" ") else ""
        text = html.escape(word.lstrip(" ")).replace("\n", "<br>")
        spans.append(
            f'{lead}<span style="background:rgba({r},{g},{b},{a});padding:1px 2px;border-radius:3px" '
            f'title="{value:+.4g}">{text}</span>'
        )
    body = "".join(spans) if any(w.startswith(" ") for w in words) else " ".join(spans)
    return (
        '<div class="bbd-tokens" style="font-family:monospace;line-height:1.9;white-space:normal">'
        f"{body}</div>"
    )


def token_figure(
    tokens: Sequence[str],
    scores: Any,
    *,
    merge: bool = True,
    max_abs: float | None = None,
    per_row: int = 10,
    title: str | None = None,
) -> Figure:
    """A matplotlib figure of the words in rows of ``per_row`` cells, each coloured by its score.

    Colours as in :func:`tokens_html` (``RdBu_r``, symmetric around zero), with a colour bar. Returns
    the :class:`~matplotlib.figure.Figure` (Agg; save it with ``fig.savefig``).
    """
    if merge:
        words, values = merge_subwords(tokens, scores)
    else:
        words, values = [str(t) for t in tokens], [float(v) for v in _as_scores(scores, len(tokens))]
    if per_row < 1:
        raise ValueError(f"per_row must be >= 1, got {per_row}")
    scale = float(max_abs) if max_abs is not None else max((abs(v) for v in values), default=0.0)
    scale = scale if scale > 0 else 1.0
    rows = max(1, -(-len(words) // per_row))
    grid = np.full((rows, per_row), np.nan)
    for index, value in enumerate(values):
        grid[index // per_row, index % per_row] = value
    fig = Figure(figsize=(1.1 * per_row + 1.2, 0.55 * rows + 0.8))
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
    for index, word in enumerate(words):
        shown = word.strip().replace("\n", "\\n") or "·"
        ax.text(index % per_row, index // per_row, shown, ha="center", va="center", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.03, pad=0.02, label="score")
    fig.tight_layout()
    return fig
