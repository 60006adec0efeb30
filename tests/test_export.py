"""ONNX export of the real base model: layout, dynamic axes, parity with PyTorch, torch-free serving."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pairtune.outputs.export import SmoothedLinear, apply_smoothing, export_onnx, measure_parity
from pairtune.outputs.onnx_encoder import OnnxEncoder, variant_path

SHORTHAND = [
    "Ada ? whr sh @ 3 hou",
    "Tomas : fix net | bef dawn",
    "ship → port @ 2 day ~ fog",
    "Lena ! lost key @ mkt",
    "Ferro ask : who own boat ?",
    "rain ¬ stop | 4 hou",
    "Ada tel Tomas : mee @ dock",
    "old man sel fish @ 6 am",
    "brg → cls ~ stm",
    "Kit : hun \\ too",
    "Ida chk lam @ 1 yea",
    "Jory gui barge → qua @ 9 hou",
    "mkt cls @ noon | no brd",
    "Ada ? Lena : cal \\ hus",
    "fog @ Pike Head | chi rin ~ 2 mom",
    "Orrin sho ! fir @ mill",
    "pol ? whr Jessa",
    "tide hi @ 11 | nets out",
    "Bren owe 3 coin → Ada",
    "lt hse dark ~ 2 nit",
]
PROSE = [
    "Ada wondered where she had been for the last three hours.",
    "Tomas promised to mend the nets before the sun came up.",
    "The ship would reach the port in two days if the fog lifted.",
    "Lena realised she had dropped her key somewhere in the market.",
    "Ferro asked around the harbour, trying to learn who owned the little blue boat.",
    "The rain kept falling for four hours without a pause.",
    "An old man sold fish from a wooden cart every morning at six.",
    "The bridge was closed because of the storm.",
    "Every spring the river flooded the low fields beside the village.",
    "She kept a lamp burning in the window so the boats could find the channel.",
    "The committee will publish its findings once the audit is complete.",
    "Prices rose sharply after the harvest failed for a second year.",
    "He could not remember the name of the inn where they had stayed.",
    "The lighthouse had been dark for two nights, and nobody knew why.",
    "Children ran along the sea wall, shouting at the gulls.",
    "The letter arrived a week late, its envelope soaked through.",
    "A quiet street, a closed shop, and a cat asleep on the step.",
    "Bren still owed Ada three coins from the card game last winter.",
    "The ferry timetable changes on the first Monday of each month.",
    "Nobody expected the mill to reopen after the fire.",
]
# Longer than max_seq_length (256) in tokens: the torch-free tokenizer must truncate exactly as PyTorch does.
LONG = " ".join(PROSE * 3)
SENTENCES = SHORTHAND + PROSE + [LONG]


@pytest.fixture(scope="module")
def base_model_dir(base_model_session, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("export") / "model"
    base_model_session.save(str(folder))
    return folder


@pytest.fixture(scope="module")
def exported(base_model_dir: Path) -> tuple[Path, dict]:
    """One export for the module, into an out_dir that already holds a stale export (see the replace test)."""
    out_dir = base_model_dir.parent / "onnx_out"
    (out_dir / "onnx").mkdir(parents=True)
    (out_dir / "stale.txt").write_text("from an earlier export\n")
    (out_dir / "onnx" / "model_old.onnx").write_bytes(b"not a model")
    return out_dir, export_onnx(base_model_dir, out_dir)


@pytest.mark.slow
def test_export_writes_the_sentence_transformers_onnx_layout(exported):
    out_dir, result = exported

    for name in (
        "onnx/model.onnx",
        "onnx/model_qint8_avx2.onnx",
        "tokenizer.json",
        "tokenizer_config.json",
        "pairtune_onnx.json",
    ):
        assert (out_dir / name).is_file(), name
    meta = json.loads((out_dir / "pairtune_onnx.json").read_text())
    assert meta["max_seq_length"] == 256
    assert (meta["pooling"], meta["normalize"], meta["embedding_dimension"]) == ("mean", True, 384)
    assert meta["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert result["files"]["int8"] == str(out_dir / "onnx" / "model_qint8_avx2.onnx")
    assert 80 < result["size_mb"]["fp32"] < 95  # MiniLM-L6: 22.7M fp32 parameters
    assert result["size_mb"]["int8"] < result["size_mb"]["fp32"] / 3


@pytest.mark.slow
def test_export_replaces_an_existing_out_dir_whole(exported):
    out_dir, _ = exported

    assert not (out_dir / "stale.txt").exists()
    assert sorted(p.name for p in (out_dir / "onnx").iterdir()) == ["model.onnx", "model_qint8_avx2.onnx"]
    assert not [p.name for p in out_dir.parent.iterdir() if p.name.startswith(".onnx_out")]  # no staging left


@pytest.mark.slow
def test_failed_export_leaves_the_existing_out_dir_untouched(base_model_dir, tmp_path):
    pooling = json.loads((base_model_dir / "1_Pooling" / "config.json").read_text())
    out_dir = tmp_path / "onnx_out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("previous export\n")
    broken = tmp_path / "broken_model"
    broken.mkdir()
    for item in base_model_dir.iterdir():
        (broken / item.name).symlink_to(item, target_is_directory=item.is_dir())
    (broken / "1_Pooling").unlink()
    (broken / "1_Pooling").mkdir()
    (broken / "1_Pooling" / "config.json").write_text(json.dumps(pooling | {"pooling_mode": "cls"}))

    with pytest.raises(ValueError, match="only mean pooling"):
        export_onnx(broken, out_dir)

    assert [p.name for p in out_dir.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken_model", "onnx_out"]


@pytest.mark.slow
def test_graph_has_dynamic_batch_and_sequence_axes(exported, base_model_session):
    out_dir, _ = exported
    graph = onnx.load(str(out_dir / "onnx" / "model.onnx")).graph
    encoder = OnnxEncoder(out_dir, variant="fp32")

    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    one = encoder.encode(["Ada ? whr sh @ 3 hou"])
    five = encoder.encode(SHORTHAND[:2] + PROSE[:2] + [LONG])

    assert dims == {name: ["batch", "sequence"] for name in ("input_ids", "attention_mask", "token_type_ids")}
    assert one.shape == (1, 384) and five.shape == (5, 384)
    assert five.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(five, axis=1), 1.0, atol=1e-5)
    torch_five = base_model_session.encode(SHORTHAND[:2] + PROSE[:2] + [LONG], normalize_embeddings=True)
    np.testing.assert_allclose(five, torch_five, atol=1e-4)


@pytest.mark.slow
def test_onnx_matches_pytorch_per_sentence(exported, base_model_dir):
    out_dir, _ = exported

    report = measure_parity(base_model_dir, out_dir, SENTENCES, batch_size=32)

    assert report["sentences"] == len(SENTENCES) == 41
    assert report["cosine"]["fp32"]["min"] >= 0.9999
    assert report["cosine"]["int8"]["min"] >= 0.99
    assert set(report["throughput"]) == {"torch", "onnx_fp32", "onnx_int8"}
    assert all(value > 0 for value in report["throughput"].values())
    assert set(report["speedup_vs_torch"]) == {"onnx_fp32", "onnx_int8"}


@pytest.mark.slow
def test_encode_keeps_input_order_across_batches(exported):
    out_dir, _ = exported
    encoder = OnnxEncoder(out_dir, variant="fp32", threads=1)

    together = encoder.encode(SENTENCES, batch_size=4)  # sorted by length inside, so batches mix the list
    alone = np.stack([encoder.encode([text])[0] for text in SENTENCES[::10]])

    np.testing.assert_allclose(together[::10], alone, atol=1e-4)


@pytest.mark.slow
def test_sessions_sleep_between_runs_unless_asked_to_spin(exported):
    out_dir, _ = exported
    key = "session.intra_op.allow_spinning"
    quiet = OnnxEncoder(out_dir, variant="int8", threads=1)
    busy = OnnxEncoder(out_dir, variant="int8", threads=1, spin=True)
    assert quiet.session.get_session_options().get_session_config_entry(key) == "0"
    assert busy.session.get_session_options().get_session_config_entry(key) == "1"
    np.testing.assert_array_equal(quiet.encode(SENTENCES[:8]), busy.encode(SENTENCES[:8]))


def test_unknown_variant_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown ONNX variant 'fp16'"):
        variant_path(tmp_path, "fp16")


def test_onnx_encoder_imports_without_torch():
    code = (
        "import sys, pairtune.outputs.onnx_encoder; "
        "loaded = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_smoothing_leaves_the_fp32_encoder_unchanged(base_model):
    texts = SHORTHAND[:4] + PROSE[:4]
    before = base_model.encode(texts, normalize_embeddings=True)

    apply_smoothing(base_model, PROSE[4:12], alpha=0.7)
    after = base_model.encode(texts, normalize_embeddings=True)

    np.testing.assert_allclose(after, before, atol=1e-5)
    layer = base_model[0].auto_model.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, SmoothedLinear)
    assert isinstance(layer.attention.output.dense, torch.nn.Linear)  # folded into the value projection
