from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from pairtune.config import DataConfig
from pairtune.data.pairs import (
    Columns,
    PairDataError,
    PairSource,
    check_disjoint,
    drop_duplicate_pairs,
    read_pairs,
    read_source,
    split_pairs,
    write_prepared,
)

from .conftest import BUNDLED

COLUMNS = Columns()
OPERATORS = [":", "|", "@", "*", "→", "^", "\\", "?", "!", "~", "¬"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def pairs(n: int) -> list[dict]:
    return [{"sentence_0": f"note {i}", "sentence_1": f"sentence {i}"} for i in range(n)]


def test_reads_and_strips_jsonl_csv_and_parquet(tmp_path):
    rows = [{"sentence_0": "  Ada see sh ", "sentence_1": "Ada saw the ship.\t"}]
    frames = [read_pairs(write_jsonl(tmp_path / "p.jsonl", rows), COLUMNS)]
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    frames += [read_pairs(tmp_path / "p.csv", COLUMNS), read_pairs(tmp_path / "p.parquet", COLUMNS)]
    for frame in frames:
        assert frame.to_dict("records") == [{"sentence_0": "Ada see sh", "sentence_1": "Ada saw the ship."}]


def test_configurable_column_names(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"q": "a b c", "d": "x", "n": "y"}])
    frame = read_pairs(path, Columns("q", "d", "n"))
    assert list(frame.columns) == ["q", "d", "n"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"sentence_0": "a", "sentence_1": "b"}\n{"sentence_0": "a"', r"row 2: malformed JSON"),
        (b'{"sentence_0": "a", "sentence_1": "b"}\n{"sentence_0": "\xff", "sentence_1": "b"}\n', r"row 2: invalid UTF-8"),
        (b'{"sentence_0": "a", "sentence_1": "  "}\n', r"row 1: column 'sentence_1' is empty"),
        (b'{"sentence_0": null, "sentence_1": "b"}\n', r"row 1: column 'sentence_0' is null"),
        (b'{"sentence_0": "a", "other": "b"}\n', r"missing column 'sentence_1'"),
    ],
)
def test_bad_jsonl_names_file_row_and_problem(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(PairDataError, match=rf"^{re.escape(str(path))}: {message}"):
        read_pairs(path, COLUMNS)


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(PairDataError, match="file not found"):
        read_pairs(tmp_path / "nope.jsonl", COLUMNS)
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(PairDataError, match="unknown format '.txt'"):
        read_pairs(tmp_path / "p.txt", COLUMNS)


def test_csv_with_the_wrong_delimiter_is_named(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("sentence_0;sentence_1\na b;c d\n")
    with pytest.raises(PairDataError, match="missing column 'sentence_0'.*wrong CSV delimiter"):
        read_pairs(path, COLUMNS)


def test_exact_duplicates_are_dropped_and_counted():
    frame = pd.DataFrame(pairs(3) + pairs(2))
    deduped, dropped = drop_duplicate_pairs(frame)
    assert (len(deduped), dropped) == (3, 2)


def test_split_sizes_are_exact_and_deterministic():
    frame = pd.DataFrame(pairs(370))
    first = split_pairs(frame, COLUMNS, train_size=263, eval_size=45, seed=42, source="x")
    again = split_pairs(frame, COLUMNS, train_size=263, eval_size=45, seed=42, source="x")
    other = split_pairs(frame, COLUMNS, train_size=263, eval_size=45, seed=1, source="x")
    assert {k: len(v) for k, v in first.items()} == {"train": 263, "eval": 45, "test": 62}
    assert all(first[k].equals(again[k]) for k in first)
    assert not first["train"].equals(other["train"])


def test_fractions_are_accepted():
    split = split_pairs(pd.DataFrame(pairs(100)), COLUMNS, train_size=0.8, eval_size=0.1, seed=0, source="x")
    assert {k: len(v) for k, v in split.items()} == {"train": 80, "eval": 10, "test": 10}


def test_a_shared_note_never_straddles_two_splits():
    rows = pairs(60) + [{"sentence_0": "note 1", "sentence_1": f"other {i}"} for i in range(5)]
    split = split_pairs(pd.DataFrame(rows), COLUMNS, train_size=40, eval_size=10, seed=0, source="x")
    check_disjoint(split, COLUMNS)
    homes = [name for name, frame in split.items() if (frame["sentence_0"] == "note 1").any()]
    assert len(homes) == 1


def texts_by_split(split: dict[str, pd.DataFrame], columns: list[str]) -> dict[str, set[str]]:
    return {name: {text for c in columns for text in frame[c]} for name, frame in split.items()}


@pytest.mark.parametrize("seed", range(8))
def test_a_text_that_is_one_rows_sentence_and_anothers_note_stays_in_one_split(seed):
    # Given 20 rows whose sentence is also the next row's note (a chain across the columns) among 40 others
    chain = [{"sentence_0": f"link {i}", "sentence_1": f"link {i + 1}"} for i in range(20)]
    rows = pairs(40) + chain
    # When they are split
    split = split_pairs(pd.DataFrame(rows), COLUMNS, train_size=30, eval_size=15, seed=seed, source="x")
    # Then no text, in whichever column, is in two splits, and the final check agrees
    homes = texts_by_split(split, ["sentence_0", "sentence_1"])
    assert all(not (homes[a] & homes[b]) for a, b in (("train", "eval"), ("train", "test"), ("eval", "test")))
    assert sum(len(frame) for frame in split.values()) == 60
    check_disjoint(split, COLUMNS)


def test_check_disjoint_catches_a_text_that_changed_column_between_splits():
    train = pd.DataFrame([{"sentence_0": "a", "sentence_1": "b"}])
    test = pd.DataFrame([{"sentence_0": "b", "sentence_1": "c"}])
    with pytest.raises(PairDataError, match=r"text in both 'train' \(column 'sentence_1'\) and 'test' \(column 'sentence_0'\): 'b'"):
        check_disjoint({"train": train, "eval": pd.DataFrame(pairs(1)), "test": test}, COLUMNS)


def test_an_empty_split_is_refused():
    with pytest.raises(PairDataError, match="split 'test' would be empty"):
        split_pairs(pd.DataFrame(pairs(50)), COLUMNS, train_size=40, eval_size=10, seed=0, source="p.jsonl")


def test_check_disjoint_catches_a_leak():
    leak = {"train": pd.DataFrame(pairs(2)), "eval": pd.DataFrame(pairs(1)), "test": pd.DataFrame(pairs(0))}
    with pytest.raises(PairDataError, match=r"in both 'train' \(column 'sentence_0'\) and 'eval' \(column 'sentence_0'\)"):
        check_disjoint(leak, COLUMNS)


def test_a_failed_write_keeps_the_old_folder(tmp_path, monkeypatch):
    target = tmp_path / "prepared"
    good = {name: pd.DataFrame(pairs(2)) for name in ("train", "eval", "test")}
    write_prepared(target, good, {"rows": 2})
    monkeypatch.setattr(pd.DataFrame, "to_parquet", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_prepared(target, good, {"rows": 3})
    assert json.loads((target / "stats.json").read_text()) == {"rows": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_bundled_data_speaks_the_notation():
    frame = read_pairs(BUNDLED, COLUMNS)
    assert len(frame) >= 353
    assert frame["sentence_0"].is_unique and frame["sentence_1"].is_unique
    lengths = frame["sentence_0"].str.split(" ").map(len)
    assert lengths.min() >= 3 and lengths.max() <= 14
    text = " ".join(frame["sentence_0"])
    assert all(op in text for op in OPERATORS)


def test_prepare_cli_refuses_bad_input_and_leaves_prepared_untouched(tmp_path):
    import subprocess
    import sys

    from .conftest import ROOT

    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "train.parquet").write_text("the good old split")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"sentence_0": "a b c", "sentence_1": "x"}\n{"sentence_0": "a b\n')
    done = subprocess.run(
        [sys.executable, "pipelines/prepare.py", f"data.source={bad}", f"paths.prepared={prepared}",
         f"hydra.run.dir={tmp_path}/h"], cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"pairtune: error: {bad}: row 2: malformed JSON")
    assert sorted(p.name for p in prepared.iterdir()) == ["train.parquet"]
    assert (prepared / "train.parquet").read_text() == "the good old split"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "h", "prepared"]


def test_fewer_training_pairs_than_one_batch_is_refused(make_settings, tmp_path):
    from pairtune.data.preparation import run_prepare

    source = write_jsonl(tmp_path / "few.jsonl", pairs(40))
    settings = make_settings(f"data.source={source}", "data.train_size=20", "data.eval_size=10")
    with pytest.raises(PairDataError, match="20 training pairs, fewer than one batch"):
        run_prepare(settings)
    assert not Path(settings.paths.prepared).exists()


def test_texts_over_max_seq_length_are_counted_with_a_warning(make_settings, tmp_path, caplog):
    from pairtune.data.preparation import run_prepare

    rows = pairs(60)
    rows[0]["sentence_1"] = "word " * 40
    source = write_jsonl(tmp_path / "long.jsonl", rows)
    settings = make_settings(f"data.source={source}", "data.train_size=40", "data.eval_size=10",
                             "train.batch_size=8", "model.max_seq_length=16")
    stats = run_prepare(settings)
    assert stats["texts_over_max_seq_length"] == 1
    assert "1 texts are longer than model.max_seq_length=16 tokens" in caplog.text


# -- datasets sources -------------------------------------------------------------------------------------


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """An empty datasets cache under tmp_path: tests never read or fill the user's own."""
    import datasets

    cache = tmp_path / "hf-datasets-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def source_of(**data) -> PairSource:
    return PairSource.of(DataConfig(**data))


def write_repository(folder: Path) -> Path:
    """A dataset repository as on the hub: parquet files and a README whose YAML maps subsets and splits."""
    (folder / "data").mkdir(parents=True)
    pd.DataFrame({"q": ["note a", "note b", "note c"], "d": ["one a", "one b", "one c"]}).to_parquet(
        folder / "data/train-00000.parquet")
    pd.DataFrame({"q": ["held out"], "d": ["test doc"]}).to_parquet(folder / "data/test-00000.parquet")
    pd.DataFrame({"q": ["other note"], "d": ["  other doc "]}).to_parquet(folder / "data/other.parquet")
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n"
        "  - split: test\n    path: data/test-*.parquet\n- config_name: other\n  data_files:\n"
        "  - split: train\n    path: data/other.parquet\n---\n# pairs\n"
    )
    return folder


def test_a_save_to_disk_folder_is_read_mapped_and_stripped(tmp_path, datasets_cache):
    from datasets import Dataset, DatasetDict

    rows = {"question": ["  Ada see sh ", "note b"], "answer": ["Ada saw the ship.\t", "sentence b"], "id": [1, 2]}
    Dataset.from_dict(rows).save_to_disk(tmp_path / "one")
    DatasetDict({"train": Dataset.from_dict(rows), "dev": Dataset.from_dict({**rows, "answer": ["x", " "]})}).save_to_disk(
        tmp_path / "dict")
    columns = Columns("question", "answer")

    frame, source = read_source(source_of(source=str(tmp_path / "one")), columns)
    assert frame.to_dict("records")[0] == {"question": "Ada see sh", "answer": "Ada saw the ship."}
    assert source.as_dict() == {"kind": "save_to_disk", "id": str(tmp_path / "one"), "revision": None,
                                "subset": None, "split": None}  # one Dataset: read whole, no split
    frame, source = read_source(source_of(source=str(tmp_path / "dict")), columns)
    assert (len(frame), source.split) == (2, "train")
    with pytest.raises(PairDataError, match=rf"^{re.escape(str(tmp_path / 'dict'))} split dev: row 2: column 'answer' is empty$"):
        read_source(source_of(source=str(tmp_path / "dict"), split="dev"), columns)
    with pytest.raises(PairDataError, match=r"no split 'test' \(found: train, dev\); set data.split$"):
        read_source(source_of(source=str(tmp_path / "dict"), split="test"), columns)


def test_a_dataset_repository_folder_is_read_by_split_and_subset(tmp_path, datasets_cache):
    repo = str(write_repository(tmp_path / "repo"))
    columns = Columns("q", "d")

    train, source = read_source(source_of(source=repo), columns)
    test, test_source = read_source(source_of(source=repo, split="test"), columns)
    other, _ = read_source(source_of(source=repo, subset="other"), columns)
    assert train["q"].tolist() == ["note a", "note b", "note c"]
    assert test.to_dict("records") == [{"q": "held out", "d": "test doc"}]
    assert other.to_dict("records") == [{"q": "other note", "d": "other doc"}]
    assert source.as_dict() == {"kind": "hub", "id": repo, "revision": None, "subset": None, "split": "train"}
    assert test_source.split == "test"
    assert datasets_cache.is_dir()  # the Arrow cache went where datasets was told, not to the user's cache
    with pytest.raises(PairDataError, match=rf"^{re.escape(repo)} split train: missing column 'sentence_0' \(found: q, d\)$"):
        read_source(source_of(source=repo), Columns())
    with pytest.raises(PairDataError, match=r"Unknown split \"dev\".*\(data.subset=None, data.split=dev\)$"):
        read_source(source_of(source=repo, split="dev"), columns)


def test_a_folder_that_is_no_dataset_is_named(tmp_path, datasets_cache):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "model.bin").write_bytes(b"\0")
    with pytest.raises(PairDataError, match=rf"^{re.escape(str(folder))}: neither a save_to_disk folder .* nor a "
                       r"dataset repository \(no data files datasets can read\)$"):
        read_source(source_of(source=str(folder)), COLUMNS)
    with pytest.raises(PairDataError, match=r"^a/b/c: no such file or folder, and not a dataset id$"):
        source_of(source="a/b/c")
    assert source_of(source=str(tmp_path / "missing.csv")).kind == "file"  # read_pairs says "file not found"


def test_an_uncached_dataset_offline_is_one_line_naming_it(tmp_path, monkeypatch):
    import subprocess
    import sys

    from .conftest import ROOT

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    done = subprocess.run(
        [sys.executable, "pipelines/prepare.py", "data.source=pairtune-test/no-such-pairs",
         f"paths.prepared={tmp_path}/prepared", f"hydra.run.dir={tmp_path}/h"], cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "pairtune: error: pairtune-test/no-such-pairs: not in the local datasets cache and the hub is offline "
        "(HF_HUB_OFFLINE=1); download it once online or point data.source at a file"
    )
    assert not (tmp_path / "prepared").exists()


def test_prepare_cli_reads_a_save_to_disk_folder_without_heavy_imports(tmp_path, monkeypatch):
    import subprocess
    import sys

    from datasets import Dataset

    from .conftest import ROOT
    from .test_house import HEAVY, imported_modules

    frame = read_pairs(BUNDLED, COLUMNS).rename(columns={"sentence_0": "note", "sentence_1": "sentence"})
    Dataset.from_pandas(frame).save_to_disk(tmp_path / "saved")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "pipelines/prepare.py", f"data.source={tmp_path}/saved",
         "data.anchor_column=note", "data.positive_column=sentence", f"paths.prepared={tmp_path}/prepared",
         f"hydra.run.dir={tmp_path}/h"], cwd=ROOT, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((tmp_path / "prepared/stats.json").read_text())
    assert stats["rows"] == {"train": 263, "eval": 45, "test": 62}
    assert stats["lineage"] == {"kind": "save_to_disk", "id": f"{tmp_path}/saved", "revision": None, "subset": None,
                                "split": None}
    assert list(pd.read_parquet(tmp_path / "prepared/train.parquet").columns) == ["note", "sentence"]
    assert "datasets" in imported_modules(done.stderr)
    assert not imported_modules(done.stderr) & set(HEAVY), sorted(imported_modules(done.stderr) & set(HEAVY))
