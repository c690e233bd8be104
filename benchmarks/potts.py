"""The Potts-model baseline of the family-contacts recipe (issue 21, item 3): pseudo-likelihood DCA
(plmDCA, as GREMLIN and CCMpred fit it) in PyTorch on the filtered, reweighted alignment.

Model, on an alignment of N rows x L columns over q = 21 states (the 20 amino acids ``STANDARD_AA``
as 0-19; 20 for a gap and for the anomalous letters B O U X Z, as plmDCA reads them):

    P(x_i = a | x_-i) = exp(h_i(a) + sum_{j != i} J_ij(a, x_j)) / sum_c exp(h_i(c) + sum_{j != i} J_ij(c, x_j))

with fields h (L, q) and couplings J (L, L, q, q), symmetric (J_ij(a, b) = J_ji(b, a)) with zero
diagonal blocks (J_ii = 0). Fitted by L-BFGS (strong Wolfe line search) on

    loss = sum_n w_n sum_i -log P(x_ni | x_n,-i) + lambda_h |h|^2 + lambda_J sum_{i<j} |J_ij|^2

where w_n are the DCA sequence weights (recipes/family_contacts/msa.py: 1 / neighbours at >= 80%
identity), lambda_h = 0.01 and lambda_J = 0.01 (L - 1)(q - 1): GREMLIN's scaling (Kamisetty et al.
2013; CCMpred scales its pair penalty with L - 1 likewise), which keeps the penalty per coupling
comparable with the L - 1 couplings that each conditional sums. Contact score: the Frobenius norm
of each J_ij block over the 20 amino acids (the gap state left out), then APC (Dunn et al. 2008).

No maintained package does this offline on 2 cores: pydca (1.23, 2021) pins numpy <= 1.15 and
scipy 1.3; evcouplings calls the external ``plmc`` binary (not on PyPI).

    python benchmarks/potts.py --family PF00072 [--max-sequences N] [--max-iter 100]

extracts the family's domains from ``$PP_SHARED_DATA/pfam40_domains.fasta.gz`` as the recipe does
(``align=true``: each domain as its row of a global alignment to the family's kortemme40 chain,
domains >= 90% identical to the chain held out), puts the chain first as the query, filters,
reweights, fits, and scores the long-range P@L of the map with the recipe's scoring code; it prints
the row and adds it to benchmarks/results/potts.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _record import RESULTS, Floor, day, fmt, load, machine, now, record, source, table, when, write

from protein_performer.model.attention_potts import (  # the states and L2 terms they share
    AMINO,
    LAMBDA_H,
    Q,
    pair_penalty,
    potts_states,
)

log = logging.getLogger("potts")
REPO = Path(__file__).resolve().parents[1]
JSON = REPO / "benchmarks" / "results" / "potts.json"


def couplings(w: torch.Tensor, length: int, q: int = Q) -> torch.Tensor:
    """J (L, L, q, q) from a free (L q, L q) parameter: ``(W + W^T) / 2`` with the diagonal blocks
    zeroed, so J_ij(a, b) = J_ji(b, a) and J_ii = 0."""
    sym = 0.5 * (w + w.T)
    off = 1.0 - torch.eye(length, dtype=w.dtype, device=w.device)
    return sym.view(length, q, length, q) * off[:, None, :, None]


def neg_pseudo_log_likelihood(
    h: torch.Tensor,
    w: torch.Tensor,
    states: torch.Tensor,
    weights: torch.Tensor,
    lambda_h: float = LAMBDA_H,
    lambda_j: float | None = None,
) -> torch.Tensor:
    """The loss of the module docstring: ``sum_n w_n sum_i -log P(x_ni | x_n,-i)`` plus the L2
    terms. h: (L, q); w: (L q, L q) (see :func:`couplings`); states: (N, L) int64; weights: (N,)."""
    n, length = states.shape
    q = h.shape[1]
    lambda_j = pair_penalty(length, q) if lambda_j is None else lambda_j
    j = couplings(w, length, q)  # (i, a, j, b)
    onehot = torch.nn.functional.one_hot(states, q).to(h.dtype).view(n, length * q)  # (n, j b)
    logits = h + (onehot @ j.permute(2, 3, 0, 1).reshape(length * q, length * q)).view(n, length, q)  # (n, i, a)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, states[..., None]).squeeze(-1)  # (n, i)
    data = -(weights[:, None] * logp).sum()
    return data + lambda_h * (h**2).sum() + lambda_j * 0.5 * (j**2).sum()  # 0.5: each pair i<j once


def fit(
    states: np.ndarray,
    weights: np.ndarray,
    max_iter: int = 100,
    lambda_h: float = LAMBDA_H,
    lambda_j: float | None = None,
    q: int = Q,
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Fit h and J by L-BFGS from zero (at most ``max_iter`` iterations, 2 ``max_iter`` loss
    evaluations); returns h (L, q), J (L, L, q, q) and ``{"iterations", "evaluations", "loss",
    "seconds"}``. The optimizer minimises the loss divided by N_eff = sum_n w_n: the same minimum,
    but L-BFGS's first step and its stopping tolerances no longer depend on the alignment's size."""
    x = torch.as_tensor(np.asarray(states), dtype=torch.int64)
    wt = torch.as_tensor(np.asarray(weights), dtype=dtype)
    scale = 1.0 / float(wt.sum())
    length = x.shape[1]
    h = torch.zeros(length, q, dtype=dtype, requires_grad=True)
    w = torch.zeros(length * q, length * q, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [h, w], max_iter=max_iter, max_eval=2 * max_iter, history_size=20, line_search_fn="strong_wolfe"
    )
    evaluations = []

    def closure():
        opt.zero_grad()
        loss = neg_pseudo_log_likelihood(h, w, x, wt, lambda_h, lambda_j) * scale
        loss.backward()
        evaluations.append(float(loss.detach()))
        if len(evaluations) % 10 == 0:
            log.info("evaluation %d: loss / N_eff %.4f", len(evaluations), evaluations[-1])
        return loss

    start = time.perf_counter()
    opt.step(closure)
    with torch.no_grad():
        loss = float(neg_pseudo_log_likelihood(h, w, x, wt, lambda_h, lambda_j))
        j = couplings(w, length, q)
    info = {
        "iterations": int(opt.state_dict()["state"][0]["n_iter"]),
        "evaluations": len(evaluations),
        "loss": loss,
        "seconds": time.perf_counter() - start,
    }
    log.info("L-BFGS: %(iterations)d iterations, %(evaluations)d evaluations, loss %(loss).1f, %(seconds).1f s", info)
    return h.detach().numpy().astype(np.float64), j.permute(0, 2, 1, 3).numpy().astype(np.float64), info


def contact_scores(j: np.ndarray, amino: int = AMINO) -> np.ndarray:
    """APC of the Frobenius norms ``|J_ij|`` over the 20 amino acids (gap state left out), (L, L)."""
    from protein_performer.analysis.maps.ops import apc

    norms = np.sqrt((j[:, :, :amino, :amino] ** 2).sum((2, 3)))
    return apc(norms.astype(np.float64))


def on_query(scores: np.ndarray, columns: np.ndarray, length: int) -> np.ndarray:
    """Scores of the alignment's columns placed on the query's ``length`` positions (NaN elsewhere)."""
    out = np.full((length, length), np.nan)
    out[np.ix_(columns, columns)] = scores
    return out


def family_alignment(family: str, shared: Path, max_identity: float, max_sequences: int | None, workdir: Path):
    """The recipe's ``align=true`` rows of ``family`` (a domain's uncovered chain positions, X, as
    gaps) under its kortemme40 chain as the query; returns the :class:`Alignment`, the structure
    and the extraction's counts."""
    from protein_performer.analysis.alignment import GAP_RESIDUE
    from protein_performer.recipes.family_contacts.extract import extract_family, family_chain
    from protein_performer.recipes.family_contacts.msa import read_alignment
    from protein_performer.recipes.family_contacts.scoring import chain_residues

    structure = family_chain(shared / "structures" / "kortemme40", family)
    target, _ = chain_residues(structure)
    rows = workdir / "family.fasta"
    counts = extract_family(
        shared / "pfam40_domains.fasta.gz",
        family,
        rows,
        target=target,
        max_identity=max_identity,
        max_sequences=max_sequences,
        align=True,
    )
    aligned = workdir / "aligned.fasta"
    with open(aligned, "w") as fh:
        fh.write(f">query\n{target}\n")
        for line in rows.read_text().splitlines():
            fh.write((line if line.startswith(">") else line.replace(GAP_RESIDUE, "-")) + "\n")
    return read_alignment(aligned, format="fasta"), structure, counts


def true_contacts(structure: Path) -> np.ndarray:
    """The chain's contact map on its own sequence (the recipe's probe does the same)."""
    from protein_performer.analysis.contacts.metrics import contact_map
    from protein_performer.analysis.structures import align_to_sequence, coords_on_sequence, load_structures

    chain = load_structures(structure)[0][0]
    return contact_map(coords_on_sequence(chain, align_to_sequence(chain, chain.sequence)))


def run_tool(aligned: Path, structure: Path, minutes: float, threads: int, out: Path) -> dict:
    """``python -m protein_performer.family_contacts`` (its default model, attention-Potts) on the
    aligned FASTA that the Potts model is fitted on, as a user runs it: its headline and wall time."""
    cmd = [
        sys.executable, "-m", "protein_performer.family_contacts", f"input={aligned}", f"structure={structure}",
        f"output_dir={out}", f"minutes={minutes:g}", f"num_threads={threads}",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"family_contacts failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {
        "command": f"python -m protein_performer.family_contacts input=<aligned FASTA> structure=<chain> "
        f"output_dir=<OUT> minutes={minutes:g} num_threads={threads}",
        "minutes": minutes,
        "threads": threads,
        **{k: summary["headline"][k] for k in ("long_P@L", "long_P@L/5", "random_long_P@L")},
        "steps": summary["train"]["steps"],
        "model": summary["train"]["model"],
        "n_sequences": summary["prepare"]["n_kept"],
        "L_columns": summary["prepare"]["n_columns_kept"],
        "wall_s": round(wall, 1),
        "stage_s": summary["seconds"],
    }


def run_family(
    family: str,
    shared: Path,
    max_identity: float,
    max_sequences: int | None,
    max_iter: int,
    tool_minutes: float | None = None,
    threads: int = 2,
) -> dict:
    """Extract, filter, reweight, fit and score one family; the result row with the wall times; with
    ``tool_minutes`` the family-contacts tool on the same alignment first (its row under ``tool``)."""
    from protein_performer.recipes.family_contacts.msa import filter_gaps, sequence_weights
    from protein_performer.recipes.family_contacts.scoring import score_map

    times, start, tool = {}, time.perf_counter(), None
    with tempfile.TemporaryDirectory() as tmp:
        aln, structure, counts = family_alignment(family, shared, max_identity, max_sequences, Path(tmp))
        times["extract_s"] = time.perf_counter() - start
        if tool_minutes:
            tool = run_tool(Path(tmp) / "aligned.fasta", structure, tool_minutes, threads, Path(tmp) / "out")
            log.info("%s: family_contacts long P@L %.3f in %.0f s", family, tool["long_P@L"], tool["wall_s"])
    start = time.perf_counter() - times["extract_s"]
    aln = filter_gaps(aln)
    t = time.perf_counter()
    weights = sequence_weights(aln.tokens)
    times["weights_s"] = time.perf_counter() - t
    _, j, info = fit(potts_states(aln.tokens), weights, max_iter=max_iter)
    times["fit_s"] = info["seconds"]
    true = true_contacts(structure)
    pred = on_query(contact_scores(j), aln.columns, true.shape[0])
    table = score_map(pred, true)
    times["total_s"] = time.perf_counter() - start
    return {
        "family": family,
        "structure": structure.name,
        "n_family": counts["n_family"],
        "n_held_out": counts["n_held_out"],
        "n_sequences": len(aln.ids),
        "n_eff": round(float(weights.sum()), 1),
        "L_query": int(true.shape[0]),
        "L_columns": len(aln.columns),
        "iterations": info["iterations"],
        "evaluations": info["evaluations"],
        "long_P@L": table["long"]["P@L"],
        "long_P@L/5": table["long"]["P@L/5"],
        "long_density": table["long_density"],
        "scores": table,
        **{k: round(v, 1) for k, v in times.items()},
        **({"tool": tool} if tool else {}),
    }


HEADING = "## Potts model baseline (issue 21): `benchmarks/potts.py`"
# issue 21's floor families (issue 12's five largest kortemme40 families) and the recipe runs compared
FLOOR_FAMILIES = ("PF00072", "PF00550", "PF00486", "PF00076", "PF00226")
PERFORMER, EXACT = "aligned_relu", "aligned_exact"  # benchmarks/family_contacts.py settings
MAX_MINUTES = 15.0


def recipe_runs() -> dict[tuple[str, str], dict]:
    """The latest benchmarks/family_contacts.py run of each (family, setting) of at most
    ``MAX_MINUTES`` with a score, from its record (empty when there is none)."""
    path = RESULTS / "family_contacts.json"
    if not path.exists():
        return {}
    out: dict[tuple[str, str], dict] = {}
    for r in load(path).get("runs", []):
        if r.get("headline") and r["minutes"] <= MAX_MINUTES:
            k = (r["family"], r["setting"])
            if k not in out or when(r["date"]) >= when(out[k]["date"]):
                out[k] = r
    return out


def _recipe_cell(run: dict | None) -> str:
    if not run:
        return "-"
    steps = (run.get("train") or {}).get("global_step", "?")
    return f"{run['headline']['long_P@L']:.3f} ({run['minutes']:g} min, {steps} steps, {day(run['date'])[:10]})"


def _tool_cell(t: dict | None) -> str:
    if not t:
        return "-"
    return f"**{t['long_P@L']:.3f}** ({t['minutes']:g} min, {t['steps']} steps, {t['wall_s']:.0f} s)"


def section(rec: dict) -> str:
    """RESULTS.md's part for the ``potts`` record: one row per family as last fitted, the
    family-contacts tool's run on the same alignment beside it, and the LM recipe's latest runs."""
    runs = recipe_runs()
    rows = []
    for fam, r in sorted(rec["families"].items()):
        perf, exact, tool = runs.get((fam, PERFORMER)), runs.get((fam, EXACT)), r.get("tool")
        ratio = fmt(tool["long_P@L"] / r["long_P@L"], 2) if tool and r["long_P@L"] else "-"
        rows.append(
            [
                fam,
                f"{r['n_sequences']} ({r['n_eff']:.0f})",
                f"{r['L_columns']}/{r['L_query']}",
                f"**{r['long_P@L']:.3f}** ({r['total_s']:.0f} s)",
                _tool_cell(tool),
                fmt(tool["random_long_P@L"]) if tool else "-",
                ratio,
                _recipe_cell(perf),
                _recipe_cell(exact),
            ]
        )
    header = ["family", "N (N_eff)", "columns / query L", "Potts long P@L (wall)",
              "family_contacts: attention-Potts, Performer-ReLU (budget, steps, wall)", "random init",
              "tool / Potts", "LM recipe, Performer", "LM recipe, exact"]  # fmt: skip
    days = sorted({day(r["date"])[:10] for r in rec["families"].values()})
    means = []
    for name, fams in (("floor families", FLOOR_FAMILIES), ("others, untuned", None)):
        rs = [r for f, r in rec["families"].items() if r.get("tool") and (f in FLOOR_FAMILIES) == (fams is not None)]
        if rs:
            tool, potts = (sum(x) / len(rs) for x in zip(*[(r["tool"]["long_P@L"], r["long_P@L"]) for r in rs]))
            means.append(f"the {len(rs)} {name}: tool {tool:.3f}, Potts {potts:.3f} ({tool / potts:.2f}x)")
    lines = [
        "plmDCA (pseudo-likelihood, L2 with GREMLIN's lambda_J, 100 L-BFGS iterations, APC on Frobenius norms) and "
        "the family-contacts tool's default model (attention-Potts: a Potts model whose couplings are 128 heads of "
        "Performer-ReLU attention over the columns, pseudo-likelihood, same L2; "
        "`protein_performer/model/attention_potts.py`) on the same aligned, gap-filtered, "
        "reweighted rows of each family (the domains aligned to its kortemme40 chain, >= 90% identical ones held "
        "out), scored against the chain by the same code, in the same run: `python benchmarks/potts.py --family "
        f"<PF,...> --tool-minutes 3 --threads 2` ({rec['machine']}; {', '.join(days)}). Beside them the LM "
        f"recipe's latest runs of at most {MAX_MINUTES:g} minutes ([`family_contacts.json`](results/family_contacts.json); "
        f"one layer of factored attention trained as a masked LM, mean APC map; Performer = `{PERFORMER}`, exact = "
        f"`{EXACT}`). Long-range P@L throughout. Source: {source(rec)}. Means over " + "; ".join(means or ["-"]) + ".",
        "",
        *table(header, rows),
    ]
    return "\n".join(lines)


def floors(records: list[dict]) -> list[Floor]:
    """Issue 21: the family-contacts tool (attention-Potts, Performer-ReLU) on the five families:
    mean long P@L, its ratio to the Potts model's mean on the same alignments, the longest wall time."""
    rec = max(records, key=lambda r: when(r["date"])) if records else None
    fams = [(rec or {}).get("families", {}).get(f) for f in FLOOR_FAMILIES]
    tools = [(r or {}).get("tool") for r in fams]
    ok = rec is not None and all(tools)
    mean = sum(t["long_P@L"] for t in tools) / len(tools) if ok else None
    potts_mean = sum(r["long_P@L"] for r in fams) / len(fams) if ok else None
    wall = max(t["wall_s"] for t in tools) / 60 if ok else None
    what = "five families, family_contacts (attention-Potts, Performer-ReLU)"
    cmd = f"python benchmarks/potts.py --family {','.join(FLOOR_FAMILIES)} --tool-minutes 3 --threads 2"
    out = [
        Floor("21", f"{what}: mean long P@L", 0.25, False, mean, rec),
        Floor("21", "same / the Potts model's mean long P@L on the same alignments (same run)", 0.8, False,
              mean / potts_mean if ok and potts_mean else None, rec),
        Floor("21", "same: the longest run, wall minutes on 2 cores", MAX_MINUTES, True, wall, rec),
    ]  # fmt: skip
    for f in out:
        f.command = cmd
    return out


def main(argv: list[str] | None = None) -> None:
    """Fit and score the families named on the command line; print one row each, update the record."""
    from protein_performer.resources import shared_data

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", required=True, help="comma-separated Pfam accessions, e.g. PF00072")
    parser.add_argument("--data", type=Path, default=shared_data(), help="the shared data folder ($PP_SHARED_DATA)")
    parser.add_argument("--max-identity", type=float, default=0.9, help="hold out domains this close to the chain")
    parser.add_argument("--max-sequences", type=int, default=None, help="subsample the family (seed 0)")
    parser.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations")
    parser.add_argument("--tool-minutes", type=float, default=None, help="also run family_contacts this long")
    parser.add_argument("--threads", type=int, default=2, help="family_contacts' num_threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rec = json.loads(JSON.read_text()) if JSON.exists() else record("potts", {"families": {}})
    for family in args.family.split(","):
        row = run_family(
            family, args.data, args.max_identity, args.max_sequences, args.max_iter, args.tool_minutes, args.threads
        )
        row.update(
            command=f"python benchmarks/potts.py --family {family} --max-iter {args.max_iter}"
            + (f" --max-sequences {args.max_sequences}" if args.max_sequences else "")
            + (f" --tool-minutes {args.tool_minutes:g} --threads {args.threads}" if args.tool_minutes else ""),
            date=now(),
        )
        if "tool" not in row and "tool" in rec["families"].get(family, {}):
            row["tool"] = rec["families"][family]["tool"]  # the tool's last run on this family stays
        if row.get("tool"):
            t = row["tool"]
            print(
                f"{family}: family_contacts (attention-Potts, {t['minutes']:g} min, {t['steps']} steps) long P@L "
                f"{t['long_P@L']:.3f} (random init {t['random_long_P@L']:.3f}), wall {t['wall_s']:.0f} s, "
                f"{t['long_P@L'] / row['long_P@L'] if row['long_P@L'] else float('nan'):.2f}x Potts",
                flush=True,
            )
        print(
            f"{family}: long P@L {row['long_P@L']:.3f} (P@L/5 {row['long_P@L/5']:.3f}, density "
            f"{row['long_density']:.3f}), N {row['n_sequences']} (N_eff {row['n_eff']}), L {row['L_columns']}"
            f"/{row['L_query']}, {row['iterations']} iterations, wall {row['total_s']:.0f} s "
            f"(extract {row['extract_s']:.0f}, weights {row['weights_s']:.0f}, fit {row['fit_s']:.0f})",
            flush=True,
        )
        rec["families"][family] = row
        rec.update(command=row["command"], machine=machine(), date=row["date"])
        write(JSON, rec)


if __name__ == "__main__":
    main()
