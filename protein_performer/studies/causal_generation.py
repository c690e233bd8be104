"""Study 5: causal generation with a recurrent FAVOR+ state (issue 6, paper Sec. 2.6).

A UNI Performer (FAVOR+ softmax, causal) is trained briefly on real Swiss-Prot sequences, then
protein sequences are sampled token by token with ``protein_performer.generation``: each layer
carries S (m x d) and z (m) from token to token, O(1) work per new token. The study shows

1. equality: the recurrent path samples the same tokens as recomputing ``model(prefix)`` for every
   new token (same generator), and the logits it sampled from agree to rounding; at L = 4096 the
   state after 4096 real tokens gives the logits of the full causal forward on those tokens.
   Both in float32 (as trained) and in a float64 copy (to show that the gap is rounding only);
2. speed: time per new token at prefix lengths up to L = 4096, recurrent step vs recomputing the
   full causal forward (FAVOR+), and, for scale, the same weights with exact attention, recomputed
   and with a key/value cache.

The full causal forward stabilizes the key features of position i with the running max over keys
0..i (favor.py, ``causal_stabilizer``), exactly like the recurrent state, so the two agree with the
default feature floor eps too. (The paper's released code takes one max over the whole sequence;
there later keys shift earlier outputs through eps: 8.6e-3 in logits at L = 8192 in this study
before the change.)

    python -m protein_performer.studies.causal_generation                 # CPU, ~3 min
    python -m protein_performer.studies.causal_generation --device cuda --length 16384 --steps 2000
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch

from protein_performer.data.tokenizer import Tokenizer
from protein_performer.generation import generate, generate_recompute, init_state, prefill, step
from protein_performer.studies import reports, sequences, small_training, study_cli

log = logging.getLogger(__name__)
NAME = "causal_generation"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = study_cli.study_parser(__doc__)
    p.add_argument("--fasta", type=Path, default=sequences.SAMPLE)
    study_cli.add_device_args(p, threads_help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=200, help="training steps of the UNI model")
    p.add_argument("--max-length", type=int, default=256, help="training crop length")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim-head", type=int, default=32)
    p.add_argument("--nb-features", type=int, default=64)
    p.add_argument("--length", type=int, default=4096, help="prefix length L of the speed / equality check")
    p.add_argument("--timing-points", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per point (the fastest is kept)")
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--sample-tokens", type=int, default=120)
    p.add_argument("--temperature", type=float, default=1.0)
    study_cli.add_output_args(p)
    return study_cli.parse_study_args(p, argv)


def residue_mask(vocab_size: int) -> torch.Tensor:
    """Ids a sampled protein may contain: the 20 standard residues and eos."""
    tok = Tokenizer()
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    allowed[torch.as_tensor(tok.standard_ids.astype(np.int64))] = True
    allowed[tok.eos_id] = True
    return allowed


def token_stream(seqs: list[np.ndarray], length: int) -> torch.Tensor:
    """(1, length) real tokens: [bos, s_0, eos, bos, s_1, eos, ...] cut at ``length``."""
    tok = Tokenizer()
    parts, total = [], 0
    for s in seqs * (1 + length // max(1, sum(len(x) for x in seqs))):
        parts.append(np.concatenate([[tok.bos_id], s.astype(np.int64), [tok.eos_id]]))
        total += parts[-1].size
        if total >= length:
            break
    return torch.from_numpy(np.concatenate(parts)[:length]).view(1, -1)


def in_dtype(model: torch.nn.Module, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A copy of ``model`` in ``dtype`` (same weights, same random features, same eps)."""
    return copy.deepcopy(model).to(dtype).eval()


@torch.no_grad()
def equality_checks(model, prompt, n_tokens, temperature, allowed, seed, stream) -> dict:
    """Recurrent vs recomputed generation, and the state after ``stream`` vs the full forward."""
    out = {}
    for label, m in (("float32", model), ("float64", in_dtype(model))):
        g_rec, l_rec = generate(
            m, prompt, n_tokens, temperature, torch.Generator().manual_seed(seed), allowed, return_logits=True
        )
        g_full, l_full = generate_recompute(
            m, prompt, n_tokens, temperature, torch.Generator().manual_seed(seed), allowed, return_logits=True
        )
        full = m(stream)["logits"][0]  # (L, vocab): the causal forward on the whole stream
        steps, _ = prefill(m, stream)
        diff = (steps[0] - full).abs().amax(dim=-1)
        out[label] = {
            "tokens_identical": bool(torch.equal(g_rec, g_full)),
            "token_agreement": float((g_rec == g_full).float().mean()),
            "generation_max_abs_logit_diff": float((l_rec - l_full).abs().max()),
            "stream_length": int(stream.shape[1]),
            "stream_last_position_max_abs_logit_diff": float(diff[-1]),
            "stream_all_positions_max_abs_logit_diff": float(diff.max()),
            "max_abs_logit": float(full.abs().max()),
        }
        log.info("equality %s: %s", label, out[label])
    out["sampled_tokens"] = g_rec.tolist()
    return out


@torch.no_grad()
def timing(model, exact, stream, points, reps, device, progress=True) -> list[dict]:
    """Seconds per new token at each prefix length: recurrent step vs recomputation (and exact)."""
    from tqdm.auto import tqdm

    points = sorted(p for p in points if p <= stream.shape[1])
    rows = []
    states = {}
    for label, m in (("favor", model), ("exact", exact)):
        state = init_state(m, 1, stream.device)
        bar = tqdm(range(max(points)), desc=f"prefill {label}", disable=not progress, leave=False)
        for t in bar:
            if t + 1 in points:
                states[(label, t + 1)] = state  # the state holding t tokens; the next token is stream[t]
            _, state = step(m, stream[:, t], state)
    for p in points:
        nxt = stream[:, p - 1]
        row = {"prefix_length": p}
        row["favor_recurrent_s"] = reports.best_time(
            lambda nxt=nxt, p=p: step(model, nxt, states[("favor", p)]), reps, device
        )
        row["favor_recompute_s"] = reports.best_time(lambda p=p: model(stream[:, :p]), max(1, reps // 2), device)
        row["exact_kv_cache_s"] = reports.best_time(
            lambda nxt=nxt, p=p: step(exact, nxt, states[("exact", p)]), reps, device
        )
        row["exact_recompute_s"] = reports.best_time(lambda p=p: exact(stream[:, :p]), max(1, reps // 2), device)
        row["favor_state_bytes"] = states[("favor", p)].nbytes()
        row["exact_cache_bytes"] = states[("exact", p)].nbytes()
        row["speedup_recurrent_vs_recompute"] = row["favor_recompute_s"] / row["favor_recurrent_s"]
        log.info("timing at L=%d: %s", p, row)
        rows.append(row)
    return rows


def composition(token_lists: list[list[int]]) -> np.ndarray:
    """Frequencies of the 20 standard residues over sequences of ids."""
    tok = Tokenizer()
    ids = np.concatenate([np.asarray(t, dtype=np.int64) for t in token_lists])
    counts = np.bincount(ids, minlength=tok.vocab_size)[tok.standard_ids.astype(np.int64)].astype(float)
    return counts / max(counts.sum(), 1.0)


def plot(rows: list[dict], path: Path) -> None:
    plt = reports.pyplot()
    x = [r["prefix_length"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (
        ("favor_recurrent_s", "FAVOR+ recurrent state (O(1))", "o-"),
        ("favor_recompute_s", "FAVOR+ recompute prefix (O(L))", "s-"),
        ("exact_kv_cache_s", "exact, key/value cache (O(L))", "^--"),
        ("exact_recompute_s", "exact, recompute prefix (O(L^2))", "v--"),
    ):
        ax.loglog(x, [r[key] * 1e3 for r in rows], style, label=label, base=2)
    ax.set_xlabel("prefix length L (tokens)")
    ax.set_ylabel("time per new token (ms)")
    ax.set_title("Causal generation: time per token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    reports.save_figure(fig, path, dpi=120)


def run(args: argparse.Namespace) -> dict:
    info, t_start = study_cli.start_study(args)
    train_seqs, valid_seqs, counts = sequences.load_split(args.fasta, args.seed)
    max_len = max(args.length, args.max_length)
    shape = dict(
        vocab_size=Tokenizer().vocab_size,
        max_len=max_len,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        dim_head=args.dim_head,
        ff_dim=2 * args.dim,
        dropout=0.0,
        nb_features=args.nb_features,
    )
    model = small_training.build_model("favor_softmax", True, args.seed, **shape)
    cfg = small_training.TrainConfig(
        objective="uni", max_length=args.max_length, batch_size=args.batch_size, steps=args.steps, seed=args.seed
    )
    valid = sequences.eval_batches(valid_seqs, "uni", args.max_length, 32)
    before = small_training.evaluate(model, valid)
    small_training.fit_small_model(
        model, train_seqs, cfg, args.device, progress=not args.no_progress, desc="UNI FAVOR+"
    )
    model = model.cpu().eval() if args.device == "cpu" else model.eval()
    after = small_training.evaluate(model, valid, args.device)
    log.info("UNI model valid: before %s after %s", before, after)

    device = args.device
    allowed = residue_mask(shape["vocab_size"])
    prompt = torch.full((args.n_samples, 1), Tokenizer().bos_id, dtype=torch.long, device=device)
    stream = token_stream(valid_seqs, args.length).to(device)
    eq = equality_checks(model, prompt, args.sample_tokens, args.temperature, allowed, args.seed, stream)

    exact = small_training.build_model("exact", True, args.seed, **shape).to(device).eval()
    exact.load_backbone(model.state_dict())
    rows = timing(model, exact, stream, args.timing_points, args.reps, device, not args.no_progress)

    tok = Tokenizer()
    samples = []
    for ids in eq.pop("sampled_tokens"):
        ids = ids[1:]
        if tok.eos_id in ids:
            ids = ids[: ids.index(tok.eos_id)]
        samples.append(ids)
    comp_samples, comp_data = composition(samples), composition([s.tolist() for s in train_seqs])
    result = {
        **study_cli.study_record(NAME, args, info),
        "data": counts,
        "model": shape,
        "valid_before_training": before,
        "valid_after_training": after,
        "equality": eq,
        "timing": rows,
        "samples": [tok.decode(s) for s in samples],
        "composition_pearson_r": float(np.corrcoef(comp_samples, comp_data)[0, 1]),
        "command": study_cli.study_command(NAME, args),
        "wall_s": time.perf_counter() - t_start,
    }
    study_cli.write_study(NAME, result, args, lambda path: plot(rows, path), markdown)
    return result


def _verdict(r: dict) -> list[str]:
    """The study's conclusions, one bullet each: equality, O(1) per token, speed, against a KV cache."""
    eq, last, first = r["equality"], r["timing"][-1], r["timing"][0]
    speedup = last["speedup_recurrent_vs_recompute"]
    vs_cache = last["exact_kv_cache_s"] / last["favor_recurrent_s"]
    growth = last["favor_recurrent_s"] / first["favor_recurrent_s"]
    f64 = eq["float64"]
    same = (
        f64["tokens_identical"]
        and f64["generation_max_abs_logit_diff"] < 1e-9
        and f64["stream_all_positions_max_abs_logit_diff"] < 1e-9
    )
    verdict = [
        f"- Equality: {'holds' if same else 'does NOT hold'}: in float64 (default eps) the recurrent path and recomputation "
        f"sample the same tokens and their logits differ by {f64['generation_max_abs_logit_diff']:.1e} at most, and by "
        f"{f64['stream_all_positions_max_abs_logit_diff']:.1e} at any position of the {f64['stream_length']}-token stream "
        f"(float32: {eq['float32']['generation_max_abs_logit_diff']:.1e} and {eq['float32']['stream_all_positions_max_abs_logit_diff']:.1e}, rounding)."
    ]
    verdict.append(
        f"- O(1) per token: the recurrent step took {growth:.2f}x as long at L = {last['prefix_length']} as at "
        f"L = {first['prefix_length']}, with a state of constant size"
        + (" (holds)." if growth < 1.5 else " (does NOT look constant here).")
    )
    if speedup >= 2:
        verdict.append(
            f"- Speed: {speedup:.0f}x faster per token than recomputing the prefix at L = {last['prefix_length']}."
        )
    else:
        verdict.append(
            f"- Speed: only {speedup:.1f}x faster per token than recomputing the prefix at L = {last['prefix_length']}: "
            "on this device the per-token time is fixed overhead (kernel launches, Python), not work that grows with L, "
            "so the claimed advantage does NOT show at these lengths."
        )
    verdict.append(
        "- Against an exact-attention key/value cache (also incremental, O(L) per token) the recurrent FAVOR+ step is "
        + (f"{vs_cache:.1f}x faster" if vs_cache >= 1 else f"{1 / vs_cache:.1f}x slower (does NOT beat it)")
        + f" at L = {last['prefix_length']}; its state is {last['favor_state_bytes'] // 1024} KiB against "
        f"{last['exact_cache_bytes'] // 1024} KiB of cache."
    )
    return verdict


def markdown(r: dict) -> str:
    a, eq = r["args"], r["equality"]
    rows = [
        [
            t["prefix_length"],
            t["favor_recurrent_s"] * 1e3,
            t["favor_recompute_s"] * 1e3,
            t["exact_kv_cache_s"] * 1e3,
            t["exact_recompute_s"] * 1e3,
            f"{t['speedup_recurrent_vs_recompute']:.0f}x",
            t["favor_state_bytes"] // 1024,
            t["exact_cache_bytes"] // 1024,
        ]
        for t in r["timing"]
    ]
    eq_rows = [
        [
            k,
            v["tokens_identical"],
            v["generation_max_abs_logit_diff"],
            v["stream_length"],
            v["stream_last_position_max_abs_logit_diff"],
            v["stream_all_positions_max_abs_logit_diff"],
            v["max_abs_logit"],
        ]
        for k, v in eq.items()
    ]
    verdict = _verdict(r)
    m = r["model"]
    return f"""## Study 5: causal generation with a recurrent state

Command: `{r["command"]}`
Machine: {reports.machine_line(r["machine"])}. Wall time {r["wall_s"]:.0f} s.
Model: UNI (causal) FAVOR+ softmax, {m["depth"]} layers, dim {m["dim"]}, {m["heads"]} heads x {m["dim_head"]}, m = {m["nb_features"]},
trained {a["steps"]} steps on crops of {a["max_length"]} of the Swiss-Prot sample ({r["data"]["kept"]} sequences):
valid loss {r["valid_before_training"]["loss"]:.3f} -> {r["valid_after_training"]["loss"]:.3f}, accuracy {r["valid_after_training"]["acc"]:.3f}.

Equality (same generator for both paths; {a["n_samples"]} samples x {a["sample_tokens"]} tokens, then one real stream of {eq["float32"]["stream_length"]} tokens):

{reports.md_table(["model", "same tokens", "max abs diff, sampled logits", "stream L", "max abs diff, last position", "max abs diff, any position", "max abs logit"], eq_rows)}

Time per new token (ms, best of {a["reps"]} after a warm-up; the recurrent step and the cache continue from the state after L tokens; recompute = one full causal forward of the L-token prefix):

{reports.md_table(["L", "FAVOR+ recurrent", "FAVOR+ recompute", "exact KV cache", "exact recompute", "speedup recurrent vs recompute", "FAVOR+ state KiB", "exact cache KiB"], rows)}

{chr(10).join(verdict)}

Residue composition of the samples vs the training data: Pearson r = {r["composition_pearson_r"]:.2f}. First samples:
{chr(10).join("`" + (s[:70] or "(empty)") + "`  " for s in r["samples"][:3])}

Causality: the full causal forward stabilizes position i with the running max over keys 0..i, like the recurrent state,
so the two agree with the default feature floor eps too (the released code's single max over the sequence made them differ
by up to 8.6e-3 in logits at L = 8192 with this model size, in this study's earlier run).
Figure: `studies/{NAME}.png`; data: `studies/{NAME}.json`.
"""


def main(argv: list[str] | None = None) -> dict:
    args = study_cli.study_args(NAME, parse_args, argv)
    result = run(args)
    last = result["timing"][-1]
    print(f"equality: {result['equality']}")
    print(
        f"L={last['prefix_length']}: recurrent {last['favor_recurrent_s'] * 1e3:.2f} ms/token, "
        f"recompute {last['favor_recompute_s'] * 1e3:.1f} ms/token, speedup {last['speedup_recurrent_vs_recompute']:.0f}x"
    )
    return result


if __name__ == "__main__":
    main()
