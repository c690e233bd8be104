"""Real 2-process DDP on CPU (gloo) through the entry point: disjoint data per rank, identical
weights and random features on both ranks, evaluation metrics summed over ranks exactly."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import one_thread, tiny_overrides

from protein_performer.data.datamodule import BatchSampler, CollatedDataset, ProteinDataModule
from protein_performer.model.performer import PerformerConfig, PerformerLM
from protein_performer.training.callbacks import feature_seed
from protein_performer.training.utils import tensor_digest

REPO = Path(__file__).resolve().parents[2]
STEPS, REDRAW, SEED, EVAL_BS = 4, 3, 5, 7
# Logits closer than this to the runner-up: the argmax may differ between the ranks and this process.
# Both run the same float32 forward on the same batches with one thread, but in other processes (other
# global state): the logits may differ in their last bits, ~dim x depth x eps32 x |activations| ~ 1e-5
# here; 1e-4 leaves a margin of 10.
NEAR_TIE = 1e-4


@pytest.mark.slow
def test_two_process_ddp_on_cpu(shard_root, tmp_path):
    run_dir, audit = tmp_path / "run", tmp_path / "audit"
    cmd = [
        sys.executable,
        "-m",
        "protein_performer.train",
        *tiny_overrides(
            f"data.root={shard_root}",
            f"hydra.run.dir={run_dir}",
            f"seed={SEED}",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.devices=2",
            "trainer.precision=32-true",
            f"trainer.max_steps={STEPS}",
            f"trainer.val_check_interval={STEPS}",
            "trainer.log_every_n_steps=1",
            "model.dropout=0.1",
            "data.batch_size=4",
            f"data.eval_batch_size={EVAL_BS}",
            "data.eval_splits=[valid]",
            f"callbacks.redraw.redraw_interval={REDRAW}",
            "callbacks.throughput.window=2",
            "~logger",
            "validate=false",
            "test=false",
            "+callbacks.audit._target_=protein_performer.training.callbacks.DataAudit",
            f"+callbacks.audit.output_dir={audit}",
        ),
    ]
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    ranks = [json.loads((audit / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [STEPS, STEPS]
    # disjoint data: per step and over the whole run, each rank its own items
    seen = [set(), set()]
    for s0, s1 in zip(ranks[0]["steps"], ranks[1]["steps"], strict=True):
        assert s0["step"] == s1["step"] and len(s0["index"]) == len(s1["index"]) == 4
        assert not set(s0["index"]) & set(s1["index"])
        seen[0] |= set(s0["index"])
        seen[1] |= set(s1["index"])
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 4 * STEPS
    # identical weights, optimizer-updated, and identical random features on both ranks
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    assert state0 == state1
    features = sorted(k for k in state0 if k.endswith("kernel.projection"))
    assert len(features) == 2
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert {k: tensor_digest(v) for k, v in ckpt["state_dict"].items()} == state0
    # the features of the last redraw's seeds, drawn again in this process (not a rank: not bit for bit
    # guaranteed). W is drawn in float64 (QR of 16 x 16 Gaussians: another summation order moves it by
    # ~n eps64 cond(G) |W| < 1e-10) and rounded to float32, so the two are at most one float32 ulp
    # (2^-23 relative) apart, or within 1e-9; features of another seed are O(1) apart.
    ref = PerformerLM(PerformerConfig(**ckpt["hyper_parameters"]["model"]))
    last_redraw = (STEPS - 1) // REDRAW * REDRAW
    with one_thread():
        ref.redraw_features(lambda layer: feature_seed(SEED, last_redraw, layer))
    for k in features:
        want = ref.state_dict()[k.removeprefix("model.")]
        torch.testing.assert_close(ckpt["state_dict"][k], want, rtol=2.0**-23, atol=1e-9, msg=k)

    # validation during fit ran on both ranks; its sums equal a direct computation over the items
    # the two ranks evaluated (the sampler pads the last round with repeats, as DistributedSampler)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ref.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    ref.eval()
    dm = ProteinDataModule(
        root=str(shard_root),
        objective="bid",
        batch_size=4,
        max_length=64,
        seed=SEED,
        eval_batch_size=EVAL_BS,
        num_workers=0,
        eval_splits=["valid"],
    )
    dm.setup("validate")
    ds = CollatedDataset(dm._dataset("valid"), dm.collator(train=False))
    nll = correct = n = near_ties = 0.0
    with torch.no_grad(), one_thread():
        for rank in (0, 1):
            sampler = BatchSampler(
                len(ds),
                batch_size=EVAL_BS,
                shuffle=False,
                seed=SEED,
                rank=rank,
                world_size=2,
                drop_last=False,
                key_epoch=0,
            )
            for key in sampler:
                batch = ds[key]
                logits = ref(batch["tokens"], batch["key_padding_mask"])["logits"]
                keep = batch["targets"] != -100
                nll += float(F.cross_entropy(logits[keep], batch["targets"][keep], reduction="sum"))
                correct += float((logits[keep].argmax(-1) == batch["targets"][keep]).sum())
                n += float(keep.sum())
                top2 = logits[keep].topk(2, dim=-1).values
                near_ties += float((top2[:, 0] - top2[:, 1] < NEAR_TIE).sum())
    assert metrics["valid/targets"] == n
    # exact but for predictions whose top two logits are near-ties (NEAR_TIE): those may flip
    assert abs(metrics["valid/acc"] * n - correct) <= near_ties + 1e-9 * n, (metrics["valid/acc"], correct, n)
    assert metrics["valid/ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
