"""A torch-free sentence encoder over an exported ONNX folder: tokenizers + onnxruntime + numpy only.

Serving code imports this module instead of sentence-transformers, so it must never pull in torch,
transformers or any pairtune module that does. The folder layout is the one ``pairtune.outputs.export`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

META_FILE = "pairtune_onnx.json"
ONNX_SUBDIR = "onnx"
# File names follow sentence-transformers' ONNX layout, but these graphs end in the pooled, normalised
# embedding, so they are for this encoder, not for sentence-transformers' backend (which pools itself).
VARIANT_FILES = {"fp32": "model.onnx", "int8": "model_qint8_avx2.onnx"}
OUTPUT_NAME = "sentence_embedding"


def read_onnx_meta(folder: str | Path) -> dict:
    """The export's metadata (max_seq_length, pooling, dims, input names), written next to the tokenizer."""
    return json.loads((Path(folder) / META_FILE).read_text(encoding="utf-8"))


def variant_path(folder: str | Path, variant: str) -> Path:
    if variant not in VARIANT_FILES:
        raise ValueError(f"unknown ONNX variant {variant!r}; expected one of {sorted(VARIANT_FILES)}")
    return Path(folder) / ONNX_SUBDIR / VARIANT_FILES[variant]


def load_tokenizer(folder: str | Path, max_seq_length: int) -> Tokenizer:
    """The fast tokenizer with per-batch padding: the saved tokenizer.json pads every text to a fixed 128."""
    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    pad_id = tokenizer.padding["pad_id"] if tokenizer.padding else 0
    pad_token = tokenizer.padding["pad_token"] if tokenizer.padding else "[PAD]"
    tokenizer.enable_truncation(max_length=max_seq_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)  # no length: pad to the batch's longest
    return tokenizer


def make_session(path: Path, threads: int | None, *, spin: bool = False) -> ort.InferenceSession:
    """A CPU session. ``spin=False`` lets its worker threads sleep between runs instead of busy-waiting.

    Spinning workers keep their cores busy for a while after each run; on a small CPU that slows whatever
    runs next in the process, another session or PyTorch (measured on 2 cores: int8 throughput 527-681
    sentences/s with spinning, 783-798 without, when torch and the fp32 session run in between). A process
    that does nothing but run one session back to back may gain a little from ``spin=True``.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxEncoder:
    """Encode texts into L2-normalised sentence embeddings with an exported graph, without torch."""

    def __init__(
        self, folder: str | Path, *, variant: str = "fp32", threads: int | None = None, spin: bool = False
    ) -> None:
        self.folder = Path(folder)
        self.variant = variant
        self.meta = read_onnx_meta(self.folder)
        self.max_seq_length = int(self.meta["max_seq_length"])
        self.tokenizer = load_tokenizer(self.folder, self.max_seq_length)
        self.session = make_session(variant_path(self.folder, variant), threads, spin=spin)
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.dimension = int(self.meta["embedding_dimension"])
        self.prompts: dict[str, str] = dict(self.meta.get("prompts", {}))  # the model's, e.g. {"query": "query: "}

    def _feed(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Tokenise one batch and keep only the inputs the graph declares."""
        encodings = self.tokenizer.encode_batch(texts)
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        return {name: np.asarray(columns[name], dtype=np.int64) for name in self.input_names}  # (B, T)

    def encode(self, texts: list[str], batch_size: int = 32, *, prompt_name: str | None = None) -> np.ndarray:
        """Embeddings of shape (N, dim), float32, in the order of ``texts``.

        ``prompt_name`` puts the model's prompt of that name before every text, as sentence-transformers'
        ``encode(..., prompt_name=...)`` does. Texts are batched longest first, as sentence-transformers does,
        so each batch carries little padding.
        """
        if isinstance(texts, str):
            raise TypeError("encode expects a list of strings, not one string")
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise KeyError(f"{self.folder}: no prompt named {prompt_name!r}; the model has {sorted(self.prompts)}")
            texts = [self.prompts[prompt_name] + text for text in texts]
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self.session.run([OUTPUT_NAME], self._feed([texts[i] for i in rows]))[0]  # (B, dim)
            out[rows] = batch
        return out
