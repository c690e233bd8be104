"""Pieces shared by the studies: real sequences, a small seeded training loop, evaluation, reports,
and the frame of every study's command (its common options, the start and the end of ``run``).

Data: the embedded Swiss-Prot sample (``data/swissprot_sample.fasta.gz``, 1,000 real sequences) is
the default; ``load_sequences`` reads any FASTA(.gz) through the project's streaming reader and
tokenizer, and counts (never silently drops) records with residues outside the alphabet.
Batches come from the project's ``Collator`` (UNI next-token / BID masked LM), so the studies
train on exactly what ``protein_performer.train`` would feed.

Training here is a plain PyTorch loop (AdamW, the paper's betas and eps, gradient clipping 0.5),
not the Lightning module: the studies train for a few hundred steps and need the model between
steps (feature redraw, weight swap, evaluation curves) more than checkpointing or DDP.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from protein_performer.analysis import atomic
from protein_performer.data.collate import IGNORE_INDEX, Collator
from protein_performer.data.fasta import read_fasta
from protein_performer.data.tokenizer import Tokenizer, UnknownResidueError
from protein_performer.model.performer import PerformerLM
from protein_performer.training.utils import stable_seed

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "swissprot_sample.fasta.gz"
RESULTS_DIR = REPO / "benchmarks" / "results" / "studies"
STUDIES_MD = REPO / "benchmarks" / "results" / "studies.md"


# ------------------------------------------------------------------------------------------ data
def load_sequences(path: str | os.PathLike = SAMPLE, max_records: int | None = None) -> tuple[list[np.ndarray], dict]:
    """Token ids (uint8 residues, no special tokens) of the records of a FASTA(.gz) file.

    Returns the sequences and counts ``{"read", "kept", "rejected_unknown_residue", "empty"}``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such FASTA file (the embedded sample is {SAMPLE})")
    tok = Tokenizer()
    seqs, counts = [], {"read": 0, "kept": 0, "rejected_unknown_residue": 0, "empty": 0}
    for rec in read_fasta(path):
        counts["read"] += 1
        if not rec.sequence:
            counts["empty"] += 1
            continue
        try:
            seqs.append(tok.encode_bytes(rec.sequence))
        except UnknownResidueError as e:
            counts["rejected_unknown_residue"] += 1
            log.warning("%s line %d: %s; record skipped", path, rec.line, e)
            continue
        counts["kept"] += 1
        if max_records is not None and counts["kept"] >= max_records:
            break
    if not seqs:
        raise ValueError(f"{path}: no usable sequence ({counts})")
    log.info("read %s: %s", path, counts)
    return seqs, counts


def split_sequences(seqs: list[np.ndarray], valid_fraction: float, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A seeded random train / valid split (valid gets ``ceil(valid_fraction * n)`` sequences)."""
    order = np.random.default_rng(seed).permutation(len(seqs))
    n_valid = max(1, math.ceil(valid_fraction * len(seqs)))
    return [seqs[i] for i in order[n_valid:]], [seqs[i] for i in order[:n_valid]]


def load_split(path: str | os.PathLike, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """The studies' data: the sequences of a FASTA(.gz) split 90/10 into train and valid by ``seed``
    (the split ``pretrained`` trains on), and ``load_sequences``' counts."""
    seqs, counts = load_sequences(path)
    train_seqs, valid_seqs = split_sequences(seqs, 0.1, seed)
    return train_seqs, valid_seqs, counts


def train_batch(collator: Collator, seqs: list[np.ndarray], batch_size: int, step: int, seed: int) -> dict:
    """The training batch of step ``step``: indices and crops/masks depend on (seed, step) only."""
    rng = np.random.default_rng(stable_seed(seed, "batch", step))
    idx = rng.integers(0, len(seqs), size=batch_size)
    return collator([seqs[i] for i in idx], [int(i) for i in idx], epoch=step)


def eval_batches(seqs: list[np.ndarray], objective: str, max_length: int, batch_size: int, seed: int = 0) -> list[dict]:
    """Fixed evaluation batches (crop at the start, masks fixed by ``seed``): the same every call."""
    collator = Collator(objective=objective, max_length=max_length, train=False, seed=seed)
    return [collator(seqs[i : i + batch_size], list(range(i, min(i + batch_size, len(seqs)))), epoch=0)
            for i in range(0, len(seqs), batch_size)]


def to_device(batch: dict, device: torch.device | str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------ model / training
@dataclass
class TrainConfig:
    objective: str = "bid"
    max_length: int = 256
    batch_size: int = 16
    steps: int = 300
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    clip: float = 0.5
    seed: int = 0


def build_model(attention: str, causal: bool, seed: int, **kw) -> PerformerLM:
    """A PerformerLM with its weights drawn from ``seed`` (the global RNG is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PerformerLM(attention=attention, causal=causal, **kw)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict], device: torch.device | str = "cpu") -> dict[str, float]:
    """Token-weighted loss, accuracy and perplexity over the non-ignored targets of ``batches``."""
    was_training = model.training
    model.eval()
    nll = correct = n = 0.0
    for batch in batches:
        batch = to_device(batch, device)
        logits = model(batch["tokens"], key_padding_mask=batch["key_padding_mask"])["logits"].float()
        flat_logits, flat = logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1)
        keep = flat != IGNORE_INDEX
        nll += float(F.cross_entropy(flat_logits, flat, ignore_index=IGNORE_INDEX, reduction="sum"))
        correct += float(((flat_logits.argmax(-1) == flat) & keep).sum())
        n += float(keep.sum())
    model.train(was_training)
    loss = nll / max(n, 1.0)
    return {"loss": loss, "acc": correct / max(n, 1.0), "ppl": math.exp(loss), "targets": n}


def train(
    model: torch.nn.Module,
    seqs: list[np.ndarray],
    cfg: TrainConfig,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, torch.nn.Module], None] | None = None,
    eval_every: int = 0,
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict]:
    """Train ``model`` for ``cfg.steps`` steps on random crops of ``seqs``.

    AdamW (betas 0.9/0.98, eps 1e-9, the paper's), linear warmup then cosine decay to 10%,
    gradient-norm clipping ``cfg.clip``. ``on_step(step, model)`` runs before each step's forward
    (feature redraw goes there). Every ``eval_every`` steps (and after the last) ``eval_fn(model)``
    is recorded. Dropout draws come from a generator seeded by (seed, step). Returns the history:
    ``[{"step", "train_loss", ...eval metrics}]`` (train loss every step, eval where run).
    """
    from tqdm.auto import tqdm

    model.to(device).train()
    collator = Collator(objective=cfg.objective, max_length=cfg.max_length, train=True, seed=cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress_ = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history: list[dict] = []
    if eval_fn is not None and eval_every:
        history.append({"step": 0, **eval_fn(model)})
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        if on_step is not None:
            on_step(step, model)
        batch = to_device(train_batch(collator, seqs, cfg.batch_size, step, cfg.seed), device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(cfg.seed, "dropout", step))
            logits = model(batch["tokens"], key_padding_mask=batch["key_padding_mask"])["logits"]
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        row = {"step": step + 1, "train_loss": float(loss.detach())}
        if eval_fn is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == cfg.steps):
            row.update(eval_fn(model))
            model.train()
        history.append(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}")
    model.eval()
    return history


# ------------------------------------------------------------------------------------------ reporting
def machine_info(device: str = "cpu") -> dict:
    """CPU model (``lscpu``), cores, torch threads, the 1-minute load average, date, GPU if any."""
    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        cpu = m.group(1).strip() if m else cpu
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("lscpu failed: %s", e)
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "torch": torch.__version__,
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict) -> str:
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    loaded = "loaded by other agents" if info["load_average_1min"] > 0.8 * (info["cores"] or 1) else "quiet"
    cores = f"{info['cores']} cores" + (f" of {info['machine_cores']}" if info.get("machine_cores", info["cores"]) != info["cores"] else "")
    return (f"{info['cpu']}, {cores} ({info['torch_threads']} torch threads){gpu}; "
            f"{info['date_utc']}; 1-min load average {info['load_average_1min']:.1f} at the start ({loaded}); "
            f"torch {info['torch']}")


def write_json(name: str, payload: dict, out_dir: Path = RESULTS_DIR) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    atomic.write_text(path, json.dumps(payload, indent=2, default=float) + "\n")  # a killed run leaves no half file
    log.info("wrote %s", path)
    return path


def update_markdown(name: str, section: str, path: Path = STUDIES_MD) -> Path:
    """Replace (or append) the section between ``<!-- study:name -->`` markers in ``path``."""
    begin, end = f"<!-- study:{name} -->", f"<!-- /study:{name} -->"
    block = f"{begin}\n{section.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Studies: the paper's claims at workstation scale (issue 6)\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    atomic.write_text(path, text)
    log.info("updated section %r of %s", name, path)
    return path


def md_table(header: list[str], rows: list[list]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def best_time(fn: Callable[[], object], reps: int, device: str = "cpu") -> float:
    """The fastest of ``reps`` timed calls after one warm-up call: on a machine shared with other
    jobs the minimum is the least disturbed estimate of the work itself."""
    fn()
    return min(timer(fn, device) for _ in range(max(1, reps)))


def timer(fn: Callable[[], object], device: str = "cpu") -> float:
    """Seconds for one call of ``fn`` (CUDA synchronized)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def command_line(module: str, argv: list[str] | None) -> str:
    import sys

    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python -m", module, *args])


# ------------------------------------------------------------------------------------------ a study's command and run
# Every study is ``python -m protein_performer.experiments.<NAME>``: ``parse_args`` (``study_parser``,
# ``add_device_args``, ``add_output_args``), ``run(args)`` (``start_study`` ... ``write_study``), ``main``.
def study_parser(doc: str) -> argparse.ArgumentParser:
    """A study's argument parser: the first paragraph of its module docstring ``doc`` as the
    description, defaults shown in ``--help``."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)


def add_device_args(p: argparse.ArgumentParser, threads_help: str | None = None) -> None:
    """``--device`` (default cpu) and ``--threads`` (torch CPU threads, default 2)."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help=threads_help)


def add_output_args(p: argparse.ArgumentParser, progress: bool = True) -> None:
    """``--out-dir`` (JSON + PNG), ``--markdown`` (the studies' markdown) and, unless ``progress``
    is False (a study that lists it later itself), ``--no-progress``."""
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--markdown", type=Path, default=STUDIES_MD)
    if progress:
        p.add_argument("--no-progress", action="store_true")


def study_args(name: str, parse_args: Callable[[list[str] | None], argparse.Namespace],
               argv: list[str] | None) -> argparse.Namespace:
    """``main``'s start: the parsed ``argv``, with ``command`` (the command line, for the report);
    logging set up."""
    args = parse_args(argv)
    args.command = command_line(f"protein_performer.experiments.{name}", argv)
    setup_logging()
    return args


def start_study(args: argparse.Namespace) -> tuple[dict, float]:
    """``run``'s start: torch's CPU threads set to ``args.threads``; returns the machine
    (``machine_info``) and the start time (``time.perf_counter``)."""
    torch.set_num_threads(args.threads)
    return machine_info(args.device), time.perf_counter()


def study_record(name: str, args: argparse.Namespace, info: dict) -> dict:
    """The first keys of a study's JSON: its name, its arguments (paths as strings), the machine."""
    return {"study": name, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": info}


def study_command(name: str, args: argparse.Namespace) -> str:
    """The command that ran the study (``study_args`` sets it; else the module's bare command)."""
    return getattr(args, "command", f"python -m protein_performer.experiments.{name}")


def write_study(name: str, result: dict, args: argparse.Namespace, plot: Callable[[Path], None],
                markdown: Callable[[dict], str]) -> None:
    """``run``'s end: ``plot(path)`` writes ``<out_dir>/<name>.png``, then ``<name>.json``, then the
    markdown section ``markdown(result)`` in ``args.markdown``. Each file is written under a
    temporary name and renamed when complete (:mod:`protein_performer.analysis.atomic`), and the
    JSON comes after the plot: a killed study leaves no partial file, and a ``<name>.json`` means
    the plot of the same run is there too."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    plot(args.out_dir / f"{name}.png")
    write_json(name, result, args.out_dir)
    update_markdown(name, markdown(result), args.markdown)


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out, write and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        atomic.save_figure(fig, path, dpi=dpi)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------ a cached trained model
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "protein_performer" / "studies"


def pretrained(
    attention: str,
    objective: str,
    shape: dict,
    cfg: TrainConfig,
    fasta: Path = SAMPLE,
    device: str = "cpu",
    cache_dir: Path | None = DEFAULT_CACHE,
    progress: bool = True,
) -> tuple[PerformerLM, dict]:
    """A model trained with ``train`` on ``fasta`` (90/10 split, seed ``cfg.seed``), cached on disk.

    The cache file is named by a hash of everything that determines the weights (attention kind,
    shape, training config, the FASTA's path and size), so studies 1 and 3 share one exact
    Transformer. Returns the model (eval mode, on ``device``) and ``{"valid": metrics, "train_s":
    seconds, "cached": bool}``. ``cache_dir=None`` always trains.
    """
    import hashlib

    key_src = json.dumps({"attention": attention, "objective": objective, "shape": shape, "cfg": vars(cfg),
                          "device": torch.device(device).type,
                          "fasta": str(Path(fasta).resolve()), "size": Path(fasta).stat().st_size}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = None if cache_dir is None else Path(cache_dir) / f"{attention}-{objective}-{key}.pt"
    model = build_model(attention, objective == "uni", cfg.seed, **shape)
    if path is not None and path.exists():
        blob = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(blob["state_dict"])
        log.info("loaded the trained %s model from %s", attention, path)
        return model.to(device).eval(), {**blob["meta"], "cached": True}
    train_seqs, valid_seqs, _ = load_split(fasta, cfg.seed)
    t0 = time.perf_counter()
    history = train(model, train_seqs, cfg, device, progress=progress, desc=f"train {attention} {objective}")
    meta = {"valid": evaluate(model, eval_batches(valid_seqs, objective, cfg.max_length, 32), device),
            "train_s": time.perf_counter() - t0, "final_train_loss": history[-1]["train_loss"]}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state_dict": model.state_dict(), "meta": meta}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
        log.info("cached the trained %s model in %s", attention, path)
    return model.eval(), {**meta, "cached": False}


@torch.no_grad()
def capture_qkv(model: PerformerLM, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Queries, keys and values of every layer, each (b, h, l, d), captured with forward hooks on
    the ``to_q`` / ``to_k`` / ``to_v`` projections (learned positions: no rotary rotation applies)."""
    if model.pos_emb is None:
        raise ValueError("capture_qkv needs learned positions (rotary q, k are rotated after the projection)")
    store: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        for name in ("to_q", "to_k", "to_v"):
            def hook(module, inputs, output, i=i, name=name):
                store[(i, name)] = output.detach()
            handles.append(getattr(block.attn, name).register_forward_hook(hook))
    try:
        model.eval()(tokens)
    finally:
        for h in handles:
            h.remove()
    out = []
    for i, block in enumerate(model.blocks):
        split = block.attn.split_heads
        out.append(tuple(split(store[(i, n)]) for n in ("to_q", "to_k", "to_v")))
    return out


# ------------------------------------------------------------------------------------------ the shared exact Transformer
# Studies 1 and 3 use the same exact-softmax BID Transformer (head dim 16, as the paper's
# approximation study), trained once and cached by ``pretrained``.
EXACT_SHAPE = dict(vocab_size=29, max_len=512, dim=64, depth=2, heads=4, dim_head=16, ff_dim=128, dropout=0.0)


def exact_reference(
    steps: int, seed: int = 0, fasta: Path = SAMPLE, device: str = "cpu", cache_dir: Path | None = DEFAULT_CACHE,
    progress: bool = True, max_length: int = 256, batch_size: int = 16,
) -> tuple[PerformerLM, dict, dict, TrainConfig]:
    """The exact BID Transformer of studies 1 and 3: (model, meta, shape, training config)."""
    cfg = TrainConfig(objective="bid", max_length=max_length, batch_size=batch_size, steps=steps, seed=seed)
    model, meta = pretrained("exact", "bid", EXACT_SHAPE, cfg, fasta, device, cache_dir, progress)
    return model, meta, dict(EXACT_SHAPE), cfg
