"""Files: Hugging Face safetensors directories and ``load_pretrained``, GGUF (reader, dequantisers,
conversion, tokenizer), PEFT adapter files, training records and JSONL, atomic writes (and write
errors that name their file), the models known by name (``tiny``, the SmolLM2 demo), and the
redaction of credentials from what is shown or written."""
