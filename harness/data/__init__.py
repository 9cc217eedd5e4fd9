"""Dataset loaders, each registered by name; see :mod:`harness.data.base`."""

from harness.data.base import DATASETS, ImageDataset, load_dataset

__all__ = ["DATASETS", "ImageDataset", "load_dataset"]
