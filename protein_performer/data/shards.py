"""Sharded HDF5 token store: one writer (:func:`write_shard`) and one reader (:class:`ShardedDataset`).

Layout (the architecture contract)::

    <root>/manifest.json            written by ingestion, read by :func:`read_manifest`
    <root>/<split>/shard-NNNNN.h5
        tokens   uint8  [total residues]   chunked + compressed, no separators
        offsets  int64  [n + 1]            sequence i is tokens[offsets[i]:offsets[i+1]]
        ids      str    [n]                variable-length UTF-8
        attrs    vocab (json string), split, format_version (= FORMAT_VERSION)

A shard is written to ``<path>.tmp-<pid>`` and renamed into place with :func:`os.replace`, so a
reader never sees a partial shard.

Compression of the tokens: ``gzip`` is HDF5's standard deflate filter (readable by every HDF5 tool,
no plugin). With ``gzip_strategy="huffman_only"`` the writer deflates each chunk itself with zlib's
Huffman-only strategy and stores it with ``write_direct_chunk``: protein sequences have almost no
LZ77 repeats, so skipping the match search is ~1.7x faster than level 1 and gives smaller chunks
(52% vs 60% of the raw size on Swiss-Prot). The chunks are ordinary zlib streams, so the file is a
plain gzip-filtered dataset to every reader.

The reader keeps every shard's ``offsets`` in memory (8 bytes per sequence) and opens the HDF5 files
lazily, once per process: it remembers the pid that opened them and reopens after a fork, and
:meth:`ShardedDataset.__getstate__` drops the handles so a pickled copy (a DataLoader worker under
``spawn``) opens its own.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np

from protein_performer.errors import IncompleteOutputError, UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test", "ood")
MANIFEST_NAME = "manifest.json"
DEFAULT_CHUNK_SIZE = 1 << 16  # 64 KiB of uint8 tokens per HDF5 chunk: ~200 sequences; one random read decompresses one chunk
GZIP_STRATEGIES = ("default", "huffman_only")


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


# ---------------------------------------------------------------------------------------- writing
def deflate_chunks_huffman(tokens: np.ndarray, chunk_size: int, level: int = 1) -> Iterator[bytes]:
    """``tokens`` cut into chunks of ``chunk_size`` bytes, each a zlib stream (Huffman-only deflate).

    The last chunk is padded with zeros to the full chunk size, as HDF5 itself stores an edge
    chunk (the padding is outside the dataset's extent and never read). Each chunk gets its own
    compressor: HDF5 inflates chunks independently. ``memLevel=9`` makes blocks of 32 Ki symbols
    (two Huffman tables per 64 KiB chunk instead of four): a little faster, same size.
    """
    view = memoryview(np.ascontiguousarray(tokens, dtype=np.uint8)).cast("B")
    n = len(view)
    for start in range(0, n, chunk_size):
        c = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
        part = c.compress(view[start : start + chunk_size])
        pad = start + chunk_size - n
        if pad > 0:
            part += c.compress(bytes(pad))
        yield part + c.flush()


def _validate(path: Path, tokens: np.ndarray, offsets: np.ndarray, ids: Sequence[str], split: str) -> None:
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be a flat 1-D array, got shape {tokens.shape}")
    if offsets.ndim != 1 or offsets.size < 1:
        raise ValueError(f"{path}: offsets must be a 1-D array of n + 1 >= 1 entries, got shape {offsets.shape}")
    if offsets[0] != 0:
        raise ValueError(f"{path}: offsets[0] must be 0, got {int(offsets[0])}")
    d = np.diff(offsets)
    if d.size and d.min() < 0:
        bad = int(np.argmax(d < 0))
        raise ValueError(
            f"{path}: offsets must be non-decreasing; record {bad} ({ids[bad] if bad < len(ids) else '?'}) "
            f"has offsets {int(offsets[bad])} -> {int(offsets[bad + 1])}"
        )
    if int(offsets[-1]) != tokens.size:
        raise ValueError(f"{path}: offsets[-1] = {int(offsets[-1])} but there are {tokens.size} tokens")
    n = offsets.size - 1
    if len(ids) != n:
        raise ValueError(f"{path}: {len(ids)} ids for {n} sequences (offsets has {offsets.size} entries)")
    if split not in SPLITS:
        raise ValueError(f"{path}: split must be one of {SPLITS}, got {split!r}")


def write_shard(
    path: str | os.PathLike,
    tokens: np.ndarray,
    offsets: np.ndarray,
    ids: Sequence[str] | Sequence[bytes],
    split: str,
    vocab: dict[str, int],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compression: str | None = "gzip",
    compression_opts: int | None = 4,
    attrs: dict[str, Any] | None = None,
    gzip_strategy: str = "default",
) -> Path:
    """Write one shard atomically (``<path>.tmp-<pid>`` then :func:`os.replace`). Returns the path.

    ``tokens`` is the flat uint8 array of all residues (no separators), ``offsets`` the int64
    ``[n + 1]`` boundaries (``offsets[0] == 0``, non-decreasing, ``offsets[-1] == len(tokens)``),
    ``ids`` the n record ids (``str``, or ``bytes`` that are valid UTF-8: stored as they are).
    ``compression`` is ``"gzip"`` (level ``compression_opts``), ``"lzf"`` or ``None``.
    ``gzip_strategy="huffman_only"`` (gzip only) deflates the chunks here with zlib's Huffman-only
    strategy (see the module docstring; the level then does not matter) instead of HDF5's filter.
    Extra ``attrs`` are stored as HDF5 attributes (JSON-encoded when not scalar).
    """
    path = Path(path)
    tokens = np.ascontiguousarray(tokens)
    if tokens.dtype != np.uint8:
        raise ValueError(f"{path}: tokens must be uint8, got {tokens.dtype}")
    offsets = np.asarray(offsets, dtype=np.int64)
    ids = list(ids)
    _validate(path, tokens, offsets, ids, split)
    if compression == "lzf":
        compression_opts = None
    elif compression is None:
        compression_opts = None
    elif compression != "gzip":
        raise ValueError(f"{path}: compression must be 'gzip', 'lzf' or None, got {compression!r}")
    if gzip_strategy not in GZIP_STRATEGIES:
        raise ValueError(f"{path}: gzip_strategy must be one of {GZIP_STRATEGIES}, got {gzip_strategy!r}")
    direct = compression == "gzip" and gzip_strategy == "huffman_only" and tokens.size > 0

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            chunks = (max(1, min(int(chunk_size), tokens.size)),) if tokens.size else None
            dset = f.create_dataset(
                "tokens",
                shape=tokens.shape,
                data=None if direct else tokens,
                dtype=np.uint8,
                chunks=chunks,
                compression=compression if tokens.size else None,
                compression_opts=compression_opts if tokens.size else None,
            )
            if direct:  # chunks deflated here; filter_mask=0: "the deflate filter was applied"
                level = 1 if compression_opts is None else int(compression_opts)
                for k, data in enumerate(deflate_chunks_huffman(tokens, chunks[0], level)):
                    dset.id.write_direct_chunk((k * chunks[0],), data, filter_mask=0)
            f.create_dataset("offsets", data=offsets, dtype=np.int64)
            f.create_dataset("ids", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
            f.attrs["vocab"] = json.dumps(vocab)
            f.attrs["split"] = split
            f.attrs["format_version"] = FORMAT_VERSION
            for k, v in (attrs or {}).items():
                f.attrs[k] = v if isinstance(v, (str, int, float, np.integer, np.floating)) else json.dumps(v)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    log.debug("wrote %s: %d sequences, %d residues", path, offsets.size - 1, tokens.size)
    return path


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
                    raise ShardFormatError(f"{path}: shard of split {shard_split!r} listed under {self.split!r}; {redo}")
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
