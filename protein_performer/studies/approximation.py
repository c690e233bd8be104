"""Study 1: how well FAVOR+ approximates softmax attention vs the number of random features m.

The paper's MSE figure: L = 4096, d = 16, m from 16 to 512, 15 samples; positive (FAVOR+) vs
trigonometric features, orthogonal vs iid. For every (feature kind, orthogonal?, m) and sample s
the study draws fresh random features and measures against the exact softmax attention
``A = softmax(Q K^T / sqrt(d))`` (rows sum to 1):

- ``mse_attn``  mean over all L x L entries of (A^ - A)^2, A^ = D^-1 Q' K'^T (favor.py's own
  ``attention_matrix``);
- ``mse_out``   mean over L x d entries of (A^ V - A V)^2;
- ``mse_small`` the same as mse_attn over the entries where A is in its lowest decile only
  ("where attention values are small", the regime in which the paper says positive features win);
- ``relerr_small`` mean |A^ - A| / A over those entries.

Data: synthetic q, k, v ~ N(0, sigma^2 I_d) (a fresh draw per sample; sigma 0.5 and 1: with sigma = 1
the logits q.k / sqrt(d) have unit spread and |q|^2 / sqrt(d) ~ 4, a regime where both estimators
have a very large variance), and real queries,
keys and values captured with forward hooks from every head of a BID exact-softmax Transformer
(head dim 16) trained on the Swiss-Prot sample, on real proteins (the longest validation
sequences, cropped to the model's length). The same number of random directions m is used for
both kinds, so trigonometric features have 2m entries (sin and cos), positive ones m.

    python -m protein_performer.studies.approximation            # CPU, a few minutes
    python -m protein_performer.studies.approximation --device cuda --real-steps 2000 --real-length 1024
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from protein_performer.data.tokenizer import Tokenizer
from protein_performer.model.attention import SoftmaxAttention
from protein_performer.model.favor import FavorAttention
from protein_performer.studies import pretrained, reports, sequences, study_cli
from protein_performer.training.utils import stable_seed

log = logging.getLogger(__name__)
NAME = "approximation"
CONFIGS = (("positive", True), ("positive", False), ("trig", True), ("trig", False))
METRICS = ("mse_attn", "mse_out", "mse_small", "relerr_small")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = study_cli.study_parser(__doc__)
    p.add_argument("--length", type=int, default=4096, help="L of the synthetic set")
    p.add_argument("--dim", type=int, default=16, help="d, the head dimension of the synthetic set")
    p.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512], help="m values")
    p.add_argument("--samples", type=int, default=15)
    p.add_argument(
        "--sigmas",
        type=float,
        nargs="+",
        default=[0.5, 1.0],
        help="std of the synthetic q, k, v entries (one set each)",
    )
    p.add_argument("--real", action=argparse.BooleanOptionalAction, default=True, help="also run on real q/k")
    p.add_argument(
        "--real-length", type=int, default=512, help="crop of the real proteins (at most the model's max_len, 512)"
    )
    p.add_argument("--real-proteins", type=int, default=2, help="real proteins (the longest validation ones)")
    p.add_argument("--real-steps", type=int, default=300, help="training steps of the exact model")
    p.add_argument("--fasta", type=Path, default=sequences.SAMPLE)
    p.add_argument("--cache-dir", type=Path, default=pretrained.DEFAULT_CACHE)
    study_cli.add_device_args(p)
    p.add_argument("--seed", type=int, default=0)
    study_cli.add_output_args(p)
    return study_cli.parse_study_args(p, argv)


def favor_module(kind: str, orthogonal: bool, dim: int, m: int, seed: int) -> FavorAttention:
    """FAVOR+ attention with m random directions: positive features (m entries) or trigonometric
    (sin and cos, 2m entries)."""
    if kind == "positive":
        return FavorAttention(dim, m, kernel="softmax", orthogonal=orthogonal, seed=seed)
    if kind == "trig":
        return FavorAttention(dim, 2 * m, kernel="softmax_trig", orthogonal=orthogonal, seed=seed)
    raise ValueError(f"kind must be 'positive' or 'trig', got {kind!r}")


class Reference:
    """What every approximation of one (q, k, v) is compared with, computed once: the exact
    attention A (b, h, l, l), A V, and the flat indices of the small entries of A (per head, the
    entries at or below its ``small_quantile`` quantile)."""

    @torch.no_grad()
    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, small_quantile: float = 0.1):
        self.exact = SoftmaxAttention().attention_matrix(q, k)
        self.v = v.float()
        self.out = torch.einsum("bhlk,bhkd->bhld", self.exact, self.v)
        flat = self.exact.flatten(2)  # (b, h, l*l)
        k_small = max(1, int(small_quantile * flat.shape[-1]))
        thresh = flat.kthvalue(k_small, dim=-1, keepdim=True).values
        self.small_idx = torch.nonzero((flat <= thresh).flatten(), as_tuple=True)[0]  # into exact.flatten()
        self.small_vals = self.exact.flatten()[self.small_idx]


@torch.no_grad()
def errors(approx: torch.Tensor, ref: Reference) -> dict[str, float]:
    """The study's four error measures of an approximate attention matrix (b, h, l, l), averaged
    over all heads: mse_attn, mse_out, mse_small, relerr_small (see the module docstring)."""
    diff = approx.sub_(ref.exact) if not approx.requires_grad else approx - ref.exact  # approx is not used again
    out_err = torch.einsum("bhlk,bhkd->bhld", diff, ref.v)  # A^ V - A V = (A^ - A) V
    small = diff.flatten()[ref.small_idx]
    return {
        "mse_attn": float(torch.linalg.vector_norm(diff).pow(2) / diff.numel()),
        "mse_out": float(out_err.pow(2).mean()),
        "mse_small": float(small.pow(2).mean()),
        "relerr_small": float((small.abs() / ref.small_vals.clamp_min(1e-30)).mean()),
    }


def sweep(
    data_fn,
    dim: int,
    features: list[int],
    samples: int,
    seed: int,
    label: str,
    progress: bool = True,
) -> dict:
    """Run every (kind, orthogonal, m) x samples on the (q, k, v) that ``data_fn(sample)`` returns.

    Returns ``{config: {m: {metric: {"mean", "std", "values"}}}}`` with config "positive/orthogonal" etc.
    """
    from tqdm.auto import tqdm

    raw = {
        f"{kind}/{'orthogonal' if orth else 'iid'}": {m: {k: [] for k in METRICS} for m in features}
        for kind, orth in CONFIGS
    }
    bar = tqdm(
        total=samples * len(CONFIGS) * len(features), desc=f"approximation {label}", disable=not progress, leave=False
    )
    for s in range(samples):
        q, k, v = data_fn(s)
        ref = Reference(q, k, v)
        for kind, orth in CONFIGS:
            name = f"{kind}/{'orthogonal' if orth else 'iid'}"
            for m in features:
                # the same feature seed for orthogonal and iid: they differ only in the orthogonalization
                module = favor_module(kind, orth, dim, m, stable_seed(seed, label, "features", kind, m, s)).to(q.device)
                approx = module.attention_matrix(q, k)
                for key, val in errors(approx, ref).items():
                    raw[name][m][key].append(val)
                bar.update()
        del ref
    bar.close()
    return {
        name: {
            m: {
                key: {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "values": vals}
                for key, vals in per_m.items()
            }
            for m, per_m in per_cfg.items()
        }
        for name, per_cfg in raw.items()
    }


def synthetic_data(length: int, dim: int, sigma: float, seed: int, device: str):
    def data(sample: int):
        g = torch.Generator().manual_seed(stable_seed(seed, "synthetic", sample))
        q, k, v = (sigma * torch.randn(1, 1, length, dim, generator=g) for _ in range(3))
        return q.to(device), k.to(device), v.to(device)

    return data


def real_data(args) -> tuple[list, dict]:
    """(q, k, v) of every layer of the trained exact model (``pretrained.exact_reference``, shared with
    study 3) on the longest validation proteins, each (proteins, heads, L, 16), and where they come from."""
    tok = Tokenizer()
    model, meta, shape, cfg = pretrained.exact_reference(
        args.real_steps, args.seed, args.fasta, args.device, args.cache_dir, not args.no_progress
    )
    _, valid, _ = sequences.load_split(args.fasta, args.seed)
    order = sorted(range(len(valid)), key=lambda i: -len(valid[i]))[: args.real_proteins]
    length = min(args.real_length, shape["max_len"], min(len(valid[i]) for i in order) + tok.special_tokens(False))
    rows = []
    for i in order:
        rows.append(torch.from_numpy(tok.frame(valid[i], causal=False)[0][:length]))
    tokens = torch.stack(rows).to(args.device)
    layers = pretrained.capture_qkv(model, tokens)
    desc = {
        "model": shape,
        "train": vars(cfg),
        "trained": meta,
        "length": length,
        "proteins": len(order),
        "protein_lengths": [int(len(valid[i])) for i in order],
    }
    return layers, desc


def plot(results: dict, features: list[int], path: Path) -> None:
    plt = reports.pyplot()
    sets = list(results)
    fig, axes = plt.subplots(len(sets), 3, figsize=(13, 3.6 * len(sets)), squeeze=False)
    styles = {
        "positive/orthogonal": ("C0", "-"),
        "positive/iid": ("C0", "--"),
        "trig/orthogonal": ("C3", "-"),
        "trig/iid": ("C3", "--"),
    }
    for r, set_name in enumerate(sets):
        for c, (metric, title) in enumerate(
            (
                ("mse_attn", "MSE of the attention matrix"),
                ("mse_out", "MSE of the output A V"),
                ("mse_small", "MSE where A is small (lowest 10%)"),
            )
        ):
            ax = axes[r][c]
            for cfg, per_m in results[set_name]["errors"].items():
                color, ls = styles[cfg]
                mean = np.array([per_m[m][metric]["mean"] for m in features])
                std = np.array([per_m[m][metric]["std"] for m in features])
                ax.plot(features, mean, ls, color=color, marker="o", ms=3, label=cfg)
                ax.fill_between(features, np.maximum(mean - std, mean * 1e-3), mean + std, color=color, alpha=0.12)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{set_name}: {title}", fontsize=9)
            ax.set_xlabel("random features m")
            ax.grid(True, which="both", alpha=0.3)
            if c == 0:
                ax.legend(fontsize=7)
    reports.save_figure(fig, path)


def claims(errors_by_cfg: dict, features: list[int]) -> dict:
    """For each paper claim, at how many of the m values it holds (mean over samples)."""

    def frac(a: str, b: str, metric: str) -> dict:
        wins = [m for m in features if errors_by_cfg[a][m][metric]["mean"] < errors_by_cfg[b][m][metric]["mean"]]
        return {"holds_at_m": wins, "fraction": len(wins) / len(features)}

    return {
        "orthogonal_below_iid_positive_mse_attn": frac("positive/orthogonal", "positive/iid", "mse_attn"),
        "orthogonal_below_iid_trig_mse_attn": frac("trig/orthogonal", "trig/iid", "mse_attn"),
        "positive_below_trig_small_entries": frac("positive/orthogonal", "trig/orthogonal", "mse_small"),
        "positive_below_trig_small_entries_iid": frac("positive/iid", "trig/iid", "mse_small"),
        "positive_below_trig_mse_attn": frac("positive/orthogonal", "trig/orthogonal", "mse_attn"),
        "positive_below_trig_mse_out": frac("positive/orthogonal", "trig/orthogonal", "mse_out"),
    }


def run(args: argparse.Namespace) -> dict:
    info, t0 = study_cli.start_study(args)
    results = {}
    for sigma in args.sigmas:
        data = synthetic_data(args.length, args.dim, sigma, args.seed, args.device)
        errs = sweep(data, args.dim, args.features, args.samples, args.seed, f"synthetic{sigma}", not args.no_progress)
        results[f"synthetic sigma={sigma}"] = {
            "setup": {"length": args.length, "dim": args.dim, "sigma": sigma},
            "errors": errs,
            "claims": claims(errs, args.features),
        }
    if args.real:
        layers, desc = real_data(args)
        for i, (q, k, v) in enumerate(layers):
            errs = sweep(
                lambda s, q=q, k=k, v=v: (q, k, v),
                q.shape[-1],
                args.features,
                args.samples,
                args.seed,
                f"real_layer{i}",
                not args.no_progress,
            )
            results[f"real layer {i}"] = {"setup": desc, "errors": errs, "claims": claims(errs, args.features)}
    result = {
        **study_cli.study_record(NAME, args, info),
        "results": results,
        "wall_s": time.perf_counter() - t0,
        "command": study_cli.study_command(NAME, args),
    }
    study_cli.write_study(NAME, result, args, lambda path: plot(results, args.features, path), markdown)
    return result


def markdown(r: dict) -> str:
    a = r["args"]
    feats = a["features"]
    parts = [
        f"""## Study 1: approximation error vs number of random features

Command: `{r["command"]}`
Machine: {reports.machine_line(r["machine"])}. Wall time {r["wall_s"]:.0f} s.
Errors against exact softmax attention, mean over {a["samples"]} samples (fresh features each; std in the JSON).
Same number m of random directions for both kinds (trigonometric: 2m entries, sin and cos).
"small" = entries of the exact attention matrix in its lowest decile."""
    ]
    for set_name, res in r["results"].items():
        setup = res["setup"]
        if set_name.startswith("synthetic"):
            what = f"synthetic q, k, v ~ N(0, {setup['sigma']}^2 I), L = {setup['length']}, d = {setup['dim']}"
        else:
            t = setup["trained"]
            what = (
                f"real q, k, v of {set_name} (all {setup['model']['heads']} heads, d = {setup['model']['dim_head']}) of an exact "
                f"BID Transformer trained {setup['train']['steps']} steps on the Swiss-Prot sample (valid acc {t['valid']['acc']:.3f}), "
                f"on {setup['proteins']} real proteins of length {setup['protein_lengths']} cropped to L = {setup['length']}"
            )
        rows = []
        for m in feats:
            row = [m]
            for metric in ("mse_attn", "mse_out", "mse_small"):
                for cfg in ("positive/orthogonal", "positive/iid", "trig/orthogonal", "trig/iid"):
                    row.append(res["errors"][cfg][str(m) if str(m) in res["errors"][cfg] else m][metric]["mean"])
            rows.append(row)
        header = ["m"] + [
            f"{metric} {cfg}"
            for metric in ("attn", "out", "small")
            for cfg in ("pos/orth", "pos/iid", "trig/orth", "trig/iid")
        ]
        c = res["claims"]
        verdict = "; ".join(f"{k.replace('_', ' ')}: at {len(v['holds_at_m'])}/{len(feats)} m" for k, v in c.items())
        parts.append(
            f"### {set_name}: {what}\n\n{reports.md_table(header, rows)}\n\nClaims (mean over samples): {verdict}."
        )
    parts.append(verdict_text(r))
    parts.append(f"Figure: `studies/{NAME}.png`; data: `studies/{NAME}.json`.")
    return "\n\n".join(parts)


def verdict_text(r: dict) -> str:
    lines = ["**Where the paper's claims hold and where they do not:**"]
    for set_name, res in r["results"].items():
        c = res["claims"]
        orth = c["orthogonal_below_iid_positive_mse_attn"]["fraction"]
        small = c["positive_below_trig_small_entries"]["fraction"]
        overall = c["positive_below_trig_mse_attn"]["fraction"]
        msg = [
            f"- {set_name}: orthogonal below iid (positive features) at {orth:.0%} of the m values"
            f"{'' if orth == 1 else ' (does NOT hold everywhere)'}; positive below trigonometric on the small entries at {small:.0%}"
            f"{'' if small == 1 else ' (does NOT hold everywhere)'}; over all entries positive beats trigonometric at {overall:.0%}"
        ]
        lines.append("".join(msg) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = study_cli.study_args(NAME, parse_args, argv)
    result = run(args)
    for set_name, res in result["results"].items():
        print(set_name, {k: v["fraction"] for k, v in res["claims"].items()})
    return result


if __name__ == "__main__":
    main()
