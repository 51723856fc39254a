"""Text primitives every stage shares: tokenizer, chat template, blocklist, file helpers (no JAX)."""
