"""Token heat maps in the report: stored per run as arrays, drawn as coloured words.

:func:`store_token_maps` puts one set of sentences explained by several methods into the run store:
an array blob of kind :data:`TOKENS_KIND` holding the scores ``(methods, sentences, L)`` (zero after
each sentence's end), with the tokens, the method names, the row titles and a caption in its
``meta``. :func:`token_maps` is the report section that shows every such record as a table (one row
per sentence, one column per method, each cell a :func:`~bbdecoder.viz.tokens.tokens_html`
fragment: red pushes the explained score up, blue down, the strength relative to the cell's largest
``|score|``; hover a word for its score). Token text is HTML-escaped; nothing from the store is run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from bbdecoder.report import html
from bbdecoder.report.blobs import latest_records
from bbdecoder.report.html import Section
from bbdecoder.store.writer import RunWriter
from bbdecoder.viz.tokens import tokens_html

if TYPE_CHECKING:
    from bbdecoder.report.sections import ReportContext

TOKENS_KIND = "token_scores"
"""The blob kind of stored token maps."""


def _scores_row(scores: Any, index: int, length: int) -> np.ndarray:
    row = scores[index]
    row = row.detach().cpu().double().numpy() if isinstance(row, torch.Tensor) else np.asarray(row, float)
    row = np.ravel(row)
    if row.shape[0] < length:
        raise ValueError(f"sentence {index} has {length} tokens but its scores only {row.shape[0]}")
    return row[:length]


def store_token_maps(
    writer: RunWriter,
    name: str,
    tokens: Sequence[Sequence[str]],
    scores: Mapping[str, Any],
    *,
    titles: Sequence[str] | None = None,
    caption: str = "",
    merge: bool = True,
    section: str = "tokens",
) -> int:
    """Store token maps of ``len(tokens)`` sentences for the report; returns the blob id.

    Args:
        tokens: per sentence its token strings (padding left out).
        scores: method name -> signed per-token scores ``(sentences, >= len(tokens[i]))`` (a tensor
            or array, e.g. ``explainer.token_scores(...)``; entries past a sentence's end are ignored).
        titles: one label per sentence (default ``"sentence i"``).
        caption: shown above the table.
        merge: join sub-word pieces into words in the picture
            (:func:`~bbdecoder.viz.tokens.merge_subwords`).
        section: kept in ``meta["section"]`` (the report shows every :data:`TOKENS_KIND` record).
    """
    if not scores:
        raise ValueError("store_token_maps needs at least one method's scores")
    words = [[str(t) for t in sentence] for sentence in tokens]
    width = max((len(w) for w in words), default=0)
    array = np.zeros((len(scores), len(words), width))
    for m, values in enumerate(scores.values()):
        if len(values) != len(words):
            raise ValueError(
                f"scores of {list(scores)[m]!r} cover {len(values)} sentences, tokens {len(words)}"
            )
        for i, sentence in enumerate(words):
            array[m, i, : len(sentence)] = _scores_row(values, i, len(sentence))
    if titles is not None and len(titles) != len(words):
        raise ValueError(f"{len(titles)} titles for {len(words)} sentences")
    meta = {
        "section": section,
        "caption": caption,
        "methods": [str(k) for k in scores],
        "tokens": words,
        "titles": [str(t) for t in titles]
        if titles is not None
        else [f"sentence {i}" for i in range(len(words))],
        "merge": bool(merge),
    }
    return writer.add_array(TOKENS_KIND, name, array, meta=meta)


def token_table(array: np.ndarray, meta: Mapping[str, Any]) -> str:
    """The HTML table of one stored record (``array`` ``(methods, sentences, L)``)."""
    methods = [str(m) for m in meta.get("methods", [])]
    sentences = meta.get("tokens", [])
    titles = meta.get("titles", [])
    merge = bool(meta.get("merge", True))
    if array.ndim != 3 or array.shape[0] != len(methods) or array.shape[1] != len(sentences):
        raise ValueError(
            f"a token-map record of shape {array.shape} does not match its {len(methods)} methods and "
            f"{len(sentences)} sentences"
        )
    head = "".join(f"<th>{html.esc(m)}</th>" for m in ["sentence", *methods])
    rows = []
    for i, sentence in enumerate(sentences):
        words = [str(t) for t in sentence]
        title = html.esc(titles[i] if i < len(titles) else f"sentence {i}")
        cells = "".join(
            f"<td>{tokens_html(words, array[m, i, : len(words)], merge=merge)}</td>"
            for m in range(len(methods))
        )
        rows.append(f"<tr><td>{title}</td>{cells}</tr>")
    return (
        f'<table class="bbd-token-maps"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


def token_maps(ctx: ReportContext) -> Section | None:
    """Every stored token-map record (:func:`store_token_maps`), newest per name; ``None`` when none."""
    records = latest_records(ctx.reader, TOKENS_KIND)
    if records.empty:
        return None
    body = html.paragraph(
        "Per-token attributions (signed, summed over the embedding dimension): red words push the "
        "explained class score up, blue words push it down; colour strength is relative to the "
        "largest |score| in the cell. Hover a word for its score."
    )
    for record in records.itertuples():
        meta = record.meta
        if record.caption:
            body += html.paragraph(str(record.caption))
        body += token_table(ctx.reader.array(record.blob_id), meta)
    return Section("tokens", "Token attributions", body)


def token_records(reader: Any) -> pd.DataFrame:
    """The stored token-map records (latest per name), as :func:`~bbdecoder.report.blobs.latest_records`."""
    return latest_records(reader, TOKENS_KIND)


__all__ = ["TOKENS_KIND", "store_token_maps", "token_maps", "token_records", "token_table"]
