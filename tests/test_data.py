"""Data: tokenizers, text sources, the token cache, deterministic split and sampling, synthetic tasks, the DataModule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ternkit.errors import TernkitError
from ternkit.recipe import recipe_from_dict
from ternkit.data import sources as S
from ternkit.data import tasks as D
from ternkit.data import (
    IGNORE_INDEX, StepBatches, TokenDataset, batch_indices, mqar_examples, parity_examples, prepare_text_data,
    split_documents, text_source,
)
from ternkit.train.data import TernkitDataModule
from ternkit.tokenizer import ByteTokenizer, HFTokenizer, build_tokenizer, load_tokenizer, train_bpe

SAMPLE = "def f(x):\n    return x * 2  # héllo wörld €\n"


def _recipe(tmp_path: Path, **data):
    return recipe_from_dict({"name": "t", "data": {"cache_dir": str(tmp_path / "cache"), **data},
                             "model": {"context_length": 16}, "trainer": {"batch_size": 4, "val_batches": 2}})


def _files(tmp_path: Path) -> list[str]:
    (tmp_path / "a.txt").write_text("alpha line one\nalpha line two\n")
    with open(tmp_path / "b.jsonl", "w") as fh:
        for i in range(3):
            fh.write(json.dumps({"text": f"json document number {i}", "id": i}) + "\n")
    return [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")]


# ---------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_hf_compatible(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(SAMPLE)
    assert ids == list(SAMPLE.encode("utf-8")) and max(ids) < 256 and tok.decode(ids) == SAMPLE
    path = tok.save(tmp_path)
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(path))  # the saved file is a real HF tokenizer with id = byte value
    assert hf.encode(SAMPLE).ids == ids and hf.decode(ids) == SAMPLE
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_bpe_train_save_load(tmp_path: Path) -> None:
    corpus = [f"def function_{i % 7}(value):\n    return value + {i}\n" for i in range(200)]
    tok = train_bpe(corpus, vocab_size=400, min_frequency=2)
    assert 257 < tok.vocab_size <= 400 and tok.eos_id == 0
    ids = tok.encode(SAMPLE)
    assert tok.decode(ids) == SAMPLE  # byte-level: any text round-trips
    assert len(tok.encode(corpus[3])) < len(corpus[3].encode()) / 2  # merges compress the training text
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(again, HFTokenizer) and again.encode(SAMPLE) == ids and again.vocab_size == tok.vocab_size
    cfg = recipe_from_dict({"tokenizer": {"kind": "file", "path": str(tmp_path)}}).tokenizer
    assert build_tokenizer(cfg, None, tmp_path / "copy").encode(SAMPLE) == ids
    missing = recipe_from_dict({"tokenizer": {"kind": "file", "path": str(tmp_path / "nope")}}).tokenizer
    with pytest.raises(TernkitError, match="not found"):
        build_tokenizer(missing, None, tmp_path / "x")


# -------------------------------------------------------------------------------------- sources


def test_stdlib_source_gives_real_python(tmp_path: Path) -> None:
    cfg = recipe_from_dict({"data": {"source": "stdlib", "max_chars": 200_000}}).data
    src = text_source(cfg, tmp_path)
    docs = list(src.documents())
    text = "".join(docs)
    assert len(text) == 200_000 and len(docs) > 3
    assert "def " in text and "import " in text and "return" in text
    assert "site-packages" not in json.dumps(src.fingerprint["files"])
    assert "".join(text_source(cfg, tmp_path).documents()) == text  # deterministic


def test_files_source_txt_and_jsonl(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    r = _recipe(tmp_path, source="files", paths=paths, val_fraction=0.2)
    td = prepare_text_data(r.data, r.tokenizer, tmp_path / "cache")
    docs = ["alpha line one\nalpha line two\n"] + [f"json document number {i}" for i in range(3)]
    assert td.meta["documents"] == 4 and td.meta["split"] == "stream"  # few documents: split the token stream
    stream = np.concatenate([np.asarray(td.train), np.asarray(td.val)])
    assert stream.size == sum(len(d.encode()) + 1 for d in docs)  # every document plus its end-of-document id
    assert td.tokenizer.decode(stream.tolist()).split("\x00")[:-1] == docs
    assert td.val.size == round(stream.size * 0.2)


def test_parquet_and_glob(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    pq.write_table(pa.table({"body": ["parquet one", "parquet two"]}), tmp_path / "d" / "x.parquet")
    r = _recipe(tmp_path, source="files", paths=[str(tmp_path / "d" / "*.parquet")], text_field="body")
    docs = list(text_source(r.data, tmp_path / "cache").documents())
    assert docs == ["parquet one", "parquet two"]
    r = _recipe(tmp_path, source="files", paths=[str(tmp_path / "d" / "*.parquet")])
    with pytest.raises(TernkitError, match="no column 'text'.*body"):
        list(text_source(r.data, tmp_path / "cache").documents())


def test_missing_file_glob_and_empty_corpus_errors(tmp_path: Path) -> None:
    r = _recipe(tmp_path, source="files", paths=[str(tmp_path / "absent.txt")])
    with pytest.raises(TernkitError, match="data file '.*absent.txt' not found"):
        prepare_text_data(r.data, r.tokenizer, tmp_path / "cache")
    r = _recipe(tmp_path, source="files", paths=[str(tmp_path / "*.nothing")])
    with pytest.raises(TernkitError, match="matched no files"):
        prepare_text_data(r.data, r.tokenizer, tmp_path / "cache")
    (tmp_path / "empty.txt").write_text("")
    r = _recipe(tmp_path, source="files", paths=[str(tmp_path / "empty.txt")])
    with pytest.raises(TernkitError, match="produced no text"):
        prepare_text_data(r.data, r.tokenizer, tmp_path / "cache")


def test_hub_without_network_fails_fast_with_one_sentence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(S, "_hub_reachable", lambda timeout=3.0: False)
    r = _recipe(tmp_path, source="hub", hub_name="someone/corpus")
    with pytest.raises(TernkitError, match="cannot reach the Hugging Face Hub.*data.source=files data.paths"):
        prepare_text_data(r.data, r.tokenizer, tmp_path / "cache")


# ----------------------------------------------------------------------------------- cache/split


def test_cache_reused_then_invalidated(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    r = _recipe(tmp_path, source="files", paths=paths)
    first = prepare_text_data(r.data, r.tokenizer, tmp_path / "cache")
    assert not first.reused
    mtime = (first.directory / "train.bin").stat().st_mtime_ns
    second = prepare_text_data(r.data, r.tokenizer, tmp_path / "cache")
    assert second.reused and second.directory == first.directory
    assert (second.directory / "train.bin").stat().st_mtime_ns == mtime  # not rewritten
    assert np.array_equal(np.asarray(first.train), np.asarray(second.train))
    (tmp_path / "a.txt").write_text("changed text, a different length\n")
    third = prepare_text_data(r.data, r.tokenizer, tmp_path / "cache")
    assert not third.reused and third.directory != first.directory


def test_bpe_tokenizer_is_cached_too(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("".join(f"def helper_{i % 5}(x):\n    return x\n" for i in range(300)))
    r = recipe_from_dict({"data": {"source": "files", "paths": [str(tmp_path / "c.txt")]},
                          "tokenizer": {"kind": "bpe", "vocab_size": 300}, "model": {"context_length": 8}})
    a = prepare_text_data(r.data, r.tokenizer, tmp_path / "cache")
    b = prepare_text_data(r.data, r.tokenizer, tmp_path / "cache")
    assert b.reused and a.vocab_size == b.vocab_size and 257 < a.vocab_size <= 300
    assert a.tokenizer.encode("def helper_1(x):") == b.tokenizer.encode("def helper_1(x):")
    assert a.train.size < (tmp_path / "c.txt").stat().st_size / 2


def test_document_split_is_deterministic_and_proportionate(tmp_path: Path) -> None:
    lengths = [100 + (i * 37) % 400 for i in range(200)]
    m1, m2 = split_documents(lengths, 0.1), split_documents(lengths, 0.1)
    assert m1 is not None and np.array_equal(m1, m2)
    frac = sum(l for l, v in zip(lengths, m1) if v) / sum(lengths)
    assert 0.1 <= frac < 0.1 + 500 / sum(lengths)
    assert m1.any() and not m1.all()
    assert split_documents(lengths[:5], 0.1) is None  # too few documents: the caller splits the stream
    for i in range(25):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i} " * (i + 1))
    r = _recipe(tmp_path, source="files", paths=[str(tmp_path / "doc*.txt")], val_fraction=0.2)
    a = prepare_text_data(r.data, r.tokenizer, tmp_path / "c1")
    b = prepare_text_data(r.data, r.tokenizer, tmp_path / "c2")
    assert a.meta["split"] == "document" and a.meta["val_documents"] >= 1 and not b.reused
    assert np.array_equal(np.asarray(a.val), np.asarray(b.val)) and np.array_equal(np.asarray(a.train), np.asarray(b.train))


# -------------------------------------------------------------------------------------- sampling


def test_batch_indices_resume_ranks_and_epochs() -> None:
    n, bs, seed = 37, 4, 7
    fresh = [batch_indices(s, bs, seed, n) for s in range(20)]
    resumed = [batch_indices(s, bs, seed, n) for s in range(9, 20)]  # a new "process" starting at step 9
    assert all(torch.equal(a, b) for a, b in zip(fresh[9:], resumed))
    first_epoch = torch.cat(fresh)[:n]
    assert sorted(first_epoch.tolist()) == list(range(n))  # each epoch visits every window once
    assert not torch.equal(torch.cat(fresh)[n:2 * n], first_epoch)  # and reshuffles the next
    assert not torch.equal(batch_indices(0, bs, seed + 1, n), fresh[0])
    r0, r1 = batch_indices(3, bs, seed, n, 0, 2), batch_indices(3, bs, seed, n, 1, 2)
    assert torch.equal(torch.cat([r0, r1]), torch.cat([batch_indices(6, bs, seed, n), batch_indices(7, bs, seed, n)]))


def test_token_dataset_windows_and_step_batches() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    ds = TokenDataset(tokens, 10)
    assert len(ds) == 99
    x, y = ds[5]
    assert x.dtype == torch.long and x.tolist() == list(range(50, 60)) and y.tolist() == list(range(51, 61))
    xb, yb = ds.batch(3, 8, seed=1)
    assert xb.shape == (8, 10) and torch.equal(xb[:, 1:], yb[:, :-1])
    assert torch.equal(xb[:, 0] // 10, ds.batch_indices(3, 8, seed=1))
    full = list(StepBatches(lambda s: ds.batch(s, 8, 1), 0, 6))
    tail = list(StepBatches(lambda s: ds.batch(s, 8, 1), 4, 2))
    assert torch.equal(full[4][0], tail[0][0]) and torch.equal(full[5][0], tail[1][0])
    loader = torch.utils.data.DataLoader(StepBatches(lambda s: ds.batch(s, 8, 1), 0, 6), batch_size=None, num_workers=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(loader, full))  # worker round-robin keeps step order
    with pytest.raises(TernkitError, match="fewer than model.context_length"):
        TokenDataset(np.arange(8, dtype=np.uint16), 10)


# -------------------------------------------------------------------------------------- synthetic


def test_parity_targets() -> None:
    x, y, m = parity_examples(256, 1, 16, seed=3)
    assert x.shape == y.shape == m.shape == (256, 17)
    assert (x[:, 0] == D.PARITY_BOS).all() and (y[:, 0] == 0).all() and m[:, 0].all()
    for i in range(256):
        n = int(m[i].sum()) - 1  # supervised: BOS and every bit, never the padding
        bits = x[i, 1 : n + 1]
        assert 1 <= n <= 16 and set(bits.tolist()) <= {0, 1}
        assert (x[i, n + 1 :] == D.PARITY_PAD).all() and not m[i, n + 1 :].any()
        running = [sum(bits[: t + 1].tolist()) % 2 for t in range(n)]
        assert y[i, 1 : n + 1].tolist() == running
    assert torch.equal(x, parity_examples(256, 1, 16, seed=3)[0])
    assert 0.3 < y[:, 1:][m[:, 1:]].float().mean() < 0.7  # both parities occur
    assert len(set(m.sum(1).tolist())) > 8  # lengths vary over 1..16
    masked = D.mask_targets(y, m)
    assert ((masked == IGNORE_INDEX) == (x == D.PARITY_PAD)).all()


def test_parity_fixed_length_and_last_only() -> None:
    x, y, m = parity_examples(32, 16, 16, seed=1)
    assert x.shape == (32, 17) and m.all() and not (x == D.PARITY_PAD).any()
    assert torch.equal(y[:, 1:], torch.cumsum(x[:, 1:], dim=1) % 2)
    xe, ye, me = parity_examples(64, 64, 64, seed=0, last_only=True)
    assert xe.shape == (64, 65) and (me.nonzero()[:, 1] == 64).all() and torch.equal(me.sum(1), torch.ones(64).long())
    assert torch.equal(ye[:, -1], xe[:, 1:].sum(1) % 2)  # the one target is the whole string's parity
    xv, yv, mv = parity_examples(64, 3, 9, seed=2, seq_len=12, last_only=True)
    lengths = (xv[:, 1:] != D.PARITY_PAD).sum(1)
    assert xv.shape == (64, 12) and torch.equal(mv.nonzero()[:, 1], lengths)
    assert torch.equal(yv[mv], (xv[:, 1:] * (xv[:, 1:] < 2)).sum(1) % 2)
    with pytest.raises(ValueError, match="too short"):
        parity_examples(2, 1, 8, seed=0, seq_len=8)


def test_mqar_targets() -> None:
    x, y, m = mqar_examples(64, vocab_size=64, seq_len=40, num_kv_pairs=6, seed=5, num_queries=4)
    assert x.shape == (64, 40) and torch.equal(m.sum(1), torch.full((64,), 4))
    for i in range(64):
        keys, vals = x[i, 0:12:2], x[i, 1:12:2]
        assert len(set(keys.tolist())) == 6 and (keys >= 1).all() and (keys < 32).all() and (vals >= 32).all()
        table = dict(zip(keys.tolist(), vals.tolist()))
        for t in m[i].nonzero().flatten().tolist():
            assert t >= 12 and int(y[i, t]) == table[int(x[i, t])]
        assert (x[i, 12:][~m[i, 12:]] == 0).all()
    assert torch.equal(y, mqar_examples(64, 64, 40, 6, 5, 4)[1])


# ----------------------------------------------------------------------------------- datamodule


def test_datamodule_text_and_synthetic(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    r = _recipe(tmp_path, source="files", paths=paths, val_fraction=0.3)
    dm = TernkitDataModule(r, tmp_path / "run")
    dm.setup()
    assert dm.vocab_size == 256 and (tmp_path / "run" / "tokenizer.json").is_file()
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 16) and torch.equal(xb[:, 1:], yb[:, :-1])
    vx, vy = next(iter(dm.val_dataloader()))
    assert vx.shape[1] == 16 and [b[0].tolist() for b in dm.val_dataloader()] == [b[0].tolist() for b in dm.val_dataloader()]
    dm.start_step = 3
    it = iter(dm.train_dataloader())
    assert torch.equal(next(it)[0], dm.train_batch(3)[0])
    assert dm.state_dict()["fingerprint"] == dm.task.data.meta["fingerprint"]

    p = recipe_from_dict({"data": {"source": "parity"}, "trainer": {"batch_size": 8}})
    dm = TernkitDataModule(p, tmp_path / "prun")
    dm.setup()
    assert dm.vocab_size == D.PARITY_VOCAB and dm.tokenizer is None
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 17) and torch.equal((y != IGNORE_INDEX), x != D.PARITY_PAD)  # every real position
    vx, vy = next(iter(dm.val_dataloader()))
    assert vx.shape == (8, 65) and ((vy != IGNORE_INDEX).sum(1) == 1).all()  # val scores whole-string parity
    assert torch.equal(vy[:, -1], vx[:, 1:].sum(1) % 2)
    q = recipe_from_dict({"data": {"source": "mqar"}, "trainer": {"batch_size": 8}, "model": {"vocab_size": 100}})
    with pytest.raises(TernkitError, match="model.vocab_size"):
        TernkitDataModule(q, tmp_path / "qrun").setup()


def test_lightning_resume_replays_the_same_batches(tmp_path: Path) -> None:
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[list[int]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch[0][:, 0].tolist())
            return (self.w * batch[0].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    for i in range(30):
        (tmp_path / f"f{i:02d}.txt").write_text(f"file {i}: " + "abcdefghij" * (i + 3))
    r = _recipe(tmp_path, source="files", paths=[str(tmp_path / "f*.txt")])

    def fit(max_steps: int, ckpt: str | None = None) -> Recorder:
        torch.manual_seed(0)
        m = Recorder()
        trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            accumulate_grad_batches=2, default_root_dir=str(tmp_path))
        trainer.fit(m, datamodule=TernkitDataModule(r, tmp_path / "run"), ckpt_path=ckpt)
        if ckpt is None:
            trainer.save_checkpoint(str(tmp_path / f"s{max_steps}.ckpt"))
        return m

    full = fit(6).seen
    part = fit(2).seen
    rest = fit(6, str(tmp_path / "s2.ckpt")).seen
    assert len(full) == 12 and part == full[:4] and rest == full[4:]
