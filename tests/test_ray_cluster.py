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


def test_every_ray_start_runs_with_token_auth():
    """Ray's ports listen on all interfaces: each node starts with token authentication and reads the token that
    file_mounts brings from the machine running `ray up` (never a token written in this file)."""
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    commands = [c for key, value in cfg.items() if key.endswith("_commands") for c in value]
    commands += [c for t in cfg["available_node_types"].values() for key, value in t.items()
                 if key.endswith("_commands") for c in value]
    starts = [c for c in commands if "ray start" in c]
    assert any("--head" in c for c in starts) and any("--address=" in c for c in starts), starts
    for command in starts:
        assert command.startswith("RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token ray start "), command
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_TOKEN=" not in (ROOT / "ray_cluster.yaml").read_text()
    assert "disabled" not in (ROOT / "ray_cluster.yaml").read_text()


def test_schema_rejects_a_typo():
    cfg = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    cfg["available_node_types"]["gpu_worker"]["node_confg"] = cfg["available_node_types"]["gpu_worker"].pop("node_config")
    with pytest.raises(Exception, match="node_confg"):
        _validate(cfg)
