"""Unpadded BERT encoding: the dense layers see only real tokens, never padding.

A batch of 32 pairs cut from the bundled data is about 40% padding even with per-column padding, and
every linear layer, GELU and LayerNorm of a BERT encoder spends that share of its work on tokens that
the mean pooling then throws away. ``UnpaddedEncoder`` runs the same modules with the same weights on
the packed real tokens ``(T, hidden)`` and pads only around the attention product, where the padding
mask needs the ``(batch, length)`` shape. Outputs equal the padded forward to float rounding (a test
holds them to 1e-5). Training takes every column of a batch in one forward (the dense layers run once
over all their tokens), keeps the word-embedding gradient as one dense buffer that sparse backwards add
into, and draws dropout masks from 15-bit integers (:func:`dropout`) instead of one float per element.
Only the dropout draws differ from the padded forward, so a run is as reproducible as before but not
bit-identical to one with ``model.unpad=false``.

Only plain BERT-style encoders qualify (absolute positions, post-LayerNorm, no decoder); anything
else keeps the padded forward of sentence-transformers (``supports_unpadding`` says which).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pairtune.data.batching import Features


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

    ``forward`` also takes a list of feature dicts (the batch's columns) and returns one output per column:
    the dense layers then run once over every column's packed tokens, which halves their calls and the
    word-embedding gradient's cost; attention stays per column, each padded only to its own longest row.

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

    def kept_gradients(self) -> list[nn.Parameter]:
        """Parameters whose ``.grad`` the loop zeroes in place instead of dropping (see ``_lookup``)."""
        return [self.bert[0].embeddings.word_embeddings.weight]

    def forward(self, features: Features | Sequence[Features]) -> Features | list[Features]:
        if isinstance(features, Mapping):
            return self._encode([features])[0]
        return self._encode(list(features))

    def _encode(self, columns: list[Features]) -> list[Features]:
        bert = self.bert[0]
        grids = [_Grid.of(features["attention_mask"]) for features in columns]
        token_ids = torch.cat([f["input_ids"].reshape(-1)[g.flat] for f, g in zip(columns, grids, strict=True)])
        positions = torch.cat([g.flat % g.length for g in grids])  # each real token's position within its row
        token_types = torch.cat([
            f["token_type_ids"].reshape(-1)[g.flat] if "token_type_ids" in f else torch.zeros_like(g.flat)
            for f, g in zip(columns, grids, strict=True)
        ])
        embeddings = bert.embeddings
        hidden = (
            _lookup(embeddings.word_embeddings, token_ids)
            + embeddings.token_type_embeddings(token_types)
            + embeddings.position_embeddings(positions)
        )  # (T, hidden): every column's real tokens, packed one after the other
        hidden = dropout(embeddings.LayerNorm(hidden), embeddings.dropout.p, embeddings.training)
        for layer in bert.encoder.layer:
            hidden = _layer(layer, hidden, grids)
        outputs = []
        for features, grid, packed in zip(columns, grids, hidden.split(grid_sizes(grids)), strict=True):
            out = {**features, "token_embeddings": grid.scatter(packed)}
            for module in list(self.model)[1:]:  # Pooling, Normalize, Dense...: unchanged
                out = module(out)
            outputs.append(out)
        return outputs


@dataclass
class _Grid:
    """Where one column's real tokens sit in its padded ``(batch, length)`` grid."""

    flat: Tensor  # (T_c,) positions of the real tokens in the (B*L) grid
    batch: int
    length: int
    key_mask: Tensor  # (B, 1, 1, L): every query attends to its row's real tokens

    @classmethod
    def of(cls, attention_mask: Tensor) -> _Grid:
        mask = attention_mask.bool()
        batch, length = mask.shape
        return cls(mask.reshape(-1).nonzero().squeeze(1), batch, length, mask[:, None, None, :])

    def key_bias(self, dtype: torch.dtype) -> Tensor:
        """``(B, 1, 1, L)``: 0 for a real key, -inf for padding, added to the attention scores."""
        return torch.zeros(self.key_mask.shape, dtype=dtype, device=self.key_mask.device).masked_fill_(
            ~self.key_mask, float("-inf")
        )

    def scatter(self, packed: Tensor) -> Tensor:
        """``(T_c, W)`` packed rows into a zero-padded ``(B, L, W)`` grid."""
        grid = packed.new_zeros(self.batch * self.length, packed.shape[-1]).index_copy(0, self.flat, packed)
        return grid.view(self.batch, self.length, -1)


def grid_sizes(grids: Sequence[_Grid]) -> list[int]:
    return [int(grid.flat.shape[0]) for grid in grids]


def _lookup(table: nn.Embedding, token_ids: Tensor) -> Tensor:
    """The word-embedding lookup, its gradient added in place into a dense ``.grad`` that is kept.

    A dense embedding backward allocates and zeroes a fresh (vocabulary x hidden) gradient every step (about
    47 MB for a BERT vocabulary: on a CPU, a page fault per 4 KB) and adds it to ``.grad``. A sparse
    backward carries only the looked-up rows, and autograd adds them into the existing dense ``.grad``;
    the loop zeroes that buffer in place (``UnpaddedEncoder.kept_gradients``). The optimizer sees the same
    dense gradient either way.
    """
    weight = table.weight
    if weight.requires_grad and torch.is_grad_enabled() and weight.grad is None:
        weight.grad = torch.zeros_like(weight)
    return F.embedding(token_ids, weight, table.padding_idx, sparse=weight.grad is not None)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout whose masks come from 15-bit uniform integers, four to each int64 draw of torch's generator.

    ``torch.bernoulli_`` draws one float per element: on a CPU about 5x the time of these masks, and the
    largest cost of a training step after the dense layers' matmuls. Here a tensor of
    random int64 words (63 uniform bits each: ``random_`` keeps them non-negative) is viewed as four int16
    lanes, and each lane's low 15 bits are compared with a threshold: an element is dropped with
    probability ``round(p * 32768) / 32768`` (0.100006 for p = 0.1). The draws come from torch's own
    generator, so ``torch.manual_seed`` and the cached loss's RNG replay govern them as before.
    """
    if not training or p == 0.0:
        return x
    count = x.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=x.device).random_()
    lanes = words.view(torch.int16)[:count].view(x.shape)
    drop = lanes.bitwise_and_(0x7FFF) < round(p * 32768)
    return x.masked_fill(drop, 0.0).mul_(1.0 / (1.0 - p))  # autograd keeps only the boolean mask


def _attention(qkv: Tensor, grid: _Grid, heads: int, size: int, scale: float, p: float) -> Tensor:
    """Self-attention of one column: packed ``(T_c, 3W)`` projections in, packed ``(T_c, W)`` context out.

    Without dropout this is ``scaled_dot_product_attention`` (its fused kernel); with dropout it is the same
    product written out (what that function's reference path computes), so the probabilities can take the
    cheap mask of :func:`dropout`.
    """
    query, key, value = grid.scatter(qkv).view(grid.batch, grid.length, 3, heads, size).permute(2, 0, 3, 1, 4)
    if p == 0.0:
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=grid.key_mask, scale=scale)
    else:
        scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale) + grid.key_bias(query.dtype)
        context = torch.matmul(dropout(scores.softmax(dim=-1), p, True), value)  # (B, heads, L, size)
    return context.transpose(1, 2).reshape(grid.batch * grid.length, heads * size)[grid.flat]


def _layer(layer: nn.Module, hidden: Tensor, grids: Sequence[_Grid]) -> Tensor:
    attention = layer.attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size
    qkv = F.linear(
        hidden,
        torch.cat([attention.query.weight, attention.key.weight, attention.value.weight]),
        torch.cat([attention.query.bias, attention.key.bias, attention.value.bias]),
    )
    training = layer.training
    p = attention.dropout.p if training else 0.0
    context = torch.cat([
        _attention(part, grid, heads, size, attention.scaling, p)
        for part, grid in zip(qkv.split(grid_sizes(grids)), grids, strict=True)
    ])
    output = layer.attention.output
    hidden = output.LayerNorm(dropout(output.dense(context), output.dropout.p, training) + hidden)
    intermediate = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
    output = layer.output
    return output.LayerNorm(dropout(output.dense(intermediate), output.dropout.p, training) + hidden)
