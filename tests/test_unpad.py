"""The unpadded BERT forward computes what sentence-transformers' padded forward computes."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from pairtune.batching import tokenize_columns
from pairtune.losses import mnrl_loss
from pairtune.training import encoder_for_training, train
from pairtune.unpad import UnpaddedEncoder, supports_unpadding


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
    assert encoder_for_training(relative, unpad=True) is relative
    assert encoder_for_training(base_model, unpad=False) is base_model
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
