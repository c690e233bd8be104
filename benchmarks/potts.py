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
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _record import RESULTS, Floor, day, fmt, load, machine, now, record, source, table, when, write

from protein_performer.data.tokenizer import STANDARD_AA, Tokenizer

log = logging.getLogger("potts")
REPO = Path(__file__).resolve().parents[1]
JSON = REPO / "benchmarks" / "results" / "potts.json"
Q = 21  # states: 20 amino acids + gap
AMINO = 20
LAMBDA_H = 0.01
LAMBDA_J = 0.01  # times (L - 1)(q - 1)


def potts_states(tokens: np.ndarray) -> np.ndarray:
    """(N, L) int64 states 0-20 from alignment tokens: the 20 amino acids in ``STANDARD_AA`` order,
    20 for the gap and for B O U X Z."""
    tokens = np.asarray(tokens).astype(np.int64)
    first = Tokenizer.mask_id + 1
    aa = (tokens >= first) & (tokens < first + len(STANDARD_AA))
    return np.where(aa, tokens - first, AMINO)


def pair_penalty(length: int, q: int = Q, scale: float = LAMBDA_J) -> float:
    """lambda_J = scale (L - 1)(q - 1), GREMLIN's convention."""
    return scale * (length - 1) * (q - 1)


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


def run_family(family: str, shared: Path, max_identity: float, max_sequences: int | None, max_iter: int) -> dict:
    """Extract, filter, reweight, fit and score one family; the result row with the wall times."""
    from protein_performer.recipes.family_contacts.msa import filter_gaps, sequence_weights
    from protein_performer.recipes.family_contacts.scoring import score_map

    times, start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        aln, structure, counts = family_alignment(family, shared, max_identity, max_sequences, Path(tmp))
    times["extract_s"] = time.perf_counter() - start
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


def section(rec: dict) -> str:
    """RESULTS.md's part for the ``potts`` record: one row per family as last fitted, beside the
    recipe's latest runs on the same family."""
    runs = recipe_runs()
    rows = []
    for fam, r in sorted(rec["families"].items()):
        perf, exact = runs.get((fam, PERFORMER)), runs.get((fam, EXACT))
        ratio = fmt(perf["headline"]["long_P@L"] / r["long_P@L"], 2) if perf and r["long_P@L"] else "-"
        rows.append(
            [
                fam,
                f"{r['n_sequences']} ({r['n_eff']:.0f})",
                f"{r['L_columns']}/{r['L_query']}",
                f"**{r['long_P@L']:.3f}** ({r['total_s']:.0f} s, {day(r['date'])[:10]})",
                _recipe_cell(perf),
                fmt((perf or {}).get("couplings", {}).get("long_P@L")),
                _recipe_cell(exact),
                fmt(perf["headline"]["random_long_P@L"]) if perf else "-",
                ratio,
            ]
        )
    header = ["family", "N (N_eff)", "columns / query L", "Potts long P@L (wall)", "recipe, Performer",
              "same, couplings", "recipe, exact", "random init", "Performer / Potts"]  # fmt: skip
    lines = [
        "plmDCA (pseudo-likelihood, L2 with GREMLIN's lambda_J, 100 L-BFGS iterations, APC on Frobenius norms) on the "
        "recipe's aligned, gap-filtered, reweighted rows of each family, scored against its kortemme40 chain by the "
        f"recipe's code (`python benchmarks/potts.py --family <PF>`; {rec['machine']}), beside the recipe's latest run "
        f"of at most {MAX_MINUTES:g} minutes on 2 cores ([`family_contacts.json`](results/family_contacts.json); "
        f"Performer = `{PERFORMER}`, exact = `{EXACT}`). 'same, couplings': the Performer run's model read as Potts "
        "couplings (`scores.couplings`: Frobenius norms of sum_h A_h(i, j) U W_O^h W_V^h E, APC; Bhattacharya et al. "
        f"2020). Long-range P@L throughout. Source: {source(rec)}.",
        "",
        *table(header, rows),
    ]
    return "\n".join(lines)


def floors(records: list[dict]) -> list[Floor]:
    """Issue 21: the recipe's Performer on the five families, mean long P@L and its ratio to the
    Potts model's mean on the same families (each family's latest run, at most 15 minutes)."""
    rec = max(records, key=lambda r: when(r["date"])) if records else None
    runs = recipe_runs() if rec else {}  # no Potts fit: nothing to compare with
    perf = [runs.get((f, PERFORMER)) for f in FLOOR_FAMILIES]
    potts = [(rec or {}).get("families", {}).get(f) for f in FLOOR_FAMILIES]
    mean = sum(r["headline"]["long_P@L"] for r in perf) / len(perf) if rec and all(perf) else None
    read = [(r or {}).get("couplings", {}).get("long_P@L") for r in perf]
    couplings = sum(read) / len(read) if rec and None not in read else None
    potts_mean = sum(r["long_P@L"] for r in potts) / len(potts) if all(potts) else None
    what = f"five families, recipe Performer ({PERFORMER}, <= {MAX_MINUTES:g} min, latest run each)"
    cmd = f"python benchmarks/family_contacts.py --family {','.join(FLOOR_FAMILIES)} --settings {PERFORMER}"
    out = [
        Floor("21", f"{what}: mean long P@L", 0.25, False, mean, rec),
        Floor("21", "same / the Potts model's mean long P@L on the same alignments", 0.8, False,
              mean / potts_mean if mean is not None and potts_mean else None, rec),
        Floor("21", "same runs, the model read as Potts couplings (scores.couplings): mean long P@L", 0.25, False,
              couplings, rec),
        Floor("21", "same (couplings) / the Potts model's mean long P@L", 0.8, False,
              couplings / potts_mean if couplings is not None and potts_mean else None, rec),
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rec = json.loads(JSON.read_text()) if JSON.exists() else record("potts", {"families": {}})
    for family in args.family.split(","):
        row = run_family(family, args.data, args.max_identity, args.max_sequences, args.max_iter)
        row.update(
            command=f"python benchmarks/potts.py --family {family} --max-iter {args.max_iter}"
            + (f" --max-sequences {args.max_sequences}" if args.max_sequences else ""),
            date=now(),
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
