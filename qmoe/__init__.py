"""qmoe: sub-1-bit compression and inference for Switch Transformer Mixture-of-Experts models."""

__version__ = "0.1.0"


def load_switch(source, device="cpu", dtype=None, **kwargs):
    """Loads a dense Switch Transformer (local folder or Hub id); see :func:`qmoe.model.load_switch`."""
    from .model import load_switch as _load

    return _load(source, device=device, dtype=dtype, **kwargs)


def load_compressed(source, devices=None, **kwargs):
    """Loads a qmoe-compressed checkpoint; see :func:`qmoe.runtime.load_compressed`."""
    from .runtime import load_compressed as _load

    return _load(source, devices=devices, **kwargs)


def __getattr__(name):
    # `qmoe.codec` imports numba; load it only when asked for.
    if name == "codec":
        import importlib

        return importlib.import_module(".codec", __name__)
    raise AttributeError(f"module 'qmoe' has no attribute {name!r}")
