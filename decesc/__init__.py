"""decesc: a from-scratch PyTorch reference implementation of DecoupledESC (arXiv 2505.16995).

The top-level names are imported lazily, so ``import decesc.esconv`` (data and metrics work)
does not pay for importing torch.
"""

__version__ = "0.1.0"
__all__ = ["CausalLM", "ModelConfig", "Tokenizer", "load_pretrained", "save_pretrained"]


def __getattr__(name):
    if name in ("load_pretrained", "save_pretrained"):
        from . import loading

        return getattr(loading, name)
    if name in ("CausalLM", "ModelConfig"):
        from . import model

        return getattr(model, name)
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    raise AttributeError(f"module 'decesc' has no attribute {name!r}")
