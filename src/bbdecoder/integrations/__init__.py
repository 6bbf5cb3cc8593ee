"""Integrations: dataset-scale attribution, torch.distributed, and the Lightning callback.

``BBDecoderCallback`` is imported on first use only, so importing bbdecoder never imports Lightning.
"""

from bbdecoder.integrations.dataset_maps import DatasetMaps, DatasetMapsError, explain_dataset, open_maps
from bbdecoder.integrations.ddp import DistributedAnalyzer, RankSync

__all__ = [
    "BBDecoderCallback",
    "DatasetMaps",
    "DatasetMapsError",
    "DistributedAnalyzer",
    "RankSync",
    "explain_dataset",
    "open_maps",
]


def __getattr__(name: str) -> object:
    if name == "BBDecoderCallback":
        from bbdecoder.integrations.lightning import BBDecoderCallback

        return BBDecoderCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
