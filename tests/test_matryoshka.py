"""Matryoshka embeddings: the loss over leading slices, evaluation at each dim, and a truncated export."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from pairtune.config import ConfigError, load_settings, to_plain_dict
from pairtune.model.losses import cached_mnrl_step, mnrl_loss, ranking_loss

from .conftest import compose_config, tracked_overrides

DIMS = [384, 128, 32]


def test_matryoshka_loss_is_the_weighted_sum_of_mnrl_on_each_leading_slice():
    torch.manual_seed(0)
    anchors, positives, negatives = (torch.randn(6, 16) for _ in range(3))
    options = {"scale": 20.0, "similarity": "cosine", "gather": False}

    loss = ranking_loss(anchors, [positives, negatives], **options, matryoshka=((16, 8, 2), (1.0, 0.5, 2.0)))

    by_hand = sum(
        weight * mnrl_loss(anchors[:, :dim], [positives[:, :dim], negatives[:, :dim]], **options)
        for dim, weight in ((16, 1.0), (8, 0.5), (2, 2.0))
    )
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    # the slices really differ: dropping the smallest changes the sum by its own term
    without = ranking_loss(anchors, [positives, negatives], **options, matryoshka=((16, 8), (1.0, 0.5)))
    assert loss.item() - without.item() == pytest.approx(
        2.0 * mnrl_loss(anchors[:, :2], [positives[:, :2], negatives[:, :2]], **options).item(), rel=1e-5
    )


def test_matryoshka_at_the_full_width_alone_is_plain_mnrl():
    torch.manual_seed(1)
    anchors, positives = torch.randn(5, 12), torch.randn(5, 12)
    options = {"scale": 20.0, "similarity": "cosine", "gather": False, "symmetric": True}
    assert ranking_loss(anchors, [positives], **options, matryoshka=((12,), (1.0,))).item() == pytest.approx(
        mnrl_loss(anchors, [positives], **options).item(), rel=1e-7
    )
    assert ranking_loss(anchors, [positives], **options).item() == mnrl_loss(anchors, [positives], **options).item()


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["loss.matryoshka_dims=[64,128]"], "loss.matryoshka_dims"),
        (["loss.matryoshka_dims=[128,128]"], "loss.matryoshka_dims"),
        (["loss.matryoshka_dims=[128,0]"], "loss.matryoshka_dims"),
        (["loss.matryoshka_dims=[128,64]", "loss.matryoshka_weights=[1.0]"], "loss.matryoshka_weights"),
        (["loss.matryoshka_weights=[1.0]"], "loss.matryoshka_weights"),
        (["export.dim=0"], "export.dim"),
    ],
)
def test_bad_matryoshka_settings_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load_settings(compose_config(overrides))


@pytest.mark.slow
def test_dims_wider_than_the_model_stop_with_the_key(base_model_session):
    from pairtune.train.training import check_dims

    settings = load_settings(compose_config(["loss.matryoshka_dims=[512,128]"]))
    with pytest.raises(ConfigError, match="config key 'loss.matryoshka_dims': 512 is more than .* 384 dims"):
        check_dims(settings, base_model_session)
    settings = load_settings(compose_config(["export.dim=400"]))
    with pytest.raises(ConfigError, match="config key 'export.dim': 400"):
        check_dims(settings, base_model_session)


@pytest.mark.slow
def test_cached_matryoshka_equals_plain_matryoshka_in_loss_and_gradients(base_model):
    from pairtune.data.batching import tokenize_columns

    notes = [f"Ada see sh @ {h} hou" for h in range(8)]
    sentences = [f"Ada saw the ship at hour {h}, long after the others slept." for h in range(8)]
    batch = tokenize_columns(base_model.tokenizer, [notes, sentences], max_length=64).batch(list(range(8)))
    base_model.eval()
    matryoshka = ((384, 64), (1.0, 1.0))

    def embed(features):
        return base_model(features)["sentence_embedding"]

    plain = ranking_loss(embed(batch[0]), [embed(batch[1])], scale=20.0, similarity="cosine", gather=False,
                         matryoshka=matryoshka)
    plain.backward()
    plain_grads = {n: p.grad.clone() for n, p in base_model.named_parameters() if p.grad is not None}
    base_model.zero_grad(set_to_none=True)
    cached = cached_mnrl_step(embed, batch, mini_batch_size=3, scale=20.0, similarity="cosine", gather=False,
                             matryoshka=matryoshka, backward=lambda surrogate: surrogate.backward())
    assert cached.item() == pytest.approx(plain.item(), rel=1e-5)
    largest = max(g.abs().max().item() for g in plain_grads.values())
    worst = max((p.grad - plain_grads[n]).abs().max().item() for n, p in base_model.named_parameters() if n in plain_grads)
    assert worst <= 1e-5 * largest


# -- one tracked Matryoshka run, evaluated and exported at 128 dims ------------------------------------


@pytest.fixture(scope="module")
def matryoshka_run(tmp_path_factory, prepared_bundled):
    from pairtune.outputs.evaluation import run_evaluate
    from pairtune.outputs.export import run_export
    from pairtune.tracking import tracked_run
    from pairtune.train.training import train

    folder = tmp_path_factory.mktemp("matryoshka")
    uri = f"sqlite:///{folder}/mlflow.db"
    overrides = [*tracked_overrides(folder, prepared_bundled, "matryoshka", steps=4),
                 f"loss.matryoshka_dims=[{','.join(map(str, DIMS))}]", "export.dim=128"]
    settings = load_settings(compose_config(overrides))
    with tracked_run(settings, config=to_plain_dict(settings), overrides=overrides) as observer:
        result = train(settings, observer=observer)
    evaluated, exported = run_evaluate(settings), run_export(settings)
    mlflow.set_tracking_uri(uri)
    run = mlflow.search_runs(experiment_names=["matryoshka"], output_format="list")[0]
    return settings, result, evaluated, exported, run, folder


@pytest.mark.slow
def test_every_evaluation_scores_each_dim_and_mlflow_has_them(matryoshka_run):
    _, result, _, _, run, _ = matryoshka_run
    for row in result.rows:
        assert row.metrics["cosine_mrr@10_dim384"] == row.metrics["cosine_mrr@10"]  # the full width is the plain score
        assert {f"cosine_ndcg@10_dim{d}" for d in DIMS} <= set(row.metrics)
    last = result.rows[-1].metrics
    assert last["cosine_mrr@10_dim32"] < last["cosine_mrr@10_dim384"]  # 32 of 384 components lose something
    for dim in DIMS:
        assert run.data.metrics[f"eval_cosine_mrr_at_10_dim{dim}"] == pytest.approx(last[f"cosine_mrr@10_dim{dim}"])
    assert run.data.params["loss.matryoshka_dims"] == str(DIMS)


@pytest.mark.slow
def test_the_card_names_the_loss_and_tables_each_dim(matryoshka_run):
    settings, result, *_ = matryoshka_run
    card = (result.final_dir / "README.md").read_text()
    assert "<code>MatryoshkaLoss</code>" in card and '"loss": "MultipleNegativesRankingLoss"' in card
    assert '"matryoshka_dims": [' in card and '"n_dims_per_step": -1' in card
    last = result.rows[-1].metrics
    for dim in DIMS:
        row = f"| {dim} | {last[f'cosine_mrr@10_dim{dim}']:.4f} | {last[f'cosine_ndcg@10_dim{dim}']:.4f} | {dim * 4} |"
        assert row in card
    assert "# [3, 128]" in card  # the usage snippet's shape is the truncated one


@pytest.mark.slow
def test_the_test_split_is_scored_at_each_dim_and_the_final_model_as_it_serves(matryoshka_run):
    _, _, evaluated, *_ = matryoshka_run
    assert evaluated["final_truncate_dim"] == 128
    for label in ("base", "final"):
        assert {f"cosine_mrr_at_10_dim{d}" for d in DIMS} <= set(evaluated[label])
    assert evaluated["base"]["cosine_mrr_at_10_dim384"] == evaluated["base"]["cosine_mrr_at_10"]
    # the final model saved truncate_dim 128: its plain figures are its 128-dim ones
    assert evaluated["final"]["cosine_mrr_at_10"] == evaluated["final"]["cosine_mrr_at_10_dim128"]


@pytest.mark.slow
def test_the_saved_onnx_and_served_models_all_give_the_same_128_dims(matryoshka_run):
    from sentence_transformers import SentenceTransformer

    from pairtune.outputs.onnx_encoder import OnnxEncoder

    settings, result, _, exported, run, folder = matryoshka_run
    texts = ["Ada ? whr sh @ nit", "Ada wondered where the ship had gone that night.", "Bo run → riv"]
    assert json.loads((result.final_dir / "config_sentence_transformers.json").read_text())["truncate_dim"] == 128
    saved = SentenceTransformer(str(result.final_dir), device="cpu").encode(texts, normalize_embeddings=True)
    onnx = OnnxEncoder(settings.paths.onnx, variant="fp32").encode(texts)
    served = np.asarray(mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(texts))
    assert saved.shape == onnx.shape == served.shape == (3, 128)
    assert np.allclose(np.linalg.norm(onnx, axis=1), 1.0, atol=1e-5)  # the graph renormalises
    served = served / np.linalg.norm(served, axis=1, keepdims=True)  # truncated, not renormalised
    assert np.sum(onnx * saved, axis=1).min() > 0.9999 and np.sum(served * saved, axis=1).min() > 0.9999
    assert exported["cosine"]["fp32"]["min"] >= 0.9999
    meta = json.loads((folder / "onnx" / "pairtune_onnx.json").read_text())
    assert meta["embedding_dimension"] == meta["truncate_dim"] == 128


@pytest.mark.slow
def test_an_export_dim_the_final_model_was_not_saved_with_is_refused(matryoshka_run):
    from pairtune.outputs.export import run_export

    settings, *_ = matryoshka_run
    settings.export.dim = 64
    try:
        with pytest.raises(ConfigError, match="config key 'export.dim': 64 but .* has truncate_dim 128; rerun the train"):
            run_export(settings)
    finally:
        settings.export.dim = 128


@pytest.mark.slow
def test_the_dims_evaluator_encodes_each_text_once_and_scores_as_encoding_at_each_dim(base_model, prepared_bundled):
    from pairtune.data.pairs import Columns, load_prepared
    from pairtune.outputs.evaluation import build_dims_evaluator, build_evaluator, run_evaluator

    frame, columns = load_prepared(prepared_bundled)["eval"], Columns()
    calls = {"encode_query": 0, "encode_document": 0}
    for name in calls:
        real = getattr(base_model, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        setattr(base_model, name, counted)
    for model_dim in (None, 256):  # a model saved with truncate_dim scores as it serves, slices included
        base_model.truncate_dim = model_dim
        calls.update(encode_query=0, encode_document=0)
        metrics = run_evaluator(build_dims_evaluator(frame, columns, name="eval", dims=tuple(DIMS)), base_model)
        assert calls == {"encode_query": 1, "encode_document": 1}
        expected = run_evaluator(build_evaluator(frame, columns, name="eval"), base_model)
        assert {k: metrics[k] for k in expected} == expected
        for dim in DIMS:
            alone = run_evaluator(build_evaluator(frame, columns, name="eval", truncate_dim=dim), base_model)
            assert metrics[f"cosine_mrr@10_dim{dim}"] == alone["cosine_mrr@10"]
            assert metrics[f"cosine_ndcg@10_dim{dim}"] == alone["cosine_ndcg@10"]
