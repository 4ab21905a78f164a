"""decesc: a from-scratch PyTorch reference implementation of DecoupledESC (arXiv 2505.16995)."""

from .loading import load_pretrained, save_pretrained
from .model import CausalLM, ModelConfig
from .tokenizer import Tokenizer

__all__ = ["CausalLM", "ModelConfig", "Tokenizer", "load_pretrained", "save_pretrained"]
__version__ = "0.1.0"
