"""Training: losses and exact metric aggregation, unigram baseline, schedules, fast_dev_run,
exact resume from last.ckpt, W&B offline run directory, feature redraw during training."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import one_thread, tiny_overrides
from hydra import compose, initialize_config_dir

from protein_performer.training.callbacks import feature_seed
from protein_performer.training.module import ProteinLM, lr_lambda, unigram_baseline
from protein_performer.training.train import train

CONF = Path(__file__).resolve().parents[2] / "conf"


def make_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def run_cfg(shard_root: Path, run_dir: Path, *extra: str):
    """The tiny demo model (conftest.tiny_overrides), and short runs: every test below trains on 2 CPU
    cores in seconds; num_threads=1: tiny ops, one thread, no waiting on a busy core."""
    run = (f"data.root={shard_root}", f"run_dir={run_dir}", "trainer.log_every_n_steps=1", "num_threads=1")
    return make_cfg(tiny_overrides(*run, *extra))


# ---------------------------------------------------------------------------------- pure functions
def test_unigram_baseline_numbers():
    freq = torch.zeros(29, dtype=torch.float64)
    freq[4], freq[5], freq[6] = 0.5, 0.3, 0.2  # A C D
    hist = torch.zeros(29, dtype=torch.float64)
    hist[4], hist[5], hist[7] = 6, 3, 1  # a target E never seen in training
    out = unigram_baseline(freq, hist, "bid")
    assert out["unigram_acc"] == pytest.approx(0.6)  # always predict A
    p = torch.full((29,), 1e-6, dtype=torch.float64)
    p[4], p[5], p[6] = 0.5, 0.3, 0.2
    p[:4] = 0
    p = p / p.sum()
    ce = -(6 * math.log(p[4]) + 3 * math.log(p[5]) + 1 * math.log(p[7])) / 10
    assert out["unigram_ppl"] == pytest.approx(math.exp(ce), rel=1e-9)
    # UNI: eos is a target too
    freq[2] = 0.1
    hist[2] = 2
    assert unigram_baseline(freq, hist, "uni")["unigram_acc"] == pytest.approx(6 / 12)
    with pytest.raises(ValueError, match="outside"):
        unigram_baseline(freq, hist, "bid")  # eos cannot be a BID target


def test_lr_schedules():
    assert [lr_lambda(s, 4, "constant", None, 0.0) for s in (0, 3, 4, 100)] == [0.25, 1.0, 1.0, 1.0]
    assert lr_lambda(4, 4, "linear", 14, 0.0) == 1.0
    assert lr_lambda(9, 4, "linear", 14, 0.0) == pytest.approx(0.5)
    assert lr_lambda(14, 4, "linear", 14, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 4, "cosine", 14, 0.0) == pytest.approx(0.5)
    assert lr_lambda(50, 4, "cosine", 14, 0.2) == pytest.approx(0.2)


def test_objective_must_match_causality():
    from protein_performer.model.performer import PerformerConfig, PerformerLM

    model = PerformerLM(PerformerConfig(depth=1, dim=16, heads=2, dim_head=8, ff_dim=16, nb_features=8, causal=False))
    with pytest.raises(ValueError, match="causal"):
        ProteinLM(model, objective="uni")
    with pytest.raises(ValueError, match="objective"):
        make_cfg(["objective=mlm"]).model.causal  # noqa: B018  (the resolver rejects it)


# The model hyper-parameters as a checkpoint of the demo run stores them (hyper_parameters["model"]):
# the 17 fields of PerformerConfig under their names, plain values; checkpoints written so load.
SAVED_MODEL_HPARAMS = {
    "vocab_size": 29, "max_len": 64, "dim": 16, "depth": 2, "heads": 2, "dim_head": 8, "ff_dim": 32,
    "dropout": 0.0, "attention": "favor_relu", "causal": False, "nb_features": 8, "positions": "learned",
    "qk": "content", "init": "normal", "tie_embeddings": True, "checkpointing": False,
    "favor_kwargs": {"orthogonal": True},
}  # fmt: skip


def test_checkpoint_hparams_keep_their_format_and_load(tmp_path):
    """ProteinLM stores the model config as the plain dict above; a Lightning checkpoint holding it
    loads back through ``ProteinLM.load_from_checkpoint`` and export's ``load_model`` into the same
    model (same weights and features: logits equal to float32 rounding)."""
    import pytorch_lightning as pl

    from protein_performer.model.performer import PerformerConfig, PerformerLM
    from protein_performer.pretrained import load_model

    module = ProteinLM(dict(SAVED_MODEL_HPARAMS), objective="bid")
    assert module.hparams["model"] == SAVED_MODEL_HPARAMS
    assert module.model.config == PerformerConfig(**SAVED_MODEL_HPARAMS)
    built = ProteinLM(PerformerLM(PerformerConfig(**SAVED_MODEL_HPARAMS)), objective="bid")
    assert built.hparams["model"] == SAVED_MODEL_HPARAMS
    ckpt = tmp_path / "saved.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": {"model": dict(SAVED_MODEL_HPARAMS), "objective": "bid", "lr": 1e-3},
            "pytorch-lightning_version": pl.__version__,
            "global_step": 3,
            "epoch": 0,
        },
        ckpt,
    )
    tokens = torch.randint(4, 29, (2, 20), generator=torch.Generator().manual_seed(0))
    want = module.model.eval()(tokens)["logits"]
    loaded = ProteinLM.load_from_checkpoint(ckpt, map_location="cpu")
    assert loaded.model.config == module.model.config and loaded.hparams["model"] == SAVED_MODEL_HPARAMS
    exported = load_model(ckpt)
    assert exported.config == SAVED_MODEL_HPARAMS and exported.info["global_step"] == 3
    for model in (loaded.model.eval(), exported.model):
        torch.testing.assert_close(model(tokens)["logits"], want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- training runs
def _wandb_records(path: Path):
    """Records of a W&B transaction log (``run-<id>.wandb``): LevelDB-log framing of protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        if pos + 7 + length > len(data):
            return  # a record still being written
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fast_dev_run(shard_root, tmp_path, precision):
    cfg = run_cfg(shard_root, tmp_path, "debug=fast_dev_run", f"trainer.precision={precision}")
    metrics = train(cfg)
    assert metrics["global_step"] == 1
    for split in ("valid", "ood", "test"):
        assert 0.0 <= metrics[f"{split}/acc"] <= 1.0 and metrics[f"{split}/ppl"] > 1.0
    assert json.loads((tmp_path / "metrics.json").read_text())["valid/acc"] == metrics["valid/acc"]


def test_eval_metrics_are_token_weighted_and_match_a_direct_computation(shard_root, tmp_path):
    """valid/acc and valid/ppl equal sum(correct)/sum(n) and exp(sum(NLL)/sum(n)) over every
    valid batch, computed here directly; the unigram baseline equals its definition."""
    cfg = run_cfg(
        shard_root, tmp_path, "trainer.max_steps=3", "fit=true", "test=false", "~logger", "data.eval_batch_size=5"
    )
    metrics = train(cfg)
    module = ProteinLM.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu")
    module.eval()  # rebuilt from the checkpoint alone: the model config travels in its hyper-parameters
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.setup("validate")
    nll = correct = n = 0.0
    hist = torch.zeros(29, dtype=torch.float64)
    batch_sizes = set()
    # the run's thread count (train() restores this process's after the run): the same float32 logits
    # as its validation, so the same argmax even for near-ties, and acc can be compared exactly
    with torch.no_grad(), one_thread():
        for batch in dm.val_dataloader()[0]:
            logits = module.model(batch["tokens"], batch["key_padding_mask"])["logits"]
            keep = batch["targets"] != -100
            batch_sizes.add(int(keep.sum()))
            nll += float(F.cross_entropy(logits[keep], batch["targets"][keep], reduction="sum"))
            correct += float((logits[keep].argmax(-1) == batch["targets"][keep]).sum())
            n += float(keep.sum())
            hist += torch.bincount(batch["targets"][keep], minlength=29).double()
    assert len(batch_sizes) > 1  # batches of different target counts: a mean of means would differ
    assert metrics["valid/targets"] == n
    assert metrics["valid/acc"] == pytest.approx(correct / n, rel=1e-9)
    assert metrics["valid/ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    freq = torch.as_tensor(dm.residue_frequencies("train"))
    assert metrics["valid/unigram_acc"] == pytest.approx(float(hist[int(freq.argmax())] / n))
    assert 0.05 < metrics["valid/unigram_acc"] < 0.15  # leucine, about 10% of residues
    assert 15.0 < metrics["valid/unigram_ppl"] < 20.0  # the paper's test unigram: 17.80


def test_time_limited_training_stops_evaluates_and_checkpoints(shard_root, tmp_path):
    cfg = run_cfg(
        shard_root,
        tmp_path,
        "trainer.max_time=00:00:00:03",
        "trainer.max_steps=1000000",
        "trainer.limit_val_batches=1",
        "trainer.val_check_interval=1000000",
        "test=false",
        "~logger",
    )
    metrics = train(cfg)
    assert 0 < metrics["global_step"] < 1000000
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == metrics["global_step"]
    assert "valid/acc" in metrics  # validate after fit


def _final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("where", ["epoch_end", "mid_epoch"])
def test_resume_from_last_is_exact(shard_root, tmp_path, where):
    """8 steps in one go == 4 steps, then ckpt_path=last for 4 more: same data order (also from the
    middle of an epoch), dropout, random features (redrawn every 3 steps) and optimizer state, so
    the same weights and loss."""
    audit = "+callbacks.audit._target_=protein_performer.training.callbacks.DataAudit"
    common = [
        "trainer.val_check_interval=4",
        "trainer.limit_val_batches=2",
        "model.dropout=0.1",
        "callbacks.redraw.redraw_interval=3",
        "callbacks.checkpoint.every_n_train_steps=4",
        "validate=false",
        "test=false",
        "logger=csv",
        audit,
    ]
    if where == "epoch_end":
        common.append("trainer.limit_train_batches=4")  # an epoch of 4 batches: resume at an epoch boundary
    full = train(
        run_cfg(
            shard_root,
            tmp_path / "full",
            "trainer.max_steps=8",
            *common,
            f"+callbacks.audit.output_dir={tmp_path / 'full_audit'}",
        )
    )
    train(
        run_cfg(
            shard_root,
            tmp_path / "half",
            "trainer.max_steps=4",
            *common,
            f"+callbacks.audit.output_dir={tmp_path / 'half_audit'}",
        )
    )
    assert (tmp_path / "half" / "checkpoints" / "last.ckpt").exists()
    resumed = train(
        run_cfg(
            shard_root,
            tmp_path / "half",
            "trainer.max_steps=8",
            "ckpt_path=last",
            *common,
            f"+callbacks.audit.output_dir={tmp_path / 'resumed_audit'}",
        )
    )

    # the data: the resumed run trains on exactly the batches the uninterrupted run saw at steps 4..7
    def steps(d):
        return [
            (s["step"], s["epoch"], s["index"]) for s in json.loads((tmp_path / d / "rank0.json").read_text())["steps"]
        ]

    assert steps("half_audit") + steps("resumed_audit") == steps("full_audit")
    assert [s[1] for s in steps("full_audit")] == ([0] * 4 + [1] * 4 if where == "epoch_end" else [0] * 8)
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "half")
    assert a["global_step"] == b["global_step"] == 8
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    for k in a["state_dict"]:
        if k.endswith("kernel.projection"):  # last redraw at step 6, identical by construction
            assert torch.equal(a["state_dict"][k], b["state_dict"][k])
    assert resumed["train/loss"] == pytest.approx(full["train/loss"], rel=1e-5)
    assert resumed["valid/acc"] == pytest.approx(full["valid/acc"], rel=1e-6)
    assert (tmp_path / "half" / "checkpoints" / "step0000004.ckpt").exists()  # it did stop at 4


def test_wandb_offline_run_dir_and_redraw(shard_root, tmp_path, monkeypatch):
    """The default logger writes an offline W&B run inside the run folder with the run's metrics,
    the resolved config and the model summary; random features follow FeatureRedraw's seeds."""
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must be the default, not the env
    cfg = run_cfg(
        shard_root,
        tmp_path,
        "trainer.max_steps=5",
        "trainer.val_check_interval=5",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "callbacks.redraw.redraw_interval=2",
        "callbacks.throughput.window=2",
        "seed=11",
    )
    assert cfg.logger.offline is True
    metrics = train(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    logs = list(runs[0].glob("run-*.wandb"))
    deadline = time.monotonic() + 60  # the W&B service may still be flushing the log after finish()
    while not any(r.WhichOneof("record_type") == "exit" for r in _wandb_records(logs[0])):
        assert time.monotonic() < deadline, f"{logs[0]} has no exit record"
        time.sleep(0.5)
    history, summary, config = set(), {}, set()
    name = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731  ("a/b" is stored nested)
    for rec in _wandb_records(logs[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history |= {name(i) for i in rec.history.item}
        elif kind == "summary":
            summary.update({name(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "config":
            config |= {name(i) for i in rec.config.update}
    for key in (
        "train/loss",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/sequences_per_s",
        "train/lr",
        "valid/acc",
        "valid/ppl",
        "valid/unigram_acc",
        "ood/acc",
        "test/acc",
        "test/unigram_ppl",
    ):
        assert key in history, key
    assert summary["test/acc"] == pytest.approx(metrics["test/acc"])
    # throughput: non-padding tokens <= padded tokens = sequences x padded length (<= 64 here)
    assert 0 < metrics["train/tokens_per_s"] <= metrics["train/padded_tokens_per_s"]
    assert metrics["train/padded_tokens_per_s"] <= 64 * metrics["train/sequences_per_s"] * (1 + 1e-9)
    assert summary["model/params_total"] == sum(
        p.numel()
        for n, p in torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"].items()
        if not n.endswith("projection") and n != "model.lm_head.weight"  # tied to the embedding
    )
    assert {"model", "data", "trainer", "model_summary", "objective"} <= config
    assert (tmp_path / "wandb_run_id.txt").read_text() in runs[0].name
    # features: last redraw at step 4 with seed 11
    from protein_performer.model.performer import PerformerConfig, PerformerLM

    state = _final_state(tmp_path)["state_dict"]
    ref = PerformerLM(PerformerConfig(**_final_state(tmp_path)["hyper_parameters"]["model"]))
    with one_thread():  # drawn as in the run (a float64 QR), with its thread count: bit for bit
        ref.redraw_features(lambda i: feature_seed(11, 4, i))
    for name, buf in ref.state_dict().items():
        if name.endswith("projection"):
            assert torch.equal(state["model." + name], buf), name


def test_chain_of_resumes_through_an_epoch_end_is_exact(shard_root, tmp_path):
    """Resumed at the last batch of an epoch, then again at the last batch of the next: the same
    batches and losses as one uninterrupted run (Lightning 2.6 alone forgets to count the epoch after
    the first resume as started, and the second resume then trains on other batches from step 8 on;
    resume.EpochProgressRepair)."""
    common = [
        "trainer.limit_train_batches=4",
        "callbacks.checkpoint.every_n_train_steps=1",
        "model.dropout=0.1",
        "callbacks.redraw.redraw_interval=3",
        "trainer.limit_val_batches=0",
        "validate=false",
        "test=false",
        "~logger",
        "+callbacks.audit._target_=protein_performer.training.callbacks.DataAudit",
        "+callbacks.losses._target_=protein_performer.training.callbacks.LossLog",
    ]
    # warmup (50 steps in the demo) spans all 10 steps: the learning rate does not depend on max_steps
    train(
        run_cfg(
            shard_root,
            tmp_path / "full",
            "trainer.max_steps=10",
            *common,
            f"+callbacks.audit.output_dir={tmp_path / 'a_full'}",
            f"+callbacks.losses.path={tmp_path / 'full.txt'}",
        )
    )
    for i, steps in enumerate((4, 8, 10)):  # stop at the ends of epochs 0 and 1, then finish
        train(
            run_cfg(
                shard_root,
                tmp_path / "chain",
                f"trainer.max_steps={steps}",
                "ckpt_path=last",
                *common,
                f"+callbacks.audit.output_dir={tmp_path / f'a{i}'}",
                f"+callbacks.losses.path={tmp_path / 'chain.txt'}",
            )
        )

    def steps(d):
        return [
            (s["step"], s["epoch"], s["index"]) for s in json.loads((tmp_path / d / "rank0.json").read_text())["steps"]
        ]

    assert steps("a0") + steps("a1") + steps("a2") == steps("a_full")
    assert [s[1] for s in steps("a_full")] == [0] * 4 + [1] * 4 + [2] * 2
    # the same operations on the same data and state, one thread: the same floats (as test_crash_train)
    assert (tmp_path / "chain.txt").read_text() == (tmp_path / "full.txt").read_text()
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "chain")
    assert a["loops"]["fit_loop"]["epoch_progress"] == b["loops"]["fit_loop"]["epoch_progress"]
    for k, v in a["state_dict"].items():
        assert torch.equal(b["state_dict"][k], v), k
