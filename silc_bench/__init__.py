"""silc-bench: evaluation and benchmark suite for dense vision-language models."""
__version__ = "0.1.0"


def load_model(spec: str, **kwargs):
    """Load a SILC / SigLIP / CLIP checkpoint behind the common model interface.

    `spec` is a registry name (configs/models.yaml), a big_vision `.npz` path,
    `open_clip:ARCH[:WEIGHTS]`, or `hf:DIR`.
    """
    from silc_bench.checkpoints import load_model as _load

    return _load(spec, **kwargs)
