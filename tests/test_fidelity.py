import pytest
import torch

from deqsm.fidelity import gradient_fidelity
from deqsm.losses import get_loss
from deqsm.models.energy_mlp import DEQEnergyMLP, ExplicitEnergyMLP


def test_phantom_gradient_approaches_exact_as_k_grows(float64):
    torch.manual_seed(0)
    model = DEQEnergyMLP(4, 16, lam=1.3, tol=1e-10, max_iter=200, backward="phantom", k=2)
    x = torch.randn(32, 4)
    rows = gradient_fidelity(model, lambda m, b: get_loss("ssm")(m, b), x, ks=(1, 2, 4, 8, 32))
    cos = [r["grad_cosine"] for r in rows]
    err = [r["grad_rel_error"] for r in rows]
    assert err[-1] < 1e-4 and cos[-1] > 1 - 1e-8
    assert err[0] > err[2] > err[3] and all(-1 <= c <= 1 + 1e-12 for c in cos)
    assert rows[-1]["score_rel_error"] < 1e-6
    assert model.deq.backward == "phantom" and model.deq.k == 2  # restored


def test_needs_a_deq_layer():
    with pytest.raises(ValueError, match="has no DEQ layer"):
        gradient_fidelity(ExplicitEnergyMLP(2, 4, 1), lambda m, b: get_loss("ssm")(m, b), torch.randn(4, 2))
