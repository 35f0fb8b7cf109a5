"""Checkpoint conversion to and from Hugging Face `transformers` (safetensors + config.json)."""
