"""rm_runner: run, compare and serve LLMs the same way on every accelerator, from Hydra configs.

Kept import-light on purpose: composing a config must not import torch.
"""

__version__ = "0.1.0"


def activate(device="auto", **options):
    """Route ``from_pretrained`` models to ``device`` (a registered name, ``auto``, or a Backend)."""
    from rm_runner.hooks.api import activate as _activate

    return _activate(device, **options)


def switch_device(device, **options):
    """Clean up the active backend, start ``device``, re-prepare every proxied model on it."""
    from rm_runner.hooks.api import switch_device as _switch

    return _switch(device, **options)


def deactivate():
    """Restore the original ``from_pretrained`` and release the device."""
    from rm_runner.hooks.api import deactivate as _deactivate

    _deactivate()
