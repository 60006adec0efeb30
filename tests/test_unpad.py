"""The unpadded BERT forward computes what sentence-transformers' padded forward computes."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from pairtune.config import ConfigError
from pairtune.data.batching import tokenize_columns
from pairtune.model.losses import mnrl_loss
from pairtune.model.unpad import UnpaddedEncoder, _attention, _Grid, dropout, supports_unpadding
from pairtune.train.training import encoder_for_training, reset_gradients, train


@pytest.fixture
def bundled_batch(base_model, prepared_bundled):
    """Both columns of 32 train pairs of very different lengths (notes of 6-22 tokens, sentences of 9-45)."""
    frame = pd.read_parquet(prepared_bundled / "train.parquet")
    lengths = frame["sentence_1"].str.len()
    rows = list(lengths.sort_values().index[:16]) + list(lengths.sort_values().index[-16:])
    tokens = tokenize_columns(base_model.tokenizer, [frame["sentence_0"].tolist(), frame["sentence_1"].tolist()],
                              max_length=256)
    batch = tokens.batch(rows)
    assert batch[1]["attention_mask"].float().mean() < 0.7  # a real share of padding to skip
    return batch


def loss_and_grads(module, model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    embeddings = [module(dict(features))["sentence_embedding"] for features in batch]
    loss = mnrl_loss(embeddings[0], embeddings[1:], scale=20.0, similarity="cosine", gather=False)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_embeddings_loss_and_gradients_equal_the_padded_forward(base_model, bundled_batch):
    base_model.eval()  # dropout off: both paths are then the same function
    unpadded = UnpaddedEncoder(base_model)
    with torch.no_grad():
        for features in bundled_batch:
            padded = base_model(dict(features))["sentence_embedding"]
            packed = unpadded(dict(features))["sentence_embedding"]
            assert torch.allclose(packed, padded, atol=1e-5, rtol=0)
    loss_padded, grads_padded = loss_and_grads(base_model, base_model, bundled_batch)
    loss_packed, grads_packed = loss_and_grads(unpadded, base_model, bundled_batch)
    assert abs(loss_packed - loss_padded) < 1e-5
    assert grads_packed.keys() == grads_padded.keys() and len(grads_packed) > 90  # every trained tensor
    overall = max(grad.abs().max() for grad in grads_padded.values())
    for name, grad in grads_padded.items():
        # Key biases get a gradient that is zero in exact arithmetic (softmax ignores a shift): rounding only.
        scale = grad.abs().max().clamp_min(1e-3 * overall)
        assert (grads_packed[name] - grad).abs().max() / scale < 1e-4, name


def test_training_mode_applies_dropout_on_the_packed_tokens(base_model, bundled_batch):
    base_model.train()
    unpadded = UnpaddedEncoder(base_model)
    features = bundled_batch[1]
    torch.manual_seed(0)
    first = unpadded(dict(features))["sentence_embedding"]
    torch.manual_seed(0)
    again = unpadded(dict(features))["sentence_embedding"]
    second = unpadded(dict(features))["sentence_embedding"]
    assert torch.equal(first, again)  # seeded: reproducible (the cached loss replays these RNG states)
    assert not torch.allclose(first, second)  # and dropout is really on


def test_checkpoint_keys_are_the_models_own(base_model):
    unpadded = UnpaddedEncoder(base_model)
    assert list(unpadded.state_dict()) == list(base_model.state_dict())
    assert {id(p) for p in unpadded.parameters()} == {id(p) for p in base_model.parameters()}
    # Given a copy whose weights have drifted, loading the model's own state dict through the wrapper
    copy_of = copy.deepcopy(base_model)
    with torch.no_grad():
        for param in copy_of.parameters():
            param.add_(1.0)
    outcome = UnpaddedEncoder(copy_of).load_state_dict(base_model.state_dict())
    # Then every key matched and every weight is the original again
    assert not outcome.missing_keys and not outcome.unexpected_keys
    for (name, mine), theirs in zip(copy_of.state_dict().items(), base_model.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs), name


def test_encoders_it_does_not_know_keep_the_padded_forward(base_model):
    assert supports_unpadding(base_model)
    relative = copy.deepcopy(base_model)
    relative[0].auto_model.config.position_embedding_type = "relative_key"
    assert not supports_unpadding(relative)
    module, padded = encoder_for_training(relative, unpad="auto")
    assert module is relative and "BertModel has no unpadded forward" in padded
    with pytest.raises(ConfigError, match="config key 'model.unpad': BertModel has no unpadded forward"):
        encoder_for_training(relative, unpad=True)
    assert encoder_for_training(base_model, unpad=False) == (base_model, None)
    module, padded = encoder_for_training(base_model, unpad="auto")
    assert isinstance(module, UnpaddedEncoder) and padded is None
    with pytest.raises(ValueError, match="needs a BERT encoder"):
        UnpaddedEncoder(relative)


@pytest.mark.slow
def test_a_run_without_dropout_learns_the_same_weights_either_way(make_settings, prepared_bundled, tmp_path):
    runs = {}
    for unpad in (True, False):
        settings = make_settings(
            f"paths.prepared={prepared_bundled}", f"paths.model={tmp_path}/m-{unpad}", "train.max_steps=3",
            "train.epochs=1", "train.eval_on_start=false", "train.save_checkpoints=false", "model.dropout=0.0",
            f"model.unpad={str(unpad).lower()}",
        )
        runs[unpad] = train(settings)
    assert runs[True].step_losses == pytest.approx(runs[False].step_losses, abs=1e-5)
    from safetensors.torch import load_file

    packed = load_file(tmp_path / "m-True" / "model.safetensors")
    padded = load_file(tmp_path / "m-False" / "model.safetensors")
    assert packed.keys() == padded.keys()
    assert max((packed[k] - padded[k]).abs().max().item() for k in packed) < 1e-5


def test_all_columns_in_one_forward_equal_one_forward_per_column(base_model, bundled_batch):
    base_model.eval()
    unpadded = UnpaddedEncoder(base_model)
    with torch.no_grad():
        together = unpadded([dict(features) for features in bundled_batch])
        for features, out in zip(bundled_batch, together, strict=True):
            alone = unpadded(dict(features))
            assert out["sentence_embedding"].shape == (features["input_ids"].shape[0], 384)
            assert torch.allclose(out["sentence_embedding"], alone["sentence_embedding"], atol=1e-6, rtol=0)


def test_written_out_attention_equals_the_fused_kernel(base_model, bundled_batch):
    # Given a layer's packed projections for a batch with padding
    unpadded = UnpaddedEncoder(base_model)
    grid = _Grid.of(bundled_batch[1]["attention_mask"])
    torch.manual_seed(0)
    qkv = torch.randn(grid.flat.shape[0], 3 * 384)
    # When attention runs with a dropout so small that it drops nothing (threshold at the int16 minimum)
    written_out = _attention(qkv, grid, 12, 32, 32**-0.5, 1e-9)
    fused = _attention(qkv, grid, 12, 32, 32**-0.5, 0.0)
    # Then the written-out product (the dropout path) is the fused kernel's
    assert unpadded is not None and written_out.shape == (grid.flat.shape[0], 384)
    assert torch.allclose(written_out, fused, atol=1e-5, rtol=0)


def test_dropout_drops_p_of_the_elements_scales_the_rest_and_masks_the_gradient():
    torch.manual_seed(1)
    x = torch.ones(1_000_000, requires_grad=True)
    out = dropout(x, 0.1, training=True)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002  # binomial sd 0.0003
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.9))
    out.sum().backward()
    assert torch.equal(x.grad == 0, out == 0)  # the backward uses the forward's mask
    torch.manual_seed(1)
    assert torch.equal(dropout(x.detach(), 0.1, training=True), out.detach())  # torch's generator decides
    assert dropout(x, 0.1, training=False) is x


def test_the_word_embedding_gradient_is_dense_kept_and_zeroed_in_place(base_model, bundled_batch):
    # Given the padded forward's gradient of the word embeddings (dropout off)
    base_model.eval()
    table = base_model[0].auto_model.embeddings.word_embeddings.weight
    _, padded = loss_and_grads(base_model, base_model, bundled_batch)
    # When the unpadded forward of both columns takes its backward
    unpadded = UnpaddedEncoder(base_model)
    base_model.zero_grad(set_to_none=True)
    embeddings = [out["sentence_embedding"] for out in unpadded([dict(f) for f in bundled_batch])]
    mnrl_loss(embeddings[0], embeddings[1:], scale=20.0, similarity="cosine", gather=False).backward()
    # Then the optimizer gets the same dense gradient
    kept = table.grad
    assert kept.layout == torch.strided and not kept.is_sparse
    assert (kept - next(g for n, g in padded.items() if n.endswith("word_embeddings.weight"))).abs().max() < 1e-6
    # And resetting keeps that buffer, zeroed, and drops every other gradient
    optimizer = torch.optim.AdamW(base_model.parameters())
    reset_gradients(unpadded, optimizer)
    assert table.grad is kept and not kept.any()
    assert all(p.grad is None for p in base_model.parameters() if p is not table)
