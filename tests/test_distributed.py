"""Distributed MNRL on CPU with 2 gloo processes equals one process with the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pairtune.data.batching import tokenize_columns
from pairtune.model.losses import mnrl_loss, mnrl_scores
from pairtune.model.modeling import load_model

from .conftest import ROOT, free_port

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun(*args: str, cwd=ROOT) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*TORCHRUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]


def single_process_reference(hard_negatives: bool) -> dict:
    frame = pd.read_json(ROOT / "data/raw/pairs.jsonl", lines=True).head(32)
    columns = [frame["sentence_0"].tolist(), frame["sentence_1"].tolist()]
    if hard_negatives:
        columns.append(frame["sentence_1"].tolist()[1:] + frame["sentence_1"].tolist()[:1])
    model = load_model("sentence-transformers/all-MiniLM-L6-v2", max_seq_length=256, dropout=0.0)
    batch = tokenize_columns(model.tokenizer, columns, max_length=256).batch(list(range(32)))
    embeddings = [model(features)["sentence_embedding"] for features in batch]
    loss = mnrl_loss(embeddings[0], embeddings[1:], scale=20.0, similarity="cosine", gather=False)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.item(), "grads": grads}


def max_relative_gradient_gap(left: dict, right: dict) -> float:
    """Largest |difference| over all gradients, relative to the largest gradient entry."""
    assert left.keys() == right.keys()
    scale = max(g.abs().max().item() for g in right.values())
    return max((left[n] - right[n]).abs().max().item() for n in right) / scale


@pytest.mark.slow
@pytest.mark.parametrize("hard_negatives", [False, True], ids=["pairs", "hard-negatives"])
def test_two_processes_with_gathering_equal_one_big_batch(tmp_path, hard_negatives):
    out = tmp_path / "rank0.pt"
    torchrun("tests/distributed_worker.py", str(out), "gather", "negatives" if hard_negatives else "pairs")
    distributed = torch.load(out)
    reference = single_process_reference(hard_negatives)
    assert distributed["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    gap = max_relative_gradient_gap(distributed["grads"], reference["grads"])
    print(f"max relative gradient gap ({'hard negatives' if hard_negatives else 'pairs'}): {gap:.2e}")
    assert gap < 1e-5
    columns = 3 if hard_negatives else 2
    assert distributed["scores_shape"] == (16, 32 * (columns - 1))


@pytest.mark.slow
def test_without_gathering_each_anchor_sees_only_local_candidates(tmp_path):
    out = tmp_path / "rank0.pt"
    torchrun("tests/distributed_worker.py", str(out), "local")
    assert torch.load(out)["scores_shape"] == (16, 16)


def test_single_process_scores_are_local_when_gathering():
    """Outside torchrun, gathering is the identity: the score matrix is the local one."""
    anchors, positives = torch.randn(4, 8), torch.randn(4, 8)
    scores, labels = mnrl_scores(anchors, [positives], scale=20.0, similarity="cosine", gather=True)
    assert scores.shape == (4, 4) and labels.tolist() == [0, 1, 2, 3]


def step_history(uri: str, run_name: str, key: str) -> list[float]:
    import mlflow

    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["pairtune"], filter_string=f"attributes.run_name = '{run_name}'",
                                output_format="list")
    return [m.value for m in sorted(mlflow.MlflowClient().get_metric_history(run.info.run_id, key),
                                    key=lambda m: m.step)]


@pytest.mark.slow
def test_two_process_training_matches_one_process_weights(tmp_path, prepared_bundled):
    """Losses, gradient norms and weights of 3 steps: 2 x 16 gathered equals 1 x 32.

    With AdamW and clipping the weights barely notice a gradient scaled by the world size (a sum instead of
    a mean across processes, or a dropped division): the pre-clip gradient norm does, by a factor of 2, and
    the losses after the first update drift. So all three are compared, each at a tolerance far below what
    such a bug moves it by (checked by breaking the gradient averaging once: grad norms then differ by 2x).
    """
    uri = f"sqlite:///{tmp_path}/store.db"
    common = [
        f"paths.prepared={prepared_bundled}", "model.dropout=0.0", "train.max_steps=3", "train.epochs=1",
        "train.eval_on_start=false", "train.save_checkpoints=false", f"tracking.uri={uri}", "tracking.log_model=false",
        f"paths.reports={tmp_path}/reports", f"hydra.run.dir={tmp_path}/hydra", "guard.enabled=false",
    ]
    torchrun("pipelines/train.py", *common, "train.batch_size=16", "loss.gather_across_devices=true",
             f"paths.model={tmp_path}/ddp", "tracking.run_name=ddp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "pipelines/train.py", *common, "train.batch_size=32", f"paths.model={tmp_path}/one",
                    "tracking.run_name=one"], cwd=ROOT, env=env, check=True, capture_output=True)
    for key, tolerance in (("train_loss", 1e-5), ("grad_norm", 1e-4)):
        ddp, one = step_history(uri, "ddp", key), step_history(uri, "one", key)
        print(f"{key}: 2 processes {ddp}, 1 process {one}")
        assert len(ddp) == len(one) == 3 and ddp == pytest.approx(one, rel=tolerance), key
    ddp, one = load_file(tmp_path / "ddp/model.safetensors"), load_file(tmp_path / "one/model.safetensors")
    gap = max((ddp[k] - one[k]).abs().max().item() for k in one)
    print(f"max weight difference after 3 steps: {gap:.2e}")
    assert gap < 1e-5  # an update moves a weight by about lr = 5e-5 a step
    card = (tmp_path / "ddp/README.md").read_text()
    assert "`world_size`: 2" in card and "`global_batch_size`: 32" in card


@pytest.mark.slow
def test_cached_mnrl_does_one_gradient_allreduce_per_step(tmp_path):
    """A DDP communication hook counts the bucket all-reduces of one step's backward on 2 processes."""
    out = tmp_path / "counts.pt"
    torchrun("tests/distributed_worker.py", str(out), "allreduce")
    counts = torch.load(out)
    print(f"bucket all-reduces per step: {counts}")
    assert counts["plain_sync"] > 0 and counts["plain_no_sync"] == 0
    # 16 rows per process in mini-batches of 4: 8 re-embedding passes, and still one all-reduce of the buckets
    assert counts["cached_mini4_sync"] == counts["plain_sync"]
    assert counts["cached_mini4_no_sync"] == 0


def launch_two_nodes(tmp_path, *args: str) -> list[str]:
    """Two separate torchrun launchers, one process each, meeting at a c10d rendezvous: two "machines"."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    port = free_port()
    procs = []
    for node in (0, 1):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
            "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "pipelines/train.py", *args, "guard.enabled=false", f"paths.checkpoints={tmp_path}/ckpt-node{node}",
            f"hydra.run.dir={tmp_path}/hydra-node{node}",
        ]
        log = (tmp_path / f"node{node}.log").open("w")
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [proc.wait(timeout=600) for proc in procs]
    logs = [(tmp_path / f"node{node}.log").read_text() for node in (0, 1)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    return logs


@pytest.mark.slow
def test_two_nodes_without_a_shared_disk_train_resume_and_track_one_run(tmp_path, prepared_bundled):
    import mlflow

    uri = f"sqlite:///{tmp_path}/store.db"
    common = [
        f"paths.prepared={prepared_bundled}", f"paths.model={tmp_path}/model", f"paths.reports={tmp_path}/reports",
        "train.batch_size=16", "loss.gather_across_devices=true", "train.epochs=1", "train.max_steps=3",
        "train.eval_on_start=false", "train.shared_filesystem=false", f"tracking.uri={uri}",
        "tracking.log_model=false", "tracking.run_name=two-nodes",
    ]
    # Given two "machines", each with its own checkpoint folder, trained to the end
    launch_two_nodes(tmp_path, *common)
    assert (tmp_path / "model/model.safetensors").is_file()
    card = (tmp_path / "model/README.md").read_text()
    assert "`world_size`: 2" in card and "`global_batch_size`: 32" in card
    # Then each node kept a whole checkpoint of its own: weights, optimizer and its own RNG state
    states = []
    for node in (0, 1):
        (step,) = (tmp_path / f"ckpt-node{node}").glob("step-*")
        files = {p.name for p in step.iterdir()}
        assert {"model.safetensors", "optimizer.bin", "pairtune_state.json"} <= files, files
        states += [name for name in files if name.startswith("random_states_")]
    assert sorted(states) == ["random_states_0.pkl", "random_states_1.pkl"]
    # When both resume, each from its own folder: nothing is left to train, the run is reopened and finished
    launch_two_nodes(tmp_path, *common, "train.resume=true")
    mlflow.set_tracking_uri(uri)
    (run,) = mlflow.search_runs(experiment_names=["pairtune"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.tags["pairtune.resumed_from_step"] == "3"
    assert sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")) == [1, 2, 3]


@pytest.mark.slow
def test_the_slurm_preset_sweeps_through_submitit_locally(tmp_path, prepared_bundled):
    """hydra/launcher=slurm_local: the slurm preset's jobs run by submitit's local executor, one parent run."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/store.db"
    done = subprocess.run(
        [sys.executable, "pipelines/train.py", "-m", "hydra/launcher=slurm_local", "train.lr=1e-5,2e-5",
         "experiment=smoke", "train.max_steps=1", "train.eval_on_start=false", "tracking.log_model=false",
         "guard.enabled=false",
         f"tracking.uri={uri}", f"paths.prepared={prepared_bundled}", f"paths.model={tmp_path}/model",
         f"paths.reports={tmp_path}/reports", f"hydra.sweep.dir={tmp_path}/multirun"],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Submitit 'local' sweep output dir" in done.stdout + done.stderr
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["pairtune"], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("pairtune.stage") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children)
    assert sorted(c.data.params["train.lr"] for c in children) == ["1e-05", "2e-05"]
    assert (tmp_path / "multirun/.submitit").is_dir()  # the jobs really went through submitit
