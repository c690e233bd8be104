"""Protein chains out of PDB / mmCIF files (Biopython), and their alignment to a model's sequence.

A :class:`Chain` holds, for the standard residues of one chain of the first model, in file order:
the one-letter sequence, the residue numbers (with insertion codes) and the coordinates of the
C-beta atom (C-alpha for glycine; a virtual C-beta from N, CA, C where C-beta is missing;
NaN where the residue has no C-alpha, i.e. is unresolved). Water and hetero groups are skipped;
selenomethionine (MSE, a HETATM record) is read as methionine.

:func:`align_to_sequence` places a chain on a model's input sequence with a global alignment
(free end gaps, BLOSUM62). Where the residue numbering jumps *and* the C-alpha atoms on either side
are too far apart to be bonded (a real chain break), the missing residues enter the alignment as
placeholders, so the residues after a gap are not shifted onto the positions of the missing ones.
Mismatched pairs and low identity are counted and reported (:class:`AlignmentMismatchError` past
the tolerance), never silently absorbed.
"""

from __future__ import annotations

import gzip
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from Bio.Align import PairwiseAligner, substitution_matrices
from Bio.PDB import MMCIFParser, PDBParser

from protein_performer.errors import UserError

log = logging.getLogger(__name__)

THREE_TO_ONE = {
    "ALA": "A",
    "CYS": "C",
    "ASP": "D",
    "GLU": "E",
    "PHE": "F",
    "GLY": "G",
    "HIS": "H",
    "ILE": "I",
    "LYS": "K",
    "LEU": "L",
    "MET": "M",
    "ASN": "N",
    "PRO": "P",
    "GLN": "Q",
    "ARG": "R",
    "SER": "S",
    "THR": "T",
    "VAL": "V",
    "TRP": "W",
    "TYR": "Y",
}
MODIFIED_TO_ONE = {"MSE": "M"}  # selenomethionine, written as HETATM

STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")

# longest C-alpha(i) - C-alpha(i+1) distance of bonded residues (trans 3.8 A, cis 2.9 A, + slack)
MAX_BONDED_CA_DISTANCE = 4.2
GAP_PLACEHOLDER = "X"


class StructureError(UserError, ValueError):
    """A structure file or chain that cannot be used; the message names the file and chain."""


class MissingStructuresError(StructureError, FileNotFoundError):
    """The structure folder (or file) does not exist."""


class AlignmentMismatchError(ValueError):
    """The model's sequence does not match the chain's residues within the tolerance."""


@dataclass
class Chain:
    """Standard residues of one chain, in file order (see the module docstring)."""

    path: str  # the structure file
    chain_id: str
    sequence: str  # one letter per residue kept
    resnums: list[str]  # residue number + insertion code, e.g. "27", "184A"
    cb: np.ndarray  # (n, 3) float64, C-beta / Gly C-alpha / virtual C-beta, NaN if no CA
    ca: np.ndarray  # (n, 3) float64, NaN if no CA
    n_virtual_cb: int = 0  # residues whose C-beta was built from N, CA, C
    n_skipped: int = 0  # non-standard residues (not water) skipped inside the chain

    @property
    def key(self) -> str:
        """``<file name>:<chain id>``: the ``source`` attribute of the chain's maps.h5 group."""
        return f"{Path(self.path).name}:{self.chain_id}"

    @property
    def name(self) -> str:
        """``<file stem>_<chain id>``: the ``id`` of the chain's maps.h5 group."""
        return f"{file_stem(self.path)}_{self.chain_id}"

    @property
    def resolved(self) -> np.ndarray:
        """(n,) bool: the residue has a C-alpha (and so a C-beta position)."""
        return ~np.isnan(self.cb[:, 0])

    def __len__(self) -> int:
        return len(self.sequence)

    def chain_breaks(self) -> list[tuple[int, int]]:
        """``(k, n_missing)``: after residue ``k`` the numbering skips ``n_missing`` residues and
        the C-alpha atoms of ``k`` and ``k + 1`` are too far apart to be bonded (a real gap).
        Insertion codes and continuous chains with odd numbering give no break."""
        out = []
        for k in range(len(self.resnums) - 1):
            a, b = _resseq(self.resnums[k]), _resseq(self.resnums[k + 1])
            if a is None or b is None or b - a <= 1:
                continue
            d = float(np.linalg.norm(self.ca[k + 1] - self.ca[k]))
            if np.isnan(d) or d > MAX_BONDED_CA_DISTANCE:
                out.append((k, b - a - 1))
        return out


@dataclass
class LoadFailure:
    """A file or chain that could not be used, and why (kept in the reports)."""

    source: str
    chain: str | None
    reason: str

    def as_dict(self) -> dict:
        return {"source": self.source, "chain": self.chain, "reason": self.reason}


def file_stem(path: str | Path) -> str:
    """The file name without its structure suffix (``1abc.cif.gz`` -> ``1abc``)."""
    name = Path(path).name
    for suf in sorted(STRUCTURE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return Path(path).stem


def _resseq(resnum: str) -> int | None:
    digits = resnum.rstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    if digits != resnum:  # an insertion code: numbering jumps around it carry no gap meaning
        return None
    try:
        return int(digits)
    except ValueError:
        return None


def virtual_cb(n: np.ndarray, ca: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Ideal-geometry C-beta from backbone atoms (trRosetta, Yang et al. 2020):
    ``b = CA - N``, ``c = C - CA``, ``a = b x c``,
    ``CB = -0.58273431 a + 0.56802827 b - 0.54067466 c + CA``. Works on (..., 3) arrays."""
    b = ca - n
    cc = c - ca
    a = np.cross(b, cc)
    return -0.58273431 * a + 0.56802827 * b - 0.54067466 * cc + ca


def _parse(path: Path):
    suffix = path.name.lower()
    is_cif = suffix.endswith((".cif", ".mmcif", ".cif.gz", ".mmcif.gz"))
    parser = MMCIFParser(QUIET=True) if is_cif else PDBParser(QUIET=True)
    try:
        if suffix.endswith(".gz"):
            with gzip.open(path, "rt") as fh:
                handle = io.StringIO(fh.read())
            structure = parser.get_structure(file_stem(path), handle)
        else:
            structure = parser.get_structure(file_stem(path), str(path))
    except Exception as e:  # Biopython raises many types on malformed input; re-raised with the file
        raise StructureError(
            f"{path}: not a readable {'mmCIF' if is_cif else 'PDB'} file ({type(e).__name__}: {e})"
        ) from e
    models = list(structure)
    if not models or not any(True for _ in models[0].get_atoms()):
        raise StructureError(f"{path}: no atoms found; is it a {'mmCIF' if is_cif else 'PDB'} file?")
    return models[0]


def _chain_from_bio(path: Path, bio_chain, map_mse: bool) -> Chain:
    seq, resnums, cb, ca = [], [], [], []
    n_virtual = n_skipped = 0
    for res in bio_chain:
        het, resseq, icode = res.id
        if het == "W":
            continue
        name = res.get_resname().strip().upper()
        if het == " " and name in THREE_TO_ONE:
            one = THREE_TO_ONE[name]
        elif map_mse and name in MODIFIED_TO_ONE:
            one = MODIFIED_TO_ONE[name]
        else:
            if het == " ":
                n_skipped += 1
            continue
        nan3 = np.full(3, np.nan)
        ca_xyz = res["CA"].coord.astype(np.float64) if "CA" in res else nan3
        if "CA" not in res:
            cb_xyz = nan3
        elif one == "G":
            cb_xyz = ca_xyz
        elif "CB" in res:
            cb_xyz = res["CB"].coord.astype(np.float64)
        elif "N" in res and "C" in res:
            cb_xyz = virtual_cb(res["N"].coord.astype(np.float64), ca_xyz, res["C"].coord.astype(np.float64))
            n_virtual += 1
        else:
            log.debug("%s chain %s residue %s: no CB, N or C; C-alpha used", path, bio_chain.id, resseq)
            cb_xyz = ca_xyz
        seq.append(one)
        resnums.append(f"{resseq}{icode.strip()}")
        cb.append(cb_xyz)
        ca.append(ca_xyz)
    shape = (len(seq), 3)
    return Chain(
        path=str(path),
        chain_id=str(bio_chain.id),
        sequence="".join(seq),
        resnums=resnums,
        cb=np.array(cb, dtype=np.float64).reshape(shape),
        ca=np.array(ca, dtype=np.float64).reshape(shape),
        n_virtual_cb=n_virtual,
        n_skipped=n_skipped,
    )


def read_chains(
    path: str | Path,
    chains: Sequence[str] | None = None,
    min_residues: int = 30,
    map_mse: bool = True,
    failures: list[LoadFailure] | None = None,
) -> list[Chain]:
    """Read the protein chains of the first model of a PDB or mmCIF file (``.gz`` too).

    ``chains`` names the chain ids to read (each must exist and have standard residues); by default
    every chain with at least ``min_residues`` standard residues is read. Raises
    :class:`StructureError` (naming the file and chain) for a file that is not a structure, a
    requested chain that is absent, or a chain with no C-alpha atom; with a ``failures`` list, a
    bad chain is appended there instead and the file's other chains are still returned.
    """
    path = Path(path)
    if not path.is_file():
        raise StructureError(f"{path}: no such file")
    model = _parse(path)
    by_id = {str(c.id): c for c in model}
    if chains is not None:
        missing = [c for c in chains if c not in by_id]
        if missing:
            raise StructureError(f"{path}: chain(s) {missing} not found; chains in the first model: {sorted(by_id)}")
        selected = [by_id[c] for c in chains]
    else:
        selected = list(model)
    out = []
    for bio_chain in selected:
        chain = _chain_from_bio(path, bio_chain, map_mse)
        if chains is None and len(chain) < min_residues:
            log.debug("%s chain %s: %d standard residues < %d, skipped", path, chain.chain_id, len(chain), min_residues)
            continue
        problem = None
        if len(chain) == 0:
            problem = f"{path} chain {chain.chain_id}: no standard amino-acid residues"
        elif not chain.resolved.any():
            problem = (
                f"{path} chain {chain.chain_id}: no C-alpha atoms ({len(chain)} residues), "
                "so no coordinates to compare with"
            )
        if problem is None:
            out.append(chain)
        elif failures is None:
            raise StructureError(problem)
        else:
            log.warning("%s", problem)
            failures.append(LoadFailure(str(path), chain.chain_id, problem))
    if chains is None and not out:
        log.info("%s: no protein chain with >= %d standard residues", path, min_residues)
    return out


def structure_files(directory: str | Path) -> list[Path]:
    """The structure files (by suffix, sorted) in a directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MissingStructuresError(f"structure folder not found: {directory}")
    return sorted(p for p in directory.iterdir() if p.is_file() and p.name.lower().endswith(STRUCTURE_SUFFIXES))


def load_structures(
    paths: str | Path | Iterable[str | Path], min_residues: int = 30, map_mse: bool = True
) -> tuple[list[Chain], list[LoadFailure]]:
    """Read every structure of a folder (or a list of files); a file or chain that fails is logged
    and listed in the returned failures, and the other files and chains are still read."""
    if isinstance(paths, (str, Path)):
        files = structure_files(paths) if Path(paths).is_dir() else [Path(paths)]
    else:
        files = [Path(p) for p in paths]
    chains, failures = [], []
    for f in files:
        try:
            chains.extend(read_chains(f, min_residues=min_residues, map_mse=map_mse, failures=failures))
        except StructureError as e:
            log.warning("%s", e)
            failures.append(LoadFailure(str(f), None, str(e)))
    log.info("read %d chains from %d files (%d failed)", len(chains), len(files), len(failures))
    return chains, failures


# ---------------------------------------------------------------------------------- alignment
@dataclass
class ChainAlignment:
    """A chain placed on a model sequence of length ``L``."""

    seq_to_res: np.ndarray  # (L,) int64: index into the chain's residues, -1 where none
    n_identical: int
    n_mismatched: int  # aligned pairs with different residues
    n_unaligned: int  # chain residues facing a gap in the sequence
    identity: float  # n_identical / chain residues
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "n_identical": self.n_identical,
            "n_mismatched": self.n_mismatched,
            "n_unaligned": self.n_unaligned,
            "identity": round(self.identity, 4),
            "problems": list(self.problems),
        }


def _aligner() -> PairwiseAligner:
    aligner = PairwiseAligner()
    aligner.mode = "global"
    aligner.substitution_matrix = substitution_matrices.load("BLOSUM62")
    aligner.open_gap_score = -10.0  # EMBOSS needle's defaults
    aligner.extend_gap_score = -0.5
    aligner.end_gap_score = 0.0  # a domain inside a longer sequence costs nothing at the ends
    return aligner


def align_to_sequence(
    chain: Chain, sequence: str, min_identity: float = 0.9, max_mismatches: int = 3, strict: bool = True
) -> ChainAlignment:
    """Align ``chain`` to ``sequence`` (global, BLOSUM62, gap -10/-0.5, free end gaps).

    Real chain breaks (see :meth:`Chain.chain_breaks`) enter as placeholder residues, so the
    alignment keeps them as gaps. Identity is identical pairs over the chain's residues. With
    ``strict``, identity below ``min_identity`` or more than ``max_mismatches`` mismatched pairs
    raises :class:`AlignmentMismatchError`; smaller problems are logged and listed in ``problems``.
    """
    sequence = sequence.upper()
    where = f"{chain.path} chain {chain.chain_id}"
    if chain.sequence == sequence:
        idx = np.arange(len(sequence), dtype=np.int64)
        return ChainAlignment(idx, len(sequence), 0, 0, 1.0)
    # target: chain residues with placeholders at real breaks; real_index maps back (-1: placeholder)
    target, real_index = [], []
    breaks = dict(chain.chain_breaks())
    for k, aa in enumerate(chain.sequence):
        target.append(aa)
        real_index.append(k)
        n_missing = breaks.get(k, 0)
        target.extend(GAP_PLACEHOLDER * n_missing)
        real_index.extend([-1] * n_missing)
    real_index = np.asarray(real_index, dtype=np.int64)
    safe = "".join(c if c in "ACDEFGHIKLMNPQRSTVWYBZX" else "X" for c in sequence)
    alignment = _aligner().align(safe, "".join(target))[0]
    ind = np.asarray(alignment.indices)  # (2, columns): positions in (sequence, target), -1 = gap
    seq_to_res = np.full(len(sequence), -1, dtype=np.int64)
    both = (ind[0] >= 0) & (ind[1] >= 0)
    res = real_index[ind[1, both]]
    pos = ind[0, both]
    keep = res >= 0
    seq_to_res[pos[keep]] = res[keep]
    aligned_res = res[keep]
    n_identical = int(sum(sequence[p] == chain.sequence[r] for p, r in zip(pos[keep], aligned_res)))
    n_mismatched = int(len(aligned_res) - n_identical)
    n_unaligned = int(len(chain) - len(aligned_res))
    identity = n_identical / max(len(chain), 1)
    problems = []
    if n_mismatched:
        problems.append(f"{n_mismatched} mismatched residue pair(s)")
    if n_unaligned:
        problems.append(f"{n_unaligned} chain residue(s) not in the sequence")
    if identity < min_identity:
        problems.append(f"identity {identity:.3f} < {min_identity}")
    aln = ChainAlignment(seq_to_res, n_identical, n_mismatched, n_unaligned, identity, problems)
    if strict and (identity < min_identity or n_mismatched > max_mismatches):
        raise AlignmentMismatchError(
            f"{where}: sequence does not match the structure ({'; '.join(problems)}; "
            f"tolerance: identity >= {min_identity}, mismatches <= {max_mismatches})"
        )
    if problems:
        log.warning("%s: aligned with %s", where, "; ".join(problems))
    return aln


def coords_on_sequence(chain: Chain, alignment: ChainAlignment) -> np.ndarray:
    """(L, 3) C-beta coordinates on the sequence's positions; NaN where unresolved or unaligned."""
    out = np.full((len(alignment.seq_to_res), 3), np.nan)
    has = alignment.seq_to_res >= 0
    out[has] = chain.cb[alignment.seq_to_res[has]]
    return out
