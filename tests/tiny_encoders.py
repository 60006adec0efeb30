"""Small encoders of other architectures, built offline with random weights: MPNet and XLM-RoBERTa.

Nothing can be downloaded here, so each gets a tokenizer made on the spot: MPNet reads the bundled MiniLM's
WordPiece vocabulary, XLM-RoBERTa a byte-level BPE trained on the bundled pairs. The folders hold plain
Hugging Face models with no sentence-transformers files, as a user's own checkpoint often does.
"""

from __future__ import annotations

import json
from pathlib import Path

ARCHITECTURES = ("mpnet", "xlm-roberta")
SIZE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}


def bundled_texts() -> list[str]:
    from .conftest import BUNDLED

    rows = [json.loads(line) for line in BUNDLED.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [text for row in rows for text in row.values()]


def build_mpnet(folder: Path) -> None:
    from transformers import MPNetConfig, MPNetModel, MPNetTokenizer

    from pairtune.model.model_source import bundled_model_path

    words = (Path(bundled_model_path()) / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = MPNetTokenizer(vocab={word: i for i, word in enumerate(words)}, bos_token="[CLS]", eos_token="[SEP]",
                               sep_token="[SEP]", cls_token="[CLS]", pad_token="[PAD]", mask_token="[MASK]",
                               model_max_length=512)
    config = MPNetConfig(vocab_size=len(words), max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id,
                         **SIZE)
    MPNetModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_xlm_roberta(folder: Path) -> None:
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(bundled_texts(), vocab_size=1500, unk_token="<unk>",
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    pieces = [tuple(piece) for piece in json.loads(unigram.to_str())["model"]["vocab"]]
    tokenizer = XLMRobertaTokenizer(vocab=pieces, model_max_length=512)
    config = XLMRobertaConfig(vocab_size=len(pieces), max_position_embeddings=514, pad_token_id=1, type_vocab_size=1,
                              **SIZE)
    XLMRobertaModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build(architecture: str, folder: Path) -> Path:
    """A tiny randomly initialised ``architecture`` saved in ``folder``; returns ``folder``."""
    import torch

    torch.manual_seed(0)
    {"mpnet": build_mpnet, "xlm-roberta": build_xlm_roberta}[architecture](folder)
    return folder
