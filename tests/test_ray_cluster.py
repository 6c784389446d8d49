"""ray_cluster.yaml validates against Ray's own cluster-launcher schema (and a typo would not)."""
import copy
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _validate(cfg):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


def test_cluster_file_is_valid():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    _validate(cfg)
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values()), "GPU workers"
    assert any("pip install" in c and "deqsm" in c for c in cfg["setup_commands"])
    assert "~/deqsm" in cfg["file_mounts"]


def test_schema_rejects_a_typo():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    cfg["available_node_types"]["gpu_worker"]["node_confg"] = cfg["available_node_types"]["gpu_worker"].pop("node_config")
    with pytest.raises(Exception, match="node_confg"):
        _validate(cfg)
