"""Files: Hugging Face safetensors directories and ``load_pretrained``, GGUF (reader, dequantisers,
conversion, tokenizer), PEFT adapter files, training records and JSONL, atomic writes, and the
models known by name (``tiny``, the SmolLM2 demo)."""
