"""Offline data preparation at scale (issue 16): cleaning, deduplication, decontamination, tokenising into
ArrayRecord shards and training tokenizers. `jaxllm.data` stays the training input pipeline."""
