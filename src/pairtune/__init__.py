"""pairtune: fine-tune sentence-embedding models on text pairs with MNRL, tracked and reproducible."""

__version__ = "0.1.0"
