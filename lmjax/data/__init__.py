"""Data layer: document sources, the SentencePiece tokenizer and packed grain pipelines."""
