"""Evaluation: baselines, perplexity and bits per byte."""
