"""A family-level model whose attention maps carry contacts (issue 12, item 3).

    python -m protein_performer.experiments.family_contacts family=PF00072 output_dir=<OUT>
        [data=<pfam40_domains.fasta.gz>] [structures=<kortemme40 dir>] [max_identity=0.9]
        [max_sequences=N] [stages=extract,ingest,train,export,score] [<hydra override> ...]

1. extract: the family's domains from the pfam40 FASTA (header ``>NAME/start-end PFxxxxx``) into
   ``<OUT>/family.fasta``, leaving out every domain at least ``max_identity`` identical to the
   family's kortemme40 chain (the test protein; see :func:`holdout_similar`);
2. ingest into ``<OUT>/shards`` (train/valid/test by sequence hash);
3. train ``experiment=family_contacts`` (Hydra overrides after the options), run folder
   ``<OUT>``: the checkpoint is ``<OUT>/checkpoints/last.ckpt``;
4. export the maps of the family's chain for the trained model and a random-init twin;
5. score the unsupervised mean-of-heads APC map (no fitted weights) and each layer's mean, by
   range (short 6-11, medium 12-23, long >= 24) and P@L, P@L/2, P@L/5; write
   ``<OUT>/summary.json`` and ``<OUT>/contacts.png`` (predicted vs true contacts).

With ``probe_every_s`` the :class:`ContactProbe` callback also scores the chain during training
(the same map from the in-memory model), which gives precision against training minutes.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from protein_performer.errors import UserError, cli_errors

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
SHARED = Path(os.environ.get("PP_SHARED_DATA", REPO.parent / "shared" / "data"))
PFAM40 = SHARED / "pfam40_domains.fasta.gz"
KORTEMME40 = SHARED / "structures" / "kortemme40"
STAGES = ("extract", "ingest", "train", "export", "score")


# ------------------------------------------------------------------------------ data
def family_chain(structures: str | Path, family: str) -> Path:
    """The structure file of ``family`` in a kortemme40-style folder (``<family>_<pdb>_<chain>.pdb``)."""
    structures = Path(structures)
    hits = sorted(structures.glob(f"{family}_*.pdb"))
    if not structures.is_dir():
        raise UserError(f"structures folder not found: {structures}; give structures=<kortemme40 dir>")
    if len(hits) != 1:
        raise UserError(f"{structures}: expected one file {family}_<pdb>_<chain>.pdb, found {len(hits)}; "
                        "check family=PFxxxxx")
    return hits[0]


def read_family(fasta: str | Path, family: str) -> list[tuple[str, str]]:
    """``(header, sequence)`` of every record whose header's second word is ``family``."""
    fasta = Path(fasta)
    if not fasta.exists():
        raise UserError(f"pfam40 FASTA not found: {fasta}; give data=<pfam40_domains.fasta.gz>")
    out: list[tuple[str, str]] = []
    header, parts, keep = None, [], False
    opener = gzip.open if fasta.name.endswith(".gz") else open
    with opener(fasta, "rt") as fh:
        for line in fh:
            if line.startswith(">"):
                if keep and header is not None:
                    out.append((header, "".join(parts)))
                header, parts = line[1:].strip(), []
                words = header.split()
                keep = len(words) > 1 and words[1] == family
            elif keep:
                parts.append(line.strip())
    if keep and header is not None:
        out.append((header, "".join(parts)))
    return out


def _kmers(s: str, k: int = 3) -> set[str]:
    return {s[i:i + k] for i in range(len(s) - k + 1)}


def identity(a: str, b: str) -> float:
    """Identical aligned positions / length of the shorter sequence (global alignment, BLOSUM62,
    gap open -10, extend -0.5)."""
    from Bio.Align import PairwiseAligner, substitution_matrices

    al = PairwiseAligner(mode="global", open_gap_score=-10.0, extend_gap_score=-0.5)
    al.substitution_matrix = substitution_matrices.load("BLOSUM62")
    aln = al.align(a, b)[0]
    same = sum(1 for (s1, e1), (s2, e2) in zip(*aln.aligned) for x, y in zip(a[s1:e1], b[s2:e2]) if x == y)
    return same / max(min(len(a), len(b)), 1)


def holdout_similar(records: Sequence[tuple[str, str]], target: str, max_identity: float = 0.9,
                    prefilter: float = 0.3) -> tuple[list[tuple[str, str]], list[dict]]:
    """Split ``records`` into those kept and those at least ``max_identity`` identical to ``target``.

    Why: the test chain's own sequence (and near copies) is usually among the family's domains; a
    model that has seen it could recall that sequence rather than the family's structure. Only
    records sharing at least ``prefilter`` of their 3-mers with ``target`` are aligned (a pair at
    90% identity keeps about 0.9^3 = 73% of its 3-mers intact, so 0.3 misses none of them)."""
    tk = _kmers(target)
    kept, removed = [], []
    for h, s in records:
        km = _kmers(s)
        if km and len(km & tk) / len(km) >= prefilter:
            ident = identity(s, target)
            if ident >= max_identity:
                removed.append({"id": h.split()[0], "identity": round(ident, 3)})
                continue
        kept.append((h, s))
    return kept, removed


def extract_family(fasta: str | Path, family: str, output: str | Path, target: str | None = None,
                   max_identity: float = 0.9, max_sequences: int | None = None, seed: int = 0) -> dict:
    """Write the family's domains (minus the held-out ones) to ``output``; return the counts."""
    records = read_family(fasta, family)
    if not records:
        raise UserError(f"{fasta}: no record of family {family} (headers '>NAME/start-end PFxxxxx')")
    n_all = len(records)
    removed: list[dict] = []
    if target is not None and max_identity < 1.0:
        records, removed = holdout_similar(records, target, max_identity)
    if max_sequences is not None and len(records) > max_sequences:
        idx = np.sort(np.random.default_rng(seed).choice(len(records), max_sequences, replace=False))
        records = [records[i] for i in idx]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    with open(tmp, "w") as fh:
        for h, s in records:
            fh.write(f">{h}\n{s}\n")
    tmp.replace(output)
    return {"family": family, "n_family": n_all, "n_held_out": len(removed), "held_out": removed,
            "n_written": len(records), "max_identity": max_identity}


# ------------------------------------------------------------------------------ scoring
def mean_apc_maps(apc: np.ndarray) -> dict[str, np.ndarray]:
    """From (layers, heads, L, L) APC maps: ``{"mean": mean over all maps, "layer0": ..., ...}``."""
    apc = np.asarray(apc, dtype=np.float64)
    out = {"mean": apc.mean((0, 1))}
    for layer in range(apc.shape[0]):
        out[f"layer{layer}"] = apc[layer].mean(0)
    return out


def score_map(pred: np.ndarray, true: np.ndarray) -> dict:
    """precision_table of one (L, L) map against a contact map, plus the long-range contact
    density (the precision of a random ranking)."""
    from protein_performer.analysis.contacts import precision_table

    table = precision_table(pred, true)
    i, j = np.triu_indices(true.shape[0], k=24)
    t = true[i, j]
    table["long_density"] = float(np.nanmean(t)) if np.isfinite(t).any() else float("nan")
    return table


def score_maps(maps: str | Path, structure: str | Path, baseline_maps: str | Path | None = None) -> dict:
    """Unsupervised scores of a maps file (and a random-init baseline) on one structure's chain."""
    from protein_performer.analysis.contacts import load_proteins
    from protein_performer.analysis.structures import load_structures

    chains, failures = load_structures(structure)
    if not chains:
        raise UserError(f"{structure}: no chain read ({failures[0].reason if failures else 'empty'})")
    proteins, fails = load_proteins(maps, chains, baseline_maps=baseline_maps)
    if not proteins:
        raise UserError(f"{maps}: no record matches {structure} "
                        f"({fails[0].reason if fails else 'no records'}); export that structure first")
    p = proteins[0]
    out: dict = {"protein": p.name, "L": p.L}
    for key, feats in p.features.items():
        layers, heads = p.n_heads[key]
        f = feats.astype(np.float64).reshape(len(feats), layers, heads)
        scores = {"mean": score_map(p.pred_matrix(f.mean((1, 2))), p.true)}
        for layer in range(layers):
            scores[f"layer{layer}"] = score_map(p.pred_matrix(f[:, layer].mean(1)), p.true)
        out[key] = scores
    return out


def plot_contacts(maps: str | Path, structure: str | Path, path: str | Path, title: str = "") -> None:
    """Top-L long+medium predictions of the mean APC map (upper triangle) over the true contacts."""
    from protein_performer.analysis.contacts import load_proteins
    from protein_performer.analysis.structures import load_structures
    from protein_performer.experiments.common import pyplot, save_figure

    chains, _ = load_structures(structure)
    p = load_proteins(maps, chains)[0][0]
    pred = p.pred_matrix(p.features["trained"].astype(np.float64).mean(1))
    L = p.L
    i, j = np.triu_indices(L, k=12)
    order = np.argsort(-pred[i, j])[:L]
    ti, tj = i[order], j[order]
    hit = p.true[ti, tj] == 1
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    ci, cj = np.nonzero(np.triu(np.nan_to_num(p.true), k=6))
    ax.scatter(cj, ci, s=6, c="0.75", marker="s", label="true contact (8 A)")
    ax.scatter(ci, cj, s=6, c="0.75", marker="s")
    ax.scatter(tj[hit], ti[hit], s=10, c="tab:blue", label="top-L predicted, correct")
    ax.scatter(tj[~hit], ti[~hit], s=10, c="tab:red", marker="x", label="top-L predicted, wrong")
    ax.set_xlim(-1, L)
    ax.set_ylim(L, -1)
    ax.set_aspect("equal")
    ax.set_title(title or f"{p.name}: mean-of-heads APC map, |i-j| >= 12", fontsize=9)
    ax.legend(loc="lower left", fontsize=7)
    save_figure(fig, Path(path))


# ------------------------------------------------------------------------------ span masking
def mask_spans(tokens: np.ndarray, rng: np.random.Generator, mask_prob: float, span: int, mask_id: int,
               first_residue_id: int, replacement_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Like BERT masking (collate.mask_tokens: 80/10/10, at least one target) but the selected
    residues come in runs of ``span``: span starts ~ Bernoulli(mask_prob / span) over residue
    positions, each masking ``[start, start + span)`` (clipped), so about ``mask_prob`` of the
    residues are targets (a little less where runs overlap). A masked residue's neighbours are
    then masked too: its context is the rest of the fold, not the sequence next to it."""
    from protein_performer.data.collate import IGNORE_INDEX

    tokens = np.asarray(tokens, dtype=np.int64)
    residue_pos = np.flatnonzero(tokens >= first_residue_id)
    out = tokens.copy()
    targets = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int64)
    n = residue_pos.size
    if n == 0:
        return out, targets
    starts = np.flatnonzero(rng.random(n) < mask_prob / span)
    if starts.size == 0:
        starts = rng.integers(0, n, size=1)
    sel = np.zeros(n, dtype=bool)
    for s in starts:
        sel[s:s + span] = True
    selected = residue_pos[sel]
    targets[selected] = tokens[selected]
    u = rng.random(selected.size)
    out[selected[u < 0.8]] = mask_id
    to_random = selected[(u >= 0.8) & (u < 0.9)]
    out[to_random] = rng.choice(np.asarray(replacement_ids, dtype=np.int64), size=to_random.size)
    return out, targets


def _span_classes():
    from dataclasses import dataclass

    from protein_performer.data.collate import _TOK, Collator, bid_window, item_rng
    from protein_performer.data.datamodule import ProteinDataModule

    @dataclass
    class SpanCollator(Collator):
        """Collator whose BID examples are span-masked (:func:`mask_spans`)."""

        span: int = 1

        def example(self, item, index, epoch):
            if self.span <= 1 or self.objective != "bid" or self.packed:
                return super().example(item, index, epoch)
            rng = item_rng(self.seed, epoch, index)
            window = bid_window(item, self.max_length, rng if self.train else None, _TOK.bos_id, _TOK.eos_id)
            return mask_spans(window, rng, self.mask_prob, self.span, _TOK.mask_id, _TOK.n_special,
                              self.replacement_ids)

    class FamilyDataModule(ProteinDataModule):
        """ProteinDataModule with ``span``-masking (``span=1``: the library's BERT masking).
        ``data._target_=protein_performer.experiments.family_contacts.FamilyDataModule +data.span=5``"""

        def __init__(self, *args, span: int = 1, **kwargs):
            super().__init__(*args, **kwargs)
            self.span = int(span)

        def collator(self, train: bool):
            base = super().collator(train)
            return SpanCollator(**{f: getattr(base, f) for f in base.__dataclass_fields__}, span=self.span)

    return SpanCollator, FamilyDataModule


SpanCollator, FamilyDataModule = _span_classes()


# ------------------------------------------------------------------------------ homolog-averaged map
def aligned_positions(seq: str, target: str) -> tuple[np.ndarray, np.ndarray]:
    """Matched position pairs ``(i in seq, k in target)`` of a global BLOSUM62 alignment."""
    from Bio.Align import PairwiseAligner, substitution_matrices

    al = PairwiseAligner(mode="global", open_gap_score=-10.0, extend_gap_score=-0.5)
    al.substitution_matrix = substitution_matrices.load("BLOSUM62")
    aln = al.align(seq, target)[0]
    src, dst = [], []
    for (s1, e1), (s2, e2) in zip(*aln.aligned):
        src.extend(range(s1, e1))
        dst.extend(range(s2, e2))
    return np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)


def homolog_averaged_map(model, target: str, homologs: Sequence[str]) -> np.ndarray:
    """Unsupervised map of ``target`` from its family: the mean-of-heads APC map of ``target`` and
    of every homolog, each carried onto ``target``'s positions through a pairwise alignment, then
    averaged where defined (like an MSA's column pairs; no fitted weights). (L, L) float64."""
    from protein_performer.analysis.export import run_sequence
    from protein_performer.analysis.maps_io import apc_maps
    from protein_performer.data.tokenizer import Tokenizer

    tok = Tokenizer()
    L = len(target)
    total, count = np.zeros((L, L)), np.zeros((L, L))
    model.eval()
    for seq in [target, *homologs]:
        maps: list[np.ndarray] = []
        run_sequence(model, tok.encode(seq), on_layer=lambda i, m: maps.append(m.float().cpu().numpy()))
        mean = apc_maps(np.stack(maps)).astype(np.float64).mean((0, 1))
        src, dst = (np.arange(L), np.arange(L)) if seq == target else aligned_positions(seq, target)
        total[np.ix_(dst, dst)] += mean[np.ix_(src, src)]
        count[np.ix_(dst, dst)] += 1
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


# ------------------------------------------------------------------------------ training
def compose(overrides: Sequence[str] = ()):
    """``train`` config with ``experiment=family_contacts`` and ``overrides``."""
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=["experiment=family_contacts", *overrides])


def chain_residues(structure: str | Path) -> tuple[str, np.ndarray]:
    """Sequence and residue ids of the (single) chain of ``structure``."""
    from protein_performer.analysis.structures import load_structures
    from protein_performer.data.tokenizer import Tokenizer

    chains, _ = load_structures(structure)
    seq = chains[0].sequence
    return seq, Tokenizer().encode(seq)


class _Probe:
    """Scores the mean APC map of one chain from an in-memory model (the export's own maps path)."""

    def __init__(self, structure: str | Path):
        from protein_performer.analysis.contacts import contact_map
        from protein_performer.analysis.structures import align_to_sequence, coords_on_sequence, load_structures

        chains, _ = load_structures(structure)
        c = chains[0]
        self.residues = chain_residues(structure)[1]
        self.true = contact_map(coords_on_sequence(c, align_to_sequence(c, c.sequence)))

    def __call__(self, model) -> dict:
        import torch

        from protein_performer.analysis.export import run_sequence
        from protein_performer.analysis.maps_io import apc_maps

        maps: list[np.ndarray] = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                run_sequence(model, self.residues, on_layer=lambda i, m: maps.append(m.float().cpu().numpy()))
        finally:
            model.train(was_training)
        apc = apc_maps(np.stack(maps))
        return {k: score_map(v, self.true) for k, v in mean_apc_maps(apc).items()}


try:
    import pytorch_lightning as pl

    class ContactProbe(pl.Callback):
        """Every ``every_s`` seconds of training (and at the end), the mean-of-heads APC long P@L
        of ``structure``'s chain; appended as JSON lines to ``output``."""

        def __init__(self, structure: str, output: str, every_s: float = 60.0):
            self.structure, self.output, self.every_s = structure, Path(output), float(every_s)
            self._probe: _Probe | None = None
            self._t0 = self._next = 0.0
            self._train_s = 0.0

        def on_train_start(self, trainer, pl_module):
            self._probe = _Probe(self.structure)
            self._t0 = time.time()
            self._next = self.every_s
            self._write(trainer, pl_module, 0.0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            elapsed = time.time() - self._t0  # training seconds (probe time excluded)
            if elapsed >= self._next:
                self._next += self.every_s
                t = time.time()
                self._write(trainer, pl_module, elapsed)
                self._t0 += time.time() - t

        def on_train_end(self, trainer, pl_module):
            self._write(trainer, pl_module, time.time() - self._t0)

        def _write(self, trainer, pl_module, elapsed: float) -> None:
            s = self._probe(pl_module.model)
            row = {"minutes": round(elapsed / 60, 3), "step": int(trainer.global_step),
                   "long_P@L": s["mean"]["long"]["P@L"], "long_P@L/5": s["mean"]["long"]["P@L/5"],
                   "layers_long_P@L": [s[k]["long"]["P@L"] for k in s if k.startswith("layer")]}
            with open(self.output, "a") as fh:
                fh.write(json.dumps(row) + "\n")
except ImportError:  # pragma: no cover - lightning is a dependency
    pass


# ------------------------------------------------------------------------------ pipeline
def run(family: str, output_dir: str | Path, overrides: Sequence[str] = (), data: str | Path = PFAM40,
        structures: str | Path = KORTEMME40, max_identity: float = 0.9, max_sequences: int | None = None,
        stages: Sequence[str] = STAGES, probe_every_s: float | None = None, homologs: int = 0) -> dict:
    """The whole recipe for one family; returns (and writes) ``<output_dir>/summary.json``."""
    from protein_performer.analysis.export import run_export
    from protein_performer.data.ingest import ingest
    from protein_performer.training.train import train

    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    structure = family_chain(structures, family)
    fasta, shards = out / "family.fasta", out / "shards"
    ckpt = out / "checkpoints" / "last.ckpt"
    maps, maps_random = out / "maps.h5", out / "maps_random.h5"
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.update({"family": family, "structure": str(structure), "overrides": list(overrides)})
    times = summary.setdefault("seconds", {})

    def stage(name: str):
        t = time.time()
        log.info("family_contacts %s: %s", family, name)
        return lambda: times.__setitem__(name, round(time.time() - t, 1))

    if "extract" in stages:
        done = stage("extract")
        target = chain_residues(structure)[0]
        summary["extract"] = extract_family(data, family, fasta, target, max_identity, max_sequences)
        done()
    if "ingest" in stages:
        done = stage("ingest")
        # no OOD families: the family's accession is in every header and would send it all to ood
        m = ingest(input=str(fasta), output_dir=str(shards), overwrite=True, progress=False, workers=1,
                   ood_families=[], fractions={"train": 0.94, "valid": 0.05, "test": 0.01})
        summary["shards"] = {k: v.get("n_sequences") for k, v in m.get("splits", {}).items()}
        done()
    if "train" in stages:
        done = stage("train")
        extra = [f"data.root={shards}", f"run_dir={out}"]
        if probe_every_s:
            (out / "probe.jsonl").unlink(missing_ok=True)
            extra += [f"+callbacks.probe._target_={__name__}.ContactProbe", f"+callbacks.probe.structure={structure}",
                      f"+callbacks.probe.output={out / 'probe.jsonl'}", f"+callbacks.probe.every_s={probe_every_s}"]
        cfg = compose([*extra, *overrides])
        metrics = train(cfg)
        summary["train"] = {k: metrics.get(k) for k in ("global_step", "valid/acc", "valid/ppl", "valid/unigram_acc",
                                                        "valid/loss") if k in metrics}
        summary["num_threads"] = cfg.get("num_threads")
        done()
    if "export" in stages:
        done = stage("export")
        run_export(str(ckpt), str(structure), str(maps), overwrite=True, progress=False)
        run_export("random", str(structure), str(maps_random), model_config=str(ckpt), overwrite=True,
                   progress=False)
        done()
    if "score" in stages:
        done = stage("score")
        scores = score_maps(maps, structure, maps_random)
        summary["scores"] = scores
        t, r = scores["trained"]["mean"], scores["random_init"]["mean"]
        summary["headline"] = {"long_P@L": t["long"]["P@L"], "long_P@L/5": t["long"]["P@L/5"],
                               "random_long_P@L": r["long"]["P@L"], "long_density": t["long_density"]}
        plot_contacts(maps, structure, out / "contacts.png",
                      f"{family} ({structure.stem}): mean APC map\nlong P@L {t['long']['P@L']:.2f} "
                      f"(random init {r['long']['P@L']:.2f})")
        done()
    if homologs and "score" in stages:
        done = stage("homologs")
        summary["homolog_averaged"] = score_homolog_averaged(ckpt, structure, fasta, homologs)
        done()
    if (out / "probe.jsonl").exists():
        summary["probe"] = [json.loads(x) for x in (out / "probe.jsonl").read_text().splitlines() if x]
    summary_path.write_text(json.dumps(summary, indent=2, default=str))
    return summary


def score_homolog_averaged(ckpt: str | Path, structure: str | Path, fasta: str | Path, n: int, seed: int = 0) -> dict:
    """Scores of :func:`homolog_averaged_map` with ``n`` family members drawn (seeded) from
    ``fasta``, for the checkpoint and its random-init twin."""
    import torch

    from protein_performer.analysis.export import load_model

    records = read_family_fasta(fasta)
    pick = np.random.default_rng(seed).choice(len(records), min(n, len(records)), replace=False)
    homologs = [records[i] for i in sorted(pick)]
    probe = _Probe(structure)
    target, _ = chain_residues(structure)
    out = {"n_homologs": len(homologs)}
    with torch.no_grad():
        for key, lm in (("trained", load_model(ckpt)), ("random_init", load_model("random", model_config=str(ckpt)))):
            out[key] = score_map(homolog_averaged_map(lm.model, target, homologs), probe.true)
    return out


def read_family_fasta(fasta: str | Path) -> list[str]:
    """Sequences of a FASTA written by :func:`extract_family` (one line each)."""
    return [line.strip() for line in Path(fasta).read_text().splitlines() if line and not line.startswith(">")]


def _parse(argv: Sequence[str]) -> tuple[dict, list[str]]:
    opts = {"family": None, "output_dir": None, "data": str(PFAM40), "structures": str(KORTEMME40),
            "max_identity": "0.9", "max_sequences": "", "stages": ",".join(STAGES), "probe_every_s": "",
            "homologs": "0"}
    overrides = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if "=" in arg and key in opts:
            opts[key] = arg.split("=", 1)[1]
        elif "=" in arg and ("." in key or key.startswith(("+", "~")) or key in ("seed", "num_threads", "model",
                                                                                   "data", "objective")):
            overrides.append(arg)
        else:
            raise UserError(f"family_contacts: expected key=value with a key in {', '.join(opts)} or a Hydra "
                            f"override (group.key=value), got {arg!r}")
    if not opts["family"] or not opts["output_dir"]:
        raise UserError("family_contacts: give family=PFxxxxx and output_dir=<dir>")
    return opts, overrides


@cli_errors
def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    opts, overrides = _parse(sys.argv[1:] if argv is None else argv)
    stages = [s for s in opts["stages"].split(",") if s]
    if set(stages) - set(STAGES):
        raise UserError(f"family_contacts: unknown stages {sorted(set(stages) - set(STAGES))}; choose from {STAGES}")
    s = run(opts["family"], opts["output_dir"], overrides, opts["data"], opts["structures"],
            float(opts["max_identity"]), int(opts["max_sequences"]) if opts["max_sequences"] else None, stages,
            float(opts["probe_every_s"]) if opts["probe_every_s"] else None, int(opts["homologs"]))
    h = s.get("headline")
    if h:
        print(f"{s['family']}: mean-of-heads APC map, long-range P@L {h['long_P@L']:.3f} (P@L/5 "
              f"{h['long_P@L/5']:.3f}); random init {h['random_long_P@L']:.3f}; contact density "
              f"{h['long_density']:.3f}; valid acc {s.get('train', {}).get('valid/acc')}")
    ha = s.get("homolog_averaged")
    if ha:
        print(f"homolog-averaged map ({ha['n_homologs']} family members aligned onto the chain): long-range P@L "
              f"{ha['trained']['long']['P@L']:.3f}; random init {ha['random_init']['long']['P@L']:.3f}")
    print(f"summary: {Path(opts['output_dir']) / 'summary.json'}")


if __name__ == "__main__":
    main()
