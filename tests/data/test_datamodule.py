"""The DDP-aware batch sampler and the Lightning DataModule, on a shard store of real sequences."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from test_shards import load_records, make_store

from protein_performer.data.collate import IGNORE_INDEX
from protein_performer.data.datamodule import BatchSampler, ProteinDataModule
from protein_performer.data.tokenizer import Tokenizer

TOK = Tokenizer()
CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def records():
    return load_records(600)


@pytest.fixture(scope="module")
def store(tmp_path_factory, records):
    """train 371 (7 shards), valid 60, test 69, ood 100; real UniProt records in file order."""
    root = tmp_path_factory.mktemp("dm") / "store"
    splits = {"train": records[:371], "valid": records[371:431], "test": records[431:500], "ood": records[500:600]}
    return make_store(root, splits, per_shard=53)


def _epoch(sampler: BatchSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    keys = list(sampler)
    assert all(k[0] == (epoch if sampler.key_epoch is None else sampler.key_epoch) for k in keys)
    assert len(keys) == len(sampler)
    return [k[1] for k in keys]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_disjoint_and_cover_each_epoch(world, drop_last):
    n, b = 371, 16
    orders = []
    for epoch in range(3):
        per_rank = [
            [i for batch in _epoch(BatchSampler(n, b, True, 7, r, world, drop_last), epoch) for i in batch]
            for r in range(world)
        ]
        assert len({len(p) for p in per_rank}) == 1  # same number of items (and steps) on every rank
        flat = np.concatenate(per_rank)
        if drop_last:
            assert len(set(flat)) == flat.size  # disjoint
            # every rank gets n // world items, whole batches only
            assert all(len(p) == (n // world) // b * b for p in per_rank)
        else:
            assert set(flat) == set(range(n))  # union is everything; the wrap repeats < world items
            assert flat.size - n == (-n) % world
        orders.append(flat)
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch
    again = [i for batch in _epoch(BatchSampler(n, b, True, 7, 0, world, drop_last), 1) for i in batch]
    assert np.array_equal(again, orders[1][: len(again)])  # deterministic given seed and epoch


def test_eval_sampler_is_ordered_and_keeps_epoch_zero():
    s = BatchSampler(10, 4, shuffle=False, rank=0, world_size=1, drop_last=False, key_epoch=0)
    assert _epoch(s, 5) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("world", [1, 2])
def test_token_budget_batches(records, world):
    lengths = np.minimum(np.array([t.size for _, t in records]) + 2, 1024)
    max_tokens, m = 4096, 8
    ranks = [
        BatchSampler(len(lengths), None, True, 3, r, world, False, lengths, max_tokens, m, megabatch_size=256)
        for r in range(world)
    ]
    for epoch in (0, 1):
        per_rank = [_epoch(s, epoch) for s in ranks]
        assert len({len(p) for p in per_rank}) == 1
        for batches in per_rank:
            for batch in batches:
                padded = -(-lengths[batch].max() // m) * m
                assert len(batch) * padded <= max_tokens
        seen = [i for p in per_rank for batch in p for i in batch]
        assert set(seen) == set(range(len(lengths)))
        if world == 1:
            assert len(seen) == len(lengths)  # each exactly once
            # length bucketing packs batches well: on average at least half the budget is used
            used = [len(bt) * -(-lengths[bt].max() // m) * m for bt in per_rank[0]]
            assert np.mean(used) > max_tokens / 2
        else:
            assert len(seen) - len(set(seen)) < len(max(per_rank[0], key=len)) + 1  # only the wrapped batch
    with pytest.raises(ValueError, match="max_tokens=512 is smaller than the longest item"):
        BatchSampler(len(lengths), None, lengths=lengths, max_tokens=512)


def _reconstruct(batch, objective):
    """Residues of each row before masking (BID) or the uncropped input (UNI), without specials."""
    tok, tgt = batch["tokens"], batch["targets"]
    if objective == "bid":
        tok = torch.where(tgt != IGNORE_INDEX, tgt, tok)
    rows = []
    for r in range(tok.shape[0]):
        row = tok[r, : batch["lengths"][r]].numpy()
        rows.append(row[row >= TOK.n_special])
    return rows


@pytest.mark.parametrize("objective", ["uni", "bid"])
def test_train_loader_with_workers_reads_every_sequence_once(store, records, objective):
    dm = ProteinDataModule(str(store), objective=objective, batch_size=16, max_length=8192, num_workers=2, seed=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 371 // 16
    idx = torch.cat([b["index"] for b in batches]).numpy()
    assert len(set(idx)) == idx.size == 371 // 16 * 16
    for b in batches:
        assert b["tokens"].shape[1] % 8 == 0
        for i, residues in zip(b["index"].tolist(), _reconstruct(b, objective)):
            assert np.array_equal(residues, records[i][1]), f"record {i}"
    # the same seed gives the same epoch, whatever the number of workers
    dm0 = ProteinDataModule(str(store), objective=objective, batch_size=16, max_length=8192, num_workers=0, seed=1)
    first = next(iter(dm0.train_dataloader()))
    assert all(torch.equal(first[k], batches[0][k]) for k in first)


def test_eval_loaders_and_missing_splits(store, records, tmp_path, caplog):
    dm = ProteinDataModule(str(store), objective="bid", batch_size=32, max_length=128, seed=0)
    dm.setup("validate")
    assert dm.val_split_names == ["valid", "ood"]
    vals = dm.val_dataloader()
    assert len(vals) == 2
    a, b = list(vals[0]), list(vals[0])
    assert torch.cat([x["index"] for x in a]).tolist() == list(range(60))  # ordered, all of valid
    assert all(torch.equal(x["targets"], y["targets"]) for x, y in zip(a, b))  # same masks every epoch
    for x in a:  # fixed crop: the first 128 tokens of [bos, s, eos]
        assert (x["tokens"][:, 0] == TOK.bos_id).all()
    dm.setup("test")
    assert dm.test_split_names == ["test", "ood"]
    assert sum(len(x["index"]) for x in dm.test_dataloader()[0]) == 69
    # a store without ood (and an empty test split): skipped with a log line
    root = make_store(tmp_path / "no_ood", {"train": records[:100], "valid": records[100:120], "test": []})
    dm = ProteinDataModule(str(root), objective="uni", batch_size=8)
    with caplog.at_level(logging.INFO, logger="protein_performer.data.datamodule"):
        dm.setup(None)
    assert dm.val_split_names == ["valid"] and dm.test_split_names == []
    assert "'ood' is empty or missing" in caplog.text and "'test' is empty or missing" in caplog.text
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        ProteinDataModule(str(tmp_path / "nothing")).setup("fit")


def test_packing_through_the_datamodule(store, records):
    dm = ProteinDataModule(str(store), objective="uni", batch_size=4, packing=True, block_size=512, seed=0)
    batches = list(dm.train_dataloader())
    stream = np.concatenate([np.append(t, TOK.eos_id) for _, t in records[:371]])
    n_blocks = -(-stream.size // 512)
    assert len(batches) == n_blocks // 4
    for b in batches:
        assert b["tokens"].shape == (4, 512)
        for r, i in enumerate(b["index"].tolist()):
            block = stream[i * 512 : (i + 1) * 512]
            assert torch.equal(b["targets"][r, : block.size], torch.from_numpy(block.astype(np.int64)))


def test_token_budget_through_the_datamodule(store):
    dm = ProteinDataModule(str(store), objective="bid", token_budget=8192, max_length=1024, seed=2)
    batches = list(dm.train_dataloader())
    assert all(b["tokens"].numel() <= 8192 for b in batches)
    assert sum(len(b["index"]) for b in batches) == 371


def test_residue_frequencies(store, records):
    dm = ProteinDataModule(str(store))
    freq = dm.residue_frequencies("train")
    counts = np.bincount(np.concatenate([t for _, t in records[:371]]), minlength=TOK.vocab_size)
    assert freq.shape == (TOK.vocab_size,) and np.allclose(freq, counts / counts.sum(), rtol=0, atol=1e-15)
    assert freq[: TOK.n_special].sum() == 0
    with_eos = dm.residue_frequencies("train", include_eos=True)
    assert np.isclose(with_eos[TOK.eos_id], 371 / (counts.sum() + 371))


def test_hydra_configs_instantiate(store):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for name, packing, max_length in (
            ("default", False, 1024),
            ("demo", False, 256),
            ("trembl_concat", True, 8192),
        ):
            cfg = compose(overrides=[f"+data={name}", "+objective=bid", "+seed=0", f"data.root={store}"])
            dm = instantiate(cfg.data)
            assert isinstance(dm, ProteinDataModule)
            assert dm.packing is packing and dm.max_length == max_length and dm.objective == "bid"


def test_lightning_sets_epoch_and_keeps_the_sampler(store):
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(TOK.vocab_size, TOK.vocab_size)
            self.seen = {}

        def training_step(self, batch, batch_idx):
            self.seen.setdefault(self.current_epoch, []).extend(batch["index"].tolist())
            logits = self.emb(batch["tokens"])
            return torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE_INDEX
            )

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ProteinDataModule(str(store), objective="uni", batch_size=32, max_length=64, seed=4)
    model = Tiny()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    assert isinstance(trainer.train_dataloader.sampler, BatchSampler)
    assert sorted(model.seen) == [0, 1]
    for epoch, seen in model.seen.items():
        expected = [i for batch in _epoch(BatchSampler(371, 32, True, 4, drop_last=True), epoch) for i in batch]
        assert seen == expected


def test_reads_what_ingestion_wrote(tmp_path):
    """End to end with protein_performer.data.ingest: every kept record reads back, split by split,
    equal to Biopython's parse (first occurrence of each distinct sequence, in file order)."""
    ingest_mod = pytest.importorskip("protein_performer.data.ingest")
    from protein_performer.data.shards import ShardedDataset

    out = tmp_path / "ingested"
    ingest_mod.ingest(
        input=str(Path(__file__).resolve().parents[2] / "data" / "uniprot_sample.fasta.gz"),
        output_dir=str(out),
        progress=False,
        shard_size=300,
        fractions={"train": 0.8, "valid": 0.1, "test": 0.1},
    )
    expected, seen = [], set()
    for acc, tokens in load_records():
        if tokens.tobytes() not in seen:
            seen.add(tokens.tobytes())
            expected.append((acc, tokens.tobytes()))
    got = []
    for split in ("train", "valid", "test", "ood"):
        ds = ShardedDataset(out, split)
        got += [(ds.get_id(i), ds[i].tobytes()) for i in range(len(ds))]
        ds.close()
    assert sorted(got) == sorted(expected)
    dm = ProteinDataModule(str(out), objective="bid", batch_size=64, max_length=512, seed=0)
    dm.setup("fit")
    assert dm.val_split_names == ["valid"]  # the sample has no held-out family: ood is empty
    n_train = len(dm.datasets["train"])
    assert sum(len(b["index"]) for b in dm.train_dataloader()) == n_train // 64 * 64
