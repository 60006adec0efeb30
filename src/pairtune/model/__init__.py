"""The encoder: where it comes from, how it loads, its unpadded forward, and the losses over its embeddings."""
