"""DVC stage `fidelity`: how close the phantom gradient is to the exact one, for every trained DEQ variant of
one experiment (the paper's appendix C, with an exact reference: :func:`deqsm.fidelity.gradient_fidelity`).

For each DEQ variant of ``<out>/models/<experiment>/``, the parameter gradient of the experiment's loss on
``fidelity.rows`` test rows under phantom backward with K steps (K in ``fidelity.ks``) is compared with the
one under the exact, differentiable implicit backward: cosine, relative error, and the relative error of
the score. Writes ``<results>/experiments/<experiment>/fidelity.json`` (``{}`` when the experiment has no
DEQ variant), which the report turns into a table and a figure.
"""
from __future__ import annotations

import time

import torch

from pipelines.artifacts import Artifacts, load_model, load_splits, write_json
from pipelines.settings import Settings, main_guard, run_experiment_stage


def fidelity_experiment(settings: Settings, name: str) -> None:
    """Per DEQ variant with a trained model: phantom-K vs exact gradients; written to the stage's output."""
    from deqsm.experiments import make_objective
    from deqsm.fidelity import gradient_fidelity

    artifacts = Artifacts.of(settings)
    exp = settings.experiments[name]
    trained = artifacts.models(name)
    # the first seed's model of each DEQ variant (the gradients' fidelity is a property of the method, not a
    # figure averaged over seeds)
    variants = [v for v, var in exp.variants.items() if var.variant == "deq" and trained.get(v)]
    missing = [v for v, var in exp.variants.items() if var.variant == "deq" and v not in variants]
    if missing:
        print(f"{name}: no trained model for DEQ variant(s) {missing} (their tuning failed?): not measured", flush=True)
    ks = tuple(settings.fidelity.ks)
    seed = settings.base.seed
    out: dict[str, dict] = {}
    splits = load_splits(artifacts, exp.dataset) if variants else {}
    for variant in variants:
        seed, path = next(iter(trained[variant].items()))
        spec, model, _ = load_model(path, splits["train"])
        x = splits["test"][:settings.fidelity.rows]
        objective = make_objective(spec, splits["train"])
        print(f"{name}/{variant}: phantom K={','.join(map(str, ks))} vs implicit on {x.shape[0]} test rows", flush=True)
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        results = gradient_fidelity(model, objective, x, ks=ks, seed=seed)
        out[variant] = {
            "model_file": artifacts.rel_to_root(path), "seed": seed, "rows": int(x.shape[0]), "loss": spec.loss.name,
            "trained_backward": spec.deq.backward, "trained_k": spec.deq.k, "solver": spec.deq.solver,
            "seconds": time.perf_counter() - t0,
            "results": [{**r, "k": int(r["k"])} for r in results],
        }
        print(f"{name}/{variant}: " + ", ".join(f"K={int(r['k'])} cos={r['grad_cosine']:.4f}" for r in results),
              flush=True)
    write_json(artifacts.fidelity(name), out)


def main(argv: list[str] | None = None) -> None:
    run_experiment_stage(fidelity_experiment, "pipelines.fidelity", __doc__, argv)


if __name__ == "__main__":
    main_guard(main)
