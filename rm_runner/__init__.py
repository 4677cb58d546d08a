"""rm_runner: run, compare and serve LLMs the same way on every accelerator, from Hydra configs.

Kept import-light on purpose: composing a config must not import torch.
"""

__version__ = "0.1.0"
