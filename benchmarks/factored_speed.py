"""Factored attention (issue 21, item 2): one training step of the family-contacts model, exact vs FAVOR+.

    python benchmarks/factored_speed.py [--lengths 70 100 150] [--features 32 64 128] [--steps 10]

The model is the aligned family-contacts recipe's (conf/experiment/family_contacts_aligned.yaml: one
layer, dim 128, 32 heads of 32, ff 256, queries and keys learned per position (``qk="position"``),
``init="torch"``, untied embeddings, batch 128, AdamW lr 1e-2, weight decay 0.01). A step is forward,
masked-LM cross-entropy, backward and the optimizer step on a batch of random residues with an
all-False padding mask (aligned rows all have the chain's length), as the trainer runs it. Rows:
exact attention, then FAVOR+ softmax and Performer-ReLU at each m (``nb_features``); every model is
built in the same process and the steps go round-robin (one step of each row per round, each round
starting one row later, after warm-up), so all rows see the same load; the median over rounds, and
its ratio to exact's, is the result. The process keeps PyTorch's default threads unless ``--threads``.

Accuracy of the maps against m (same shapes, L = the longest length): the mean total-variation
distance between the rows of the FAVOR+ map and of its reference, for queries and keys drawn
N(0, s^2) per coordinate (``--scales``; s = 1 gives logits q.k / sqrt(d) of std 1, peaked maps),
over several draws of W: the reference is exact softmax for FAVOR+ softmax, and the same kernel with
``--reference-features`` features (the limit m -> infinity) for Performer-ReLU, which is not an
estimator of softmax. Writes benchmarks/results/factored_speed.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _record import Floor, day, fmt, newest, record, source, write  # noqa: E402

from protein_performer.data.tokenizer import Tokenizer  # noqa: E402
from protein_performer.model.attention import SoftmaxAttention  # noqa: E402
from protein_performer.model.favor import FavorAttention  # noqa: E402
from protein_performer.model.performer import PerformerLM  # noqa: E402

HEADING = ""  # two lines under the family-contacts part (after predict_contacts_check)
RECIPE = {  # conf/experiment/family_contacts_aligned.yaml
    "vocab_size": 29,
    "max_len": 160,
    "depth": 1,
    "dim": 128,
    "heads": 32,
    "dim_head": 32,
    "ff_dim": 256,
    "dropout": 0.0,
    "positions": "learned",
    "qk": "position",
    "init": "torch",
    "tie_embeddings": False,
}
BATCH, LR, WEIGHT_DECAY, MASK_PROB = 128, 1e-2, 0.01, 0.3
KINDS = {"favor_softmax": "softmax", "favor_relu": "relu"}


def rows(features: list[int]) -> list[tuple[str, int | None]]:
    """(attention, m) of every row: exact first, then each FAVOR+ kind at each m."""
    return [("exact", None)] + [(attention, m) for attention in KINDS for m in features]


def label(attention: str, m: int | None) -> str:
    """A row's name: ``exact``, ``favor_relu m=64``."""
    return attention if m is None else f"{attention} m={m}"


class Trainer:
    """One model of the recipe's shape with its optimizer, stepping on a fixed random batch."""

    def __init__(self, attention: str, m: int | None, length: int, seed: int = 0):
        torch.manual_seed(seed)
        self.model = PerformerLM(attention=attention, nb_features=m or 64, **RECIPE).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        gen = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(4, 24, (BATCH, length), generator=gen)
        self.masked = torch.rand(BATCH, length, generator=gen) < MASK_PROB
        self.tokens = self.targets.masked_fill(self.masked, Tokenizer.mask_id)
        self.padding = torch.zeros(BATCH, length, dtype=torch.bool)

    def step(self) -> float:
        """Seconds of one forward, loss, backward and optimizer step."""
        start = time.perf_counter()
        logits = self.model(self.tokens, key_padding_mask=self.padding)["logits"]
        loss = F.cross_entropy(logits[self.masked], self.targets[self.masked])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def time_length(length: int, features: list[int], steps: int, warmup: int) -> dict[str, float]:
    """Median step seconds of every row at one length, the rows stepped round-robin (rotating order)."""
    trainers = {label(a, m): Trainer(a, m, length) for a, m in rows(features)}
    times: dict[str, list[float]] = {name: [] for name in trainers}
    names = list(trainers)
    for round_ in range(warmup + steps):
        for i in range(len(names)):  # each round starts one row later: no row always follows the same one
            name = names[(round_ + i) % len(names)]
            seconds = trainers[name].step()
            if round_ >= warmup:
                times[name].append(seconds)
    return {name: statistics.median(t) for name, t in times.items()}


def map_error(kind: str, m: int, length: int, scale: float, draws: int, reference_m: int) -> float:
    """Mean row total-variation distance of the FAVOR+ map from its reference (module docstring)."""
    heads, d = RECIPE["heads"], RECIPE["dim_head"]
    gen = torch.Generator().manual_seed(0)
    q, k = (scale * torch.randn(1, heads, length, d, generator=gen, dtype=torch.float64) for _ in range(2))
    if kind == "softmax":
        reference = SoftmaxAttention().attention_matrix(q, k)
    else:
        reference = FavorAttention(d, reference_m, kernel=kind, seed=10_000).double().attention_matrix(q, k)
    errors = []
    for seed in range(draws):
        approx = FavorAttention(d, m, kernel=kind, seed=seed).double().attention_matrix(q, k)
        errors.append(0.5 * (approx - reference).abs().sum(-1).mean().item())
    return statistics.mean(errors)


def section(rec: dict) -> str:
    """Two lines under the family-contacts part of RESULTS.md: each row's step time as a ratio to exact's
    per length, and the maps' error per m."""
    lengths = [str(n) for n in rec["lengths"]]
    ratios = "; ".join(
        name + " " + ", ".join(f"{rec['ratio_to_exact'][n][name]:.2f}" for n in lengths)
        for name in rec["rows"]
        if name != "exact"
    )
    exact = ", ".join(f"{1e3 * rec['step_s'][n]['exact']:.0f}" for n in lengths)
    ms = ", ".join(str(m) for m in rec["features"])
    errors = "; ".join(
        f"{a} s = {s} " + ", ".join(fmt(rec["map_error"][s][a][str(m)]) for m in rec["features"])
        for s in rec["map_error"]
        for a in KINDS
    )
    return (
        f"- Factored attention (issue 21), one training step of the aligned recipe's model (`{rec['command']}`, "
        f"{rec['machine']}, {rec['threads']} threads, batch {rec['batch']}, median of {rec['steps']} round-robin "
        f"steps; {source(rec)}, {day(rec['date'])}): time / exact's at L = {', '.join(lengths)}: {ratios} "
        f"(exact {exact} ms).\n"
        f"- Its maps' error (mean row total variation, L = {rec['map_length']}, q, k ~ N(0, s^2), "
        f"{rec['map_draws']} draws of W; softmax vs exact, ReLU vs m = {rec['reference_features']}) at m = {ms}: "
        f"{errors}."
    )


def floors(records: list[dict]) -> list[Floor]:
    """Issue 21: factored Performer-ReLU at the recipe's m no slower per step than exact at L 70-150."""
    rec = newest(records)
    value = None
    if rec is not None:
        name = label("favor_relu", rec["recipe_features"])
        value = max(rec["ratio_to_exact"][n][name] for n in rec["ratio_to_exact"]) if name in rec["rows"] else None
    what = "factored Performer-ReLU / exact step time, worst of L 70-150 (CPU)"
    return [Floor("21", what, 1.0, True, value, rec, "python benchmarks/factored_speed.py")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[70, 100, 150])
    ap.add_argument("--features", type=int, nargs="+", default=[32, 64, 128], help="the m of the FAVOR+ rows")
    ap.add_argument("--recipe-features", type=int, default=64, help="the m the floor reads")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="default: PyTorch's")
    ap.add_argument("--draws", type=int, default=5, help="draws of W for the map error")
    ap.add_argument("--reference-features", type=int, default=4096)
    ap.add_argument("--scales", type=float, nargs="+", default=[0.5, 1.0], help="std of q, k for the map error")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "factored_speed.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    step_s, ratios = {}, {}
    for length in args.lengths:
        medians = time_length(length, args.features, args.steps, args.warmup)
        step_s[str(length)] = medians
        ratios[str(length)] = {name: t / medians["exact"] for name, t in medians.items()}
        print(
            f"L={length}: "
            + ", ".join(f"{n} {1e3 * t:.0f} ms ({ratios[str(length)][n]:.2f}x)" for n, t in medians.items())
        )
    map_length = max(args.lengths)
    errors = {
        str(s): {
            a: {str(m): map_error(kind, m, map_length, s, args.draws, args.reference_features) for m in args.features}
            for a, kind in KINDS.items()
        }
        for s in args.scales
    }
    print("map error:", errors)
    fields = {
        "lengths": args.lengths,
        "features": args.features,
        "recipe_features": args.recipe_features,
        "rows": [label(a, m) for a, m in rows(args.features)],
        "batch": BATCH,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": torch.get_num_threads(),
        "model": RECIPE,
        "step_s": step_s,
        "ratio_to_exact": ratios,
        "map_length": map_length,
        "map_draws": args.draws,
        "reference_features": args.reference_features,
        "map_error": errors,
    }
    print(f"wrote {write(Path(args.out), record('factored_speed', fields))}")


if __name__ == "__main__":
    main()
