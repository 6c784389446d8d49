"""Datasets: a registry of generated, packaged and real datasets (:data:`DATASETS`), their preprocessing
as validated parameters, and the Parquet + manifest files that the prepare stage writes and training
code reads (:func:`load_split`, :func:`load_splits`, :func:`iter_batches`, all checksum-verified).

Imports torch, numpy, pyarrow and pydantic (torchvision, scikit-learn and PIL inside the loaders that
need them) — never ray, mlflow or dvc.
"""
from deqsm.data import generated, images, tabular  # noqa: F401  (each module registers its datasets)
from deqsm.data.base import DATASETS, SPLITS, Context, DatasetSpec, MissingDataError, Prepared, RawFiles
from deqsm.data.prepare import prepare_datasets
from deqsm.data.settings import DataSettings
from deqsm.data.store import (ChecksumError, PreparedWriter, Split, iter_batches, load_split, load_splits,
                              read_manifest, true_density, write_prepared)

__all__ = ["DATASETS", "SPLITS", "ChecksumError", "Context", "DataSettings", "DatasetSpec", "MissingDataError",
           "Prepared", "PreparedWriter", "RawFiles", "Split", "iter_batches", "load_split", "load_splits",
           "prepare_datasets", "read_manifest", "true_density", "write_prepared"]
