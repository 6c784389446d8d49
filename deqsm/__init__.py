"""deqsm: score matching with deep equilibrium (DEQ) layers.

The core imports torch, numpy, pyarrow and torchmetrics only — never ray, mlflow or dvc (those live in
``pipelines/``), so it runs on a bare GPU machine.
"""
__version__ = "0.1.0"
