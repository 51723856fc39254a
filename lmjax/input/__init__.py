"""What the trainer reads: data specs, token chunks, packed batches, preference pairs, loaders."""
