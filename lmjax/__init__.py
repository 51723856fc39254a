"""lmjax: build a small ChatGPT-like model end to end in JAX."""
