"""Integrations with training and data tooling: dataset-wide attribution, distributed helpers."""

from bbdecoder.integrations.dataset_maps import DatasetMaps, DatasetMapsError, explain_dataset, open_maps

__all__ = ["DatasetMaps", "DatasetMapsError", "explain_dataset", "open_maps"]
