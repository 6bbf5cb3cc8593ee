"""Metric names for MLflow and W&B: ``group/parameter`` so that their UIs put one statistic of every
layer in one section (W&B groups panels by the part before the first ``/``, MLflow's chart view too).

- gradient statistics of a parameter: ``grad_l2/layer1.0.conv1.weight`` (``grad_mean``, ``grad_mean_abs``,
  ``grad_max_abs``, ``grad_var``, ``grad_l1``, ``grad_l2``);
- other statistics of a parameter: ``update_ratio/fc.weight``, ``weight_mean/fc.weight``, ...;
- statistics of a layer's output (activations): ``dead_fraction/layer1.0.relu``;
- model-wide statistics (layer -1): ``noise_scale/model``; the loss: ``loss``.

Characters MLflow does not allow in a key become ``_``.
"""

from __future__ import annotations

import re

from bbdecoder.store.vocabulary import GRAD_STATS

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_name(stat: str, layer_id: int, layer: str, param: str) -> str:
    """The sink's name of one stored series' statistic (see the module docstring)."""
    group = f"grad_{stat}" if stat in GRAD_STATS and param else stat
    if layer_id < 0:
        where = "model"
    elif param and param != "*":
        where = param
    else:
        where = layer or f"layer{layer_id}"
    return _UNSAFE.sub("_", f"{group}/{where}")
