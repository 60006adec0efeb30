"""Unpadded BERT encoding: the dense layers see only real tokens, never padding.

A batch of 32 pairs cut from the bundled data is about 40% padding even with per-column padding, and
every linear layer, GELU and LayerNorm of a BERT encoder spends that share of its work on tokens that
the mean pooling then throws away. ``UnpaddedEncoder`` runs the same modules with the same weights on
the packed real tokens ``(T, hidden)`` and pads only around the attention product, where the padding
mask needs the ``(batch, length)`` shape. Outputs equal the padded forward to float rounding (a test
holds them to 1e-5); only the order of the dropout draws differs, so a run is as reproducible as
before but not bit-identical to one with ``model.unpad=false``.

Only plain BERT-style encoders qualify (absolute positions, post-LayerNorm, no decoder); anything
else keeps the padded forward of sentence-transformers (``supports_unpadding`` says which).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pairtune.batching import Features


def _bert(model: nn.Module) -> nn.Module | None:
    """The Hugging Face encoder inside a SentenceTransformer, if it is one this module can unpad."""
    try:
        first = model[0]
    except (TypeError, IndexError, KeyError):
        return None
    encoder = getattr(first, "auto_model", None)
    config = getattr(encoder, "config", None)
    if encoder is None or config is None or type(encoder).__name__ != "BertModel":
        return None
    if config.is_decoder or getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    if getattr(config, "chunk_size_feed_forward", 0):
        return None
    return encoder


def supports_unpadding(model: nn.Module) -> bool:
    return _bert(model) is not None


class UnpaddedEncoder(nn.Module):
    """Wraps a SentenceTransformer; ``forward(features)`` returns its ``sentence_embedding`` unpadded.

    The wrapped model stays the owner of every parameter (``self.model``), so saving, evaluation with
    ``SentenceTransformer.encode`` and the optimizer see exactly the model they would see without it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        bert = _bert(model)
        if bert is None:
            raise ValueError(f"unpadded encoding needs a BERT encoder, not {type(model[0]).__name__}")
        self.model = model
        self.bert = [bert]  # a list keeps it out of this module's children: its parameters live in self.model

    # Checkpoints hold the model's own keys, so a run can resume with model.unpad switched either way.
    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, features: Features) -> Features:
        bert = self.bert[0]
        mask = features["attention_mask"].bool()
        batch, length = mask.shape
        flat = mask.reshape(-1).nonzero().squeeze(1)  # positions of the real tokens in the (B*L) grid
        embeddings = bert.embeddings
        positions = flat % length  # each real token's position within its row
        token_types = features.get("token_type_ids")
        token_types = (
            token_types.reshape(-1)[flat] if token_types is not None else torch.zeros_like(positions)
        )
        hidden = (
            embeddings.word_embeddings(features["input_ids"].reshape(-1)[flat])
            + embeddings.token_type_embeddings(token_types)
            + embeddings.position_embeddings(positions)
        )
        hidden = embeddings.dropout(embeddings.LayerNorm(hidden))
        key_mask = mask[:, None, None, :]  # (B, 1, 1, L): every query attends to its row's real tokens
        for layer in bert.encoder.layer:
            hidden = _layer(layer, hidden, flat, key_mask, batch, length)
        token_embeddings = hidden.new_zeros(batch * length, hidden.shape[-1]).index_copy(0, flat, hidden)
        out = {**features, "token_embeddings": token_embeddings.view(batch, length, -1)}
        for module in list(self.model)[1:]:  # Pooling, Normalize, Dense...: unchanged
            out = module(out)
        return out


def _layer(layer: nn.Module, hidden: Tensor, flat: Tensor, key_mask: Tensor, batch: int, length: int) -> Tensor:
    attention = layer.attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size
    width = heads * size
    qkv = F.linear(
        hidden,
        torch.cat([attention.query.weight, attention.key.weight, attention.value.weight]),
        torch.cat([attention.query.bias, attention.key.bias, attention.value.bias]),
    )
    grid = qkv.new_zeros(batch * length, 3 * width).index_copy(0, flat, qkv)
    query, key, value = grid.view(batch, length, 3, heads, size).permute(2, 0, 3, 1, 4).unbind(0)
    context = F.scaled_dot_product_attention(
        query, key, value, attn_mask=key_mask, scale=attention.scaling,
        dropout_p=attention.dropout.p if attention.training else 0.0,
    )
    context = context.transpose(1, 2).reshape(batch * length, width)[flat]
    output = layer.attention.output
    hidden = output.LayerNorm(output.dropout(output.dense(context)) + hidden)
    intermediate = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
    output = layer.output
    return output.LayerNorm(output.dropout(output.dense(intermediate)) + hidden)
