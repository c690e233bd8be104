"""Sharded HDF5 token store: the reader :class:`ShardedDataset` (and :class:`PackedDataset`), the
manifest reader, and the errors a reader raises. The format and the writer :func:`write_shard`
are in shard_writer.py (re-exported here).

The reader keeps every shard's ``offsets`` in memory (8 bytes per sequence) and opens the HDF5 files
lazily, once per process: it remembers the pid that opened them and reopens after a fork, and
:meth:`ShardedDataset.__getstate__` drops the handles so a pickled copy (a DataLoader worker under
``spawn``) opens its own.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import h5py
import numpy as np

from protein_performer.data.shard_writer import (
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    GZIP_STRATEGIES,
    MANIFEST_NAME,
    SPLITS,
    deflate_chunks_huffman,
    write_shard,
)
from protein_performer.errors import IncompleteOutputError, UserError

log = logging.getLogger(__name__)


class ShardFormatError(UserError, RuntimeError):
    """A manifest or shard is missing, corrupt or of another format version."""


class MissingShardsError(ShardFormatError, FileNotFoundError):
    """No manifest (or a listed shard is gone): not an ingest output directory."""

    def __str__(self) -> str:  # FileNotFoundError's own str would add "[Errno ...]" noise
        return str(self.args[0]) if self.args else ""


class IncompleteShardsError(IncompleteOutputError, MissingShardsError):
    """An ingest output directory whose ingest was interrupted (no manifest yet)."""


class MissingSplitError(ShardFormatError, KeyError):
    """A split that the manifest does not have (or has empty)."""

    def __str__(self) -> str:  # KeyError's str would quote the message
        return str(self.args[0]) if self.args else ""


class VocabularyError(ShardFormatError, ValueError):
    """Shards written with another token vocabulary than this tokenizer's."""


def _damaged(path: Path, e: BaseException) -> ShardFormatError:
    """The one message for a shard HDF5 cannot read (h5py raises OSError or KeyError deep inside)."""
    detail = " ".join(str(e).split()) or type(e).__name__
    return ShardFormatError(
        f"{path}: cannot read this shard ({detail}): the file is truncated or corrupted (an interrupted "
        "copy, a full disk, a bad disk?). Copy the shard directory again, or re-ingest into a new output_dir."
    )


# ---------------------------------------------------------------------------------------- manifest
def read_manifest(output_dir: str | os.PathLike) -> dict:
    """Load ``<output_dir>/manifest.json`` and check its format version.

    Ingestion writes the manifest last (atomically), after every shard: a directory without one
    is not complete. When it holds what an interrupted ingest leaves (``_work/`` or
    ``ingest_config.json``), :class:`IncompleteShardsError` says so and how to resume.
    """
    root = Path(output_dir)
    path = root / MANIFEST_NAME
    if root.is_file():
        raise MissingShardsError(
            f"{root} is a file; expected the output_dir of an ingest (a directory with manifest.json)"
        )
    if not path.is_file():
        if (root / "_work").is_dir() or (root / "ingest_config.json").is_file():
            raise IncompleteShardsError(
                f"{root}: incomplete: the ingest into this directory was interrupted (no {MANIFEST_NAME} yet); "
                f"rerun the same ingest command with resume=true to finish it"
            )
        raise MissingShardsError(
            f"no manifest at {path}: run `python -m protein_performer.ingest input=... output_dir={output_dir}` first"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardFormatError(f"{path}: not valid JSON ({e}); re-ingest (or copy the directory again)") from None
    if not isinstance(manifest, dict):
        raise ShardFormatError(f"{path}: not an ingest manifest (a JSON object is expected); re-ingest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardFormatError(
            f"{path}: format_version {version!r}, this reader understands {FORMAT_VERSION}; re-run ingestion "
            "into a new output_dir with this version of protein_performer"
        )
    if not isinstance(manifest.get("splits"), dict):
        raise ShardFormatError(f"{path}: no 'splits' entry; re-ingest")
    return manifest


def check_vocab(root: str | os.PathLike, manifest: dict, vocab: dict[str, int]) -> None:
    """Raise :class:`VocabularyError` when the manifest's vocabulary is not ``vocab`` (the tokenizer's)."""
    got = manifest.get("vocab")
    if got is not None and got != vocab:
        diff = sorted(k for k in set(got) | set(vocab) if got.get(k) != vocab.get(k))[:5]
        raise VocabularyError(
            f"{Path(root) / MANIFEST_NAME}: the shards were written with another token vocabulary "
            f"(differs in {', '.join(map(repr, diff))}); re-ingest the FASTA with this version of protein_performer"
        )


def split_shards(root: str | os.PathLike, split: str, manifest: dict | None = None) -> list[dict]:
    """The manifest's shard entries of ``split`` (``[]`` when the split is absent or empty)."""
    manifest = read_manifest(root) if manifest is None else manifest
    entry = manifest["splits"].get(split)
    if not entry:
        return []
    return list(entry.get("shards", []))


# ---------------------------------------------------------------------------------------- reading
class ShardedDataset:
    """Random access to the sequences of one split, by global index across its shards.

    ``dataset[i]`` is the uint8 token array of sequence ``i`` (residues only, no special tokens);
    ``get_id(i)`` its record id. Shard boundaries are found with :func:`numpy.searchsorted` over the
    cumulative sequence counts. HDF5 files are opened on first use in each process (at most
    ``max_open_files`` at once, least recently used closed first), and reopened after a fork.
    ``rdcc_nbytes`` is h5py's per-file cache of decompressed chunks.

    A torch ``Dataset`` by duck typing (``__len__`` + ``__getitem__``), so the module does not
    import torch.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        manifest: dict | None = None,
        max_open_files: int = 64,
        rdcc_nbytes: int = 1 << 20,
    ):
        self.root = Path(root)
        self.split = split
        manifest = read_manifest(self.root) if manifest is None else manifest
        if split not in manifest["splits"]:
            present = [k for k, v in manifest["splits"].items() if v and v.get("n_sequences")]
            raise MissingSplitError(
                f"{self.root / MANIFEST_NAME}: no split {split!r} (present: {', '.join(present) or 'none'}); "
                "ingest with a non-zero fraction for it, or ask for one of the present splits"
            )
        self.vocab: dict[str, int] = manifest.get("vocab", {})
        self.max_open_files = int(max_open_files)
        self.rdcc_nbytes = int(rdcc_nbytes)
        self.paths: list[Path] = []
        self.offsets: list[np.ndarray] = []  # per shard, int64 [n_k + 1]
        for entry in split_shards(self.root, split, manifest):
            path = self.root / entry["path"]
            offsets = self._read_header(path, entry)
            self.paths.append(path)
            self.offsets.append(offsets)
        counts = np.array([o.size - 1 for o in self.offsets], dtype=np.int64)
        residues = np.array([int(o[-1]) for o in self.offsets], dtype=np.int64)
        self.cum_sequences = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.cum_residues = np.concatenate([[0], np.cumsum(residues)]).astype(np.int64)
        expected = manifest["splits"][split].get("n_sequences") if manifest["splits"][split] else 0
        if expected is not None and int(expected) != len(self):
            raise ShardFormatError(
                f"{self.root / MANIFEST_NAME}: split {split!r} lists {expected} sequences, its shards hold {len(self)}"
            )
        self._handles: dict[int, tuple[h5py.File, h5py.Dataset]] = {}  # insertion order = LRU order
        self._pid = os.getpid()
        log.debug("%s/%s: %d sequences in %d shards", self.root, split, len(self), len(self.paths))

    def _read_header(self, path: Path, entry: dict) -> np.ndarray:
        if not path.is_file():
            raise MissingShardsError(
                f"shard {path} listed in {self.root / MANIFEST_NAME} is missing; copy the directory again or re-ingest"
            )
        redo = "re-ingest into a new output_dir"
        try:
            with h5py.File(path, "r") as f:
                version = f.attrs.get("format_version")
                version = version.item() if isinstance(version, np.generic) else version
                if version is None or int(version) != FORMAT_VERSION:
                    raise ShardFormatError(
                        f"{path}: format_version {version!r}, this reader understands {FORMAT_VERSION}; {redo}"
                    )
                shard_split = f.attrs.get("split")
                if shard_split is not None and shard_split != self.split:
                    raise ShardFormatError(
                        f"{path}: shard of split {shard_split!r} listed under {self.split!r}; {redo}"
                    )
                vocab = f.attrs.get("vocab")
                if vocab is not None and self.vocab and json.loads(vocab) != self.vocab:
                    raise VocabularyError(
                        f"{path}: written with another token vocabulary than {self.root / MANIFEST_NAME}; {redo}"
                    )
                for name in ("tokens", "offsets", "ids"):
                    if name not in f:
                        raise ShardFormatError(f"{path}: no {name!r} dataset: not a shard of this format; {redo}")
                offsets = f["offsets"][:].astype(np.int64, copy=False)
                n_tokens = f["tokens"].shape[0]
        except (OSError, KeyError) as e:  # h5py: OSError for a truncated file, KeyError for a damaged header
            raise _damaged(path, e) from e
        if offsets.size < 1 or offsets[0] != 0 or (offsets.size > 1 and np.diff(offsets).min() < 0):
            raise ShardFormatError(f"{path}: offsets are not a valid index (corrupted?); {redo}")
        if int(offsets[-1]) != n_tokens:
            raise ShardFormatError(f"{path}: offsets end at {int(offsets[-1])}, tokens has {n_tokens}; {redo}")
        n = entry.get("n_sequences")
        if n is not None and int(n) != offsets.size - 1:
            raise ShardFormatError(f"{path}: manifest says {n} sequences, shard holds {offsets.size - 1}; {redo}")
        r = entry.get("n_residues")
        if r is not None and int(r) != n_tokens:
            raise ShardFormatError(f"{path}: manifest says {r} residues, shard holds {n_tokens}; {redo}")
        return offsets

    # -------------------------------------------------------------- handles (lazy, per process)
    def _open(self, shard: int) -> tuple[h5py.File, h5py.Dataset]:
        """(file, tokens dataset) of a shard, opened in this process on first use."""
        if self._pid != os.getpid():  # forked: never use the parent's handles
            self._handles = {}
            self._pid = os.getpid()
        entry = self._handles.pop(shard, None)
        if entry is None:
            if len(self._handles) >= self.max_open_files:
                oldest = next(iter(self._handles))
                self._handles.pop(oldest)[0].close()
            try:
                f = h5py.File(self.paths[shard], "r", rdcc_nbytes=self.rdcc_nbytes)
                entry = (f, f["tokens"])
            except (OSError, KeyError) as e:
                raise _damaged(self.paths[shard], e) from e
        self._handles[shard] = entry  # re-insert: most recently used last
        return entry

    def _file(self, shard: int) -> h5py.File:
        return self._open(shard)[0]

    def close(self) -> None:
        """Close this process's open shard files (they reopen on next access)."""
        if self._pid == os.getpid():
            for f, _ in self._handles.values():
                f.close()
        self._handles = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()

    # -------------------------------------------------------------- access
    def __len__(self) -> int:
        return int(self.cum_sequences[-1])

    @property
    def n_residues(self) -> int:
        return int(self.cum_residues[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """Global sequence index -> (shard, local index)."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for split {self.split!r} of {n} sequences")
        shard = int(np.searchsorted(self.cum_sequences, index, side="right")) - 1
        return shard, int(index - self.cum_sequences[shard])

    def __getitem__(self, index: int) -> np.ndarray:
        shard, local = self.locate(int(index))
        o = self.offsets[shard]
        return self.read_tokens(shard, o[local], o[local + 1])

    def get_id(self, index: int) -> str:
        shard, local = self.locate(int(index))
        try:
            return self._file(shard)["ids"].asstr()[local]
        except (OSError, KeyError) as e:
            raise _damaged(self.paths[shard], e) from e

    def read_tokens(self, shard: int, start: int, stop: int) -> np.ndarray:
        """Raw residue tokens ``[start, stop)`` of one shard (no separators)."""
        tokens = self._open(shard)[1]
        try:
            return tokens[start:stop]
        except OSError as e:  # a chunk that does not inflate: damaged file
            raise _damaged(self.paths[shard], e) from e

    def lengths(self) -> np.ndarray:
        """Residue count of every sequence, int64 [len(self)] (from the in-memory offsets)."""
        if not self.offsets:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(o) for o in self.offsets])

    def residue_counts(self, vocab_size: int, chunk: int = 1 << 22) -> np.ndarray:
        """Token-id histogram over every residue of the split, read ``chunk`` tokens at a time."""
        counts = np.zeros(vocab_size, dtype=np.int64)
        for shard, o in enumerate(self.offsets):
            for start in range(0, int(o[-1]), chunk):
                toks = self.read_tokens(shard, start, min(start + chunk, int(o[-1])))
                counts += np.bincount(toks, minlength=vocab_size)[:vocab_size]
        return counts


class PackedDataset:
    """TrEMBL-concat blocks: the split's sequences joined as ``s_0 eos s_1 eos ...`` and cut into
    non-overlapping blocks of ``block_size`` tokens. A block may span sequences and shards.

    Block ``b`` is stream positions ``[b * block_size, (b + 1) * block_size)``. The stream has
    ``n_residues + n_sequences`` tokens; the last block is shorter when it does not divide evenly
    (the collator pads it). Per shard, ``stream_offsets = offsets + arange(n + 1)`` gives where each
    sequence starts in the shard's part of the stream.
    """

    def __init__(self, source: ShardedDataset, block_size: int, eos_id: int = 2):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.source = source
        self.block_size = int(block_size)
        self.eos_id = int(eos_id)
        self.stream_offsets = [o + np.arange(o.size, dtype=np.int64) for o in source.offsets]
        lengths = np.array([int(s[-1]) for s in self.stream_offsets], dtype=np.int64)
        self.cum_stream = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        self.stream_length = int(self.cum_stream[-1])

    def __len__(self) -> int:
        return -(-self.stream_length // self.block_size)

    def _shard_stream(self, shard: int, a: int, b: int) -> np.ndarray:
        """Stream tokens ``[a, b)`` local to one shard (residues with an eos after each sequence)."""
        so = self.stream_offsets[shard]
        o = self.source.offsets[shard]
        i0 = int(np.searchsorted(so, a, side="right")) - 1
        i1 = int(np.searchsorted(so, b, side="left"))  # first sequence starting at or after b
        i1 = min(i1, so.size - 1)
        toks = self.source.read_tokens(shard, int(o[i0]), int(o[i1]))
        # eos after each of the sequences i0 .. i1-1, i.e. before the residue offsets o[i0+1 .. i1]
        seg = np.insert(toks, o[i0 + 1 : i1 + 1] - o[i0], np.uint8(self.eos_id))
        base = int(so[i0])
        return seg[a - base : b - base]

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start = index * self.block_size
        stop = min(start + self.block_size, self.stream_length)
        parts = []
        shard = int(np.searchsorted(self.cum_stream, start, side="right")) - 1
        pos = start
        while pos < stop:
            shard_end = int(self.cum_stream[shard + 1])
            if shard_end > pos:
                end = min(stop, shard_end)
                base = int(self.cum_stream[shard])
                parts.append(self._shard_stream(shard, pos - base, end - base))
                pos = end
            shard += 1
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint8)

    def lengths(self) -> np.ndarray:
        n = len(self)
        out = np.full(n, self.block_size, dtype=np.int64)
        if n:
            out[-1] = self.stream_length - (n - 1) * self.block_size
        return out

    def close(self) -> None:
        self.source.close()


__all__ = [
    "DEFAULT_CHUNK_SIZE", "FORMAT_VERSION", "GZIP_STRATEGIES", "IncompleteShardsError", "MANIFEST_NAME", "MissingShardsError",
    "MissingSplitError", "PackedDataset", "SPLITS", "ShardFormatError", "ShardedDataset", "VocabularyError", "check_vocab",
    "deflate_chunks_huffman", "read_manifest", "split_shards", "write_shard",
]  # fmt: skip
