"""Chart specs: min/max downsampling keeps every series' extremes and their order, against a
brute-force loop; specs are strict JSON (no NaN tokens) and carry layer, parameter and stat."""

from __future__ import annotations

import json
import math

import numpy as np

from bbdecoder.report.charts import StatMatrix, downsample_minmax, line_chart, to_json


def brute_force(x: np.ndarray, values: np.ndarray, max_points: int) -> tuple[list, list[list[float]]]:
    buckets = max_points // 2
    edges = np.linspace(0, len(x), buckets + 1).astype(int)
    xs, columns = [], [[] for _ in range(values.shape[1])]
    for b in range(buckets):
        lo, hi = edges[b], edges[b + 1]
        xs += [x[lo], x[hi - 1]]
        for s in range(values.shape[1]):
            chunk = [(i, values[i, s]) for i in range(lo, hi) if not math.isnan(values[i, s])]
            if not chunk:
                columns[s] += [math.nan, math.nan]
                continue
            i_min = min(chunk, key=lambda t: (t[1], t[0]))[0]
            i_max = max(chunk, key=lambda t: (t[1], -t[0]))[0]
            first, second = sorted([i_min, i_max])
            columns[s] += [values[first, s], values[second, s]]
    return xs, columns


def test_downsampling_matches_a_loop_and_keeps_extremes() -> None:
    rng = np.random.default_rng(0)
    t, s = 10_003, 4
    x = np.arange(t) * 3
    values = np.cumsum(rng.normal(size=(t, s)), axis=0)
    values[5_000, 1] = 1e6  # a one-step spike
    values[100:400, 2] = np.nan  # a gap
    values[:, 3] = np.nan  # a series with no value at all
    x_out, out = downsample_minmax(x, values, 600)
    assert len(x_out) == 600 and out.shape == (600, s)
    assert np.all(np.diff(x_out) >= 0) and x_out[0] == 0 and x_out[-1] == x[-1]
    xs, columns = brute_force(x, values, 600)
    assert x_out.tolist() == xs
    np.testing.assert_array_equal(out, np.array(columns).T)
    for k in range(3):
        assert np.nanmax(out[:, k]) == np.nanmax(values[:, k]) and np.nanmin(out[:, k]) == np.nanmin(
            values[:, k]
        )
    assert np.isnan(out[:, 3]).all()
    short_x, short = downsample_minmax(x[:500], values[:500], 600)
    assert short_x is x[:500] or np.array_equal(short_x, x[:500])
    np.testing.assert_array_equal(short, values[:500])


def test_line_chart_spec_is_strict_json_with_notes() -> None:
    values = np.array([[1.0, np.nan], [2.0, 3.0], [np.nan, 4.0]])
    matrix = StatMatrix(np.array([0, 1, 2]), values, [
        {"layer_id": 0, "layer": "conv", "param": "conv.weight"},
        {"layer_id": 3, "layer": "fc", "param": "fc.bias"},
    ], nonfinite=1)  # fmt: skip
    spec = line_chart("c", "title", matrix, "l2")
    text = to_json(spec)
    back = json.loads(text)  # strict: NaN would not parse with parse_constant raising
    json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    assert back["x"] == [0, 1, 2]
    assert back["series"][0]["values"] == [1.0, 2.0, None]
    assert back["series"][1]["label"] == "[3] fc · fc.bias" and back["series"][1]["stat"] == "l2"
    assert "1 non-finite value(s)" in back["note"]
    assert "</" not in to_json({"s": "</script>"})
