"""Serving a trained run: a chat engine, a content filter, a feedback store and a Gradio demo."""
