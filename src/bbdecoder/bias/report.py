"""Plain-text tables (Markdown) for bias and metric results, with no extra dependency."""

from __future__ import annotations

import math

import pandas as pd


def format_table(table: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A GitHub-flavoured Markdown table of ``table``; floats formatted with ``floatfmt``, NaN as ``nan``."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else format(value, floatfmt)
        return str(value)

    header = "| " + " | ".join(str(c) for c in table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([header, rule, *body])
