"""The core layer: the Llama/Qwen2 model and its families, tokenizer and chat formats, KV cache,
generation, summed sequence log-probs (the one label convention) and LoRA layers. Imports only
torch and tokenizers."""
