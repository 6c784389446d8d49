"""The ``data`` section of params.yaml, typed and validated (pydantic v2; unknown keys are errors that
name the key and list the valid ones).

    data:
      root: data/prepared        # <root>/<name>/{train,val,test}.parquet + manifest.json
      raw_root: data/raw         # where real datasets' files are looked for (and downloaded to)
      seed: 0                    # splits, dequantisation noise, generated samples
      download: false            # fetch missing real files when the network allows
      datasets:                  # output name -> that dataset's options (see deqsm.data.DATASETS)
        digits: {dequantize: true, logit_alpha: 1.0e-6}
        digits_ncsn: {dataset: digits, scale: symmetric}   # a second entry of one registered dataset
        gaussian: {dim: 2}

Each entry's options are the fields of its registered :class:`~deqsm.data.base.DatasetSpec`; the entry's
name is the registry name unless ``dataset:`` says otherwise.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, SerializeAsAny, ValidationError, field_validator

from deqsm.schema import Strict, describe_errors
from deqsm.data.base import DATASETS, DatasetSpec
from deqsm.data.generated import Gaussian, Mixture
from deqsm.data.images import Digits
from deqsm.data.store import check_name


def default_datasets() -> dict[str, DatasetSpec]:
    """The datasets that work offline: packaged (digits) and generated (gaussian, mixture)."""
    return {"digits": Digits(), "gaussian": Gaussian(), "mixture": Mixture()}


class DataSettings(Strict):
    """The ``data`` section: where prepared and raw data live, the seed, and the datasets to prepare."""

    model_config = ConfigDict(frozen=True)

    root: str = Field("data/prepared", description="output folder (a DVC out)")
    raw_root: str = Field("data/raw", description="real datasets' raw files")
    seed: int = 0
    download: bool = Field(False, description="download missing real files (needs the network)")
    datasets: dict[str, SerializeAsAny[DatasetSpec]] = Field(default_factory=default_datasets)

    @field_validator("datasets", mode="before")
    @classmethod
    def _specs(cls, value: Any) -> dict[str, DatasetSpec]:
        if not isinstance(value, dict) or not value:
            raise ValueError(f"datasets must map output names to options, got {value!r}")
        out = {}
        for name, options in value.items():
            if isinstance(options, DatasetSpec):
                out[name] = options
                continue
            options = {} if options is None else options
            if not isinstance(options, dict):
                raise ValueError(f"{name}: options must be a mapping, got {options!r}")
            check_name(str(name))
            spec_cls = DATASETS.get(options.get("dataset") or name)  # unknown: lists the known ones
            try:
                out[name] = spec_cls.model_validate(options)
            except ValidationError as err:
                raise ValueError("; ".join(describe_errors(err, str(name), with_input=False))) from None
        return out

    def dataset_names(self) -> list[str]:
        return list(self.datasets)

    def registry_name(self, name: str) -> str:
        return self.datasets[name].dataset or name

    def paths(self, base: str | Path = ".") -> tuple[Path, Path]:
        """(root, raw_root), relative paths taken from ``base`` (the folder of params.yaml)."""
        return Path(base) / self.root, Path(base) / self.raw_root
