import os
import secrets

import pytest
import torch

# Ray with token authentication, as in production. Tests that start clusters with `ray start` (and the
# pipelines they run in subprocesses) share this session's token; never a developer's real one.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def float64():
    """Run a test in float64 (the numerics tests compare to 1e-6 and below)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
