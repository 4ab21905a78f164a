"""decesc: a from-scratch PyTorch reference implementation of DecoupledESC (arXiv 2505.16995).

The package is layered; each folder imports only from the folders below it (a test checks this):

    pipeline/   the method as resumable stages in one run directory (sft, mine, dpo, eval)
    train/      LoRA SFT and preference optimisation: trainer, losses, reference cache, FSDP2
    esc/        ESConv data, strategies, prompts, inference, IPM, judges, metrics, report
    formats/    files: safetensors / Hugging Face directories, GGUF, PEFT adapters, named models
    core/       the model, tokenizer, KV cache, generation, sequence log-probs, LoRA layers

``train`` and ``esc`` sit side by side and do not import each other. The short names below are
imported lazily, so ``import decesc`` (or ``decesc.metrics``) does not pay for importing torch.
"""

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "CausalLM": "decesc.core.model",
    "ModelConfig": "decesc.core.config",
    "Tokenizer": "decesc.core.tokenizer",
    "sequence_logprobs": "decesc.core.logprobs",
    "load_pretrained": "decesc.formats.loading",
    "save_pretrained": "decesc.formats.loading",
    "dpo_loss": "decesc.train.losses",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'decesc' has no attribute {name!r}")
