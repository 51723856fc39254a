"""Sampling from trained parameters."""
