"""Study 3: backward compatibility, an exact Transformer's weights in a Performer (paper Fig. 5 style).

1. Train an exact-softmax BID Transformer on the Swiss-Prot sample (``pretrained.exact_reference``,
   the model study 1 takes its real queries and keys from; cached).
2. Load its weights into a FAVOR+ softmax and a FAVOR+ ReLU model of the same shape
   (``PerformerLM.load_backbone``: every parameter is shared, only the random-feature buffers are
   the Performer's own) and measure masked-LM accuracy right after the swap, for several feature
   draws.
3. Fine-tune each briefly (same data, lr ``--lr``), evaluating every ``--eval-every`` steps; the
   exact model gets the same fine-tune as a control, so the gain from the extra steps alone is
   visible.

    python -m protein_performer.studies.compatibility                  # CPU, ~10 min
    python -m protein_performer.studies.compatibility --device cuda --pretrain-steps 5000 --finetune-steps 1000
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch

from protein_performer.studies import pretrained, reports, sequences, small_training, study_cli
from protein_performer.training.utils import stable_seed

log = logging.getLogger(__name__)
NAME = "compatibility"
TARGETS = ("favor_softmax", "favor_relu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = study_cli.study_parser(__doc__)
    p.add_argument("--fasta", type=Path, default=sequences.SAMPLE)
    study_cli.add_device_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=300, help="training steps of the exact Transformer")
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tune learning rate")
    p.add_argument("--nb-features", type=int, default=64)
    p.add_argument("--swap-draws", type=int, default=3, help="feature draws for the accuracy right after the swap")
    p.add_argument(
        "--eval-masks",
        type=int,
        default=1,
        help="mask draws of the validation split pooled in every evaluation (more targets, less noise)",
    )
    p.add_argument("--tag", default="", help="suffix of the output files and of the markdown section")
    p.add_argument("--cache-dir", type=Path, default=pretrained.DEFAULT_CACHE)
    study_cli.add_output_args(p)
    return study_cli.parse_study_args(p, argv)


def swap(exact: torch.nn.Module, attention: str, shape: dict, nb_features: int, seed: int) -> torch.nn.Module:
    """A ``attention`` model of ``shape`` holding the exact model's weights (its own features from ``seed``)."""
    model = small_training.build_model(
        attention, False, seed, nb_features=nb_features, favor_kwargs={"seed": seed}, **shape
    )
    info = model.load_backbone(copy.deepcopy(exact.state_dict()))
    if info.unexpected:
        raise RuntimeError(f"unexpected keys after the swap: {info.unexpected[:5]}")
    return model.eval()


def run(args: argparse.Namespace) -> dict:
    info, t0 = study_cli.start_study(args)
    exact, meta, shape, pre_cfg = pretrained.exact_reference(
        args.pretrain_steps, args.seed, args.fasta, args.device, args.cache_dir, not args.no_progress
    )
    train_seqs, valid_seqs, counts = sequences.load_split(
        args.fasta, args.seed
    )  # the split the exact model was trained on
    valid = [
        b
        for mask_seed in range(args.eval_masks)
        for b in sequences.eval_batches(valid_seqs, "bid", pre_cfg.max_length, 32, seed=mask_seed)
    ]
    exact_metrics = small_training.evaluate(exact, valid, args.device)
    log.info("exact Transformer: %s", exact_metrics)

    swapped = {}
    for attention in TARGETS:
        draws = []
        for d in range(args.swap_draws):
            m = swap(exact, attention, shape, args.nb_features, stable_seed(args.seed, "swap", attention, d)).to(
                args.device
            )
            draws.append(small_training.evaluate(m, valid, args.device))
        swapped[attention] = {
            "draws": draws,
            "acc_mean": float(np.mean([x["acc"] for x in draws])),
            "acc_std": float(np.std([x["acc"] for x in draws])),
            "loss_mean": float(np.mean([x["loss"] for x in draws])),
        }
        log.info(
            "%s right after the swap: acc %.4f +- %.4f",
            attention,
            swapped[attention]["acc_mean"],
            swapped[attention]["acc_std"],
        )

    # fine-tune (first draw's features, kept fixed), and the exact model as the control
    ft_cfg = small_training.TrainConfig(
        objective="bid",
        max_length=pre_cfg.max_length,
        batch_size=pre_cfg.batch_size,
        steps=args.finetune_steps,
        lr=args.lr,
        warmup_steps=0,
        seed=stable_seed(args.seed, "finetune"),
    )
    curves = {}
    for attention in (*TARGETS, "exact"):
        model = (
            copy.deepcopy(exact)
            if attention == "exact"
            else swap(exact, attention, shape, args.nb_features, stable_seed(args.seed, "swap", attention, 0))
        )
        hist = small_training.fit_small_model(
            model,
            train_seqs,
            ft_cfg,
            args.device,
            eval_every=args.eval_every,
            eval_fn=lambda m: small_training.evaluate(m, valid, args.device),
            progress=not args.no_progress,
            desc=f"fine-tune {attention}",
        )
        curves[attention] = [{"step": h["step"], "acc": h["acc"], "loss": h["loss"]} for h in hist if "acc" in h]
        log.info("%s fine-tune: %s", attention, curves[attention][-1])

    result = {
        **study_cli.study_record(NAME, args, info),
        "data": counts,
        "model": shape,
        "pretrain": {"config": vars(pre_cfg), **meta},
        "exact": exact_metrics,
        "after_swap": swapped,
        "finetune": curves,
        "wall_s": time.perf_counter() - t0,
        "command": study_cli.study_command(NAME, args),
    }
    name = NAME + args.tag
    study_cli.write_study(name, result, args, lambda path: plot(result, path), lambda r: markdown(r, name))
    return result


def plot(r: dict, path: Path) -> None:
    plt = reports.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for attention, style in zip((*TARGETS, "exact"), ("o-", "s-", "k--")):
        c = r["finetune"][attention]
        label = "exact (control, same fine-tune)" if attention == "exact" else f"{attention} (exact weights)"
        ax.plot([x["step"] for x in c], [100 * x["acc"] for x in c], style, label=label)
    ax.axhline(100 * r["exact"]["acc"], color="grey", lw=0.8, ls=":", label="exact before fine-tune")
    ax.set_xlabel("fine-tune steps")
    ax.set_ylabel("masked-LM accuracy on valid (%)")
    ax.set_title("Exact Transformer weights loaded into Performers")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    reports.save_figure(fig, path, dpi=120)


def markdown(r: dict, name: str = NAME) -> str:
    a, ex, sw, ft = r["args"], r["exact"], r["after_swap"], r["finetune"]
    rows = [
        [
            "exact Transformer (trained)",
            100 * ex["acc"],
            ex["ppl"],
            "-",
            100 * ft["exact"][-1]["acc"],
            ft["exact"][-1]["loss"],
        ]
    ]
    for attention in TARGETS:
        rows.append(
            [
                f"{attention} (exact weights)",
                f"{100 * sw[attention]['acc_mean']:.2f} +- {100 * sw[attention]['acc_std']:.2f}",
                float(np.exp(sw[attention]["loss_mean"])),
                f"{100 * (sw[attention]['acc_mean'] - ex['acc']):+.2f}",
                100 * ft[attention][-1]["acc"],
                ft[attention][-1]["loss"],
            ]
        )
    steps = [x["step"] for x in ft["exact"]]
    curve_rows = [[s] + [100 * ft[att][i]["acc"] for att in (*TARGETS, "exact")] for i, s in enumerate(steps)]
    notes = []
    for attention in TARGETS:
        drop = ex["acc"] - sw[attention]["acc_mean"]
        end = ft[attention][-1]["acc"]
        recovered = end >= ex["acc"] - 0.005
        notes.append(
            f"{attention}: {100 * drop:.2f} points lost at the swap, "
            f"{'recovered to within 0.5 points of (or above) the exact model' if recovered else 'NOT recovered'} "
            f"after {a['finetune_steps']} fine-tune steps ({100 * end:.2f}% vs {100 * ex['acc']:.2f}%; the exact control "
            f"reached {100 * ft['exact'][-1]['acc']:.2f}% with the same fine-tune)"
            + ("; there was no real loss to recover" if drop < 0.005 else "")
        )
    p = r["pretrain"]
    return f"""## Study 3: backward compatibility (exact weights into Performers)

Command: `{r["command"]}`
Machine: {reports.machine_line(r["machine"])}. Wall time {r["wall_s"]:.0f} s.
Exact BID Transformer: {r["model"]["depth"]} layers, dim {r["model"]["dim"]}, {r["model"]["heads"]} heads x {r["model"]["dim_head"]},
trained {p["config"]["steps"]} steps (batch {p["config"]["batch_size"]} x {p["config"]["max_length"]}) on the Swiss-Prot sample
({"from the cache" if p.get("cached") else f"{p['train_s']:.0f} s"}); FAVOR+ m = {a["nb_features"]}; accuracy on the masked positions of
the validation split ({a.get("eval_masks", 1)} fixed mask draws pooled, {int(ex["targets"])} targets: binomial std of an
accuracy about {100 * (ex["acc"] * (1 - ex["acc"]) / ex["targets"]) ** 0.5:.2f} points). After the swap: mean +- std over {a["swap_draws"]} feature draws. Fine-tune: {a["finetune_steps"]} steps,
lr {a["lr"]}, fixed features; the exact model gets the same fine-tune as a control.

{reports.md_table(["model", "acc % (after swap)", "ppl", "change at swap (points)", f"acc % after {a['finetune_steps']} steps", "loss after"], rows)}

Accuracy (%) vs fine-tune steps:

{reports.md_table(["step", *TARGETS, "exact (control)"], curve_rows)}

{chr(10).join("- " + n + "." for n in notes)}
The paper's claim: the swapped Performer loses accuracy at first and recovers it after a short fine-tune.
Figure: `studies/{name}.png`; data: `studies/{name}.json`.
"""


def main(argv: list[str] | None = None) -> dict:
    args = study_cli.study_args(NAME, parse_args, argv)
    r = run(args)
    print(f"exact acc {r['exact']['acc']:.4f}")
    for attention in TARGETS:
        print(
            f"{attention}: after swap {r['after_swap'][attention]['acc_mean']:.4f}, "
            f"after fine-tune {r['finetune'][attention][-1]['acc']:.4f}"
        )
    return r


if __name__ == "__main__":
    main()
