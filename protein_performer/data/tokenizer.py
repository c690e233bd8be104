"""The protein alphabet of the Performer paper's released code: 29 ids.

ids  0-3   special tokens  <pad> <bos> <eos> <mask>
ids  4-23  the 20 standard amino acids  ACDEFGHIKLMNPQRSTVWY
ids 24-28  the 5 anomalous residues     BOUXZ  (Asx, pyrrolysine, selenocysteine, unknown, Glx)

Unknown-residue policy: a character outside these 25 letters (after upper-casing and stripping
one trailing ``*`` stop symbol) is an error by default (``unknown="error"``), because a silently
rewritten residue is data lost. ``unknown="X"`` maps every such character to ``X`` instead.
Ingestion uses the strict policy and rejects (counts and lists) such records.

Encoding and decoding go through 256-entry lookup tables (NumPy fancy indexing), never a Python
loop over characters.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>")
STANDARD_AA = "ACDEFGHIKLMNPQRSTVWY"
ANOMALOUS_AA = "BOUXZ"
RESIDUES = STANDARD_AA + ANOMALOUS_AA

_INVALID = 255


class UnknownResidueError(ValueError):
    """Raised when a sequence holds a character outside the alphabet."""

    def __init__(self, char: str, position: int):
        self.char = char
        self.position = position
        super().__init__(f"invalid residue {char!r} at position {position} (0-based)")


class Tokenizer:
    """Maps protein sequences to uint8 token ids and back.

    Attributes ``pad_id``, ``bos_id``, ``eos_id``, ``mask_id`` and ``vocab_size`` (29) follow the
    architecture contract; ``residue_ids`` are the 25 residue ids (for random replacement in MLM).
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2
    mask_id = 3

    def __init__(self, unknown: str = "error"):
        if unknown not in ("error", "X"):
            raise ValueError(f"unknown must be 'error' or 'X', got {unknown!r}")
        self.unknown = unknown
        self.tokens: list[str] = list(SPECIAL_TOKENS) + list(RESIDUES)
        self.vocab_size = len(self.tokens)
        self.n_special = len(SPECIAL_TOKENS)
        self.residue_ids = np.arange(self.n_special, self.vocab_size, dtype=np.uint8)
        self.standard_ids = np.arange(self.n_special, self.n_special + len(STANDARD_AA), dtype=np.uint8)

        enc = np.full(256, _INVALID, dtype=np.uint8)
        for i, aa in enumerate(RESIDUES):
            enc[ord(aa)] = self.n_special + i
            enc[ord(aa.lower())] = self.n_special + i
        self._encode_table = enc
        dec = np.full(256, ord("?"), dtype=np.uint8)
        for i, aa in enumerate(RESIDUES):
            dec[self.n_special + i] = ord(aa)
        for i, ch in enumerate("_^$#"):  # printable stand-ins for pad, bos, eos, mask in decode
            dec[i] = ord(ch)
        self._decode_table = dec

    # ------------------------------------------------------------------ encoding
    def encode_bytes(self, seq: bytes | bytearray | memoryview) -> np.ndarray:
        """Encode raw ASCII bytes (the ingestion fast path). Returns uint8 ids.

        Raises :class:`UnknownResidueError` for a character outside the alphabet (unless the
        tokenizer was built with ``unknown="X"``).
        """
        raw = np.frombuffer(seq, dtype=np.uint8)
        if raw.size and raw[-1] == ord("*"):
            raw = raw[:-1]
        ids = self._encode_table[raw]
        bad = ids == _INVALID
        if bad.any():
            if self.unknown == "X":
                ids = ids.copy()
                ids[bad] = self.n_special + RESIDUES.index("X")
            else:
                pos = int(np.argmax(bad))
                raise UnknownResidueError(chr(raw[pos]), pos)
        return ids

    def encode(self, seq: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Encode a sequence string into a uint8 array of token ids."""
        try:
            b = seq.encode("ascii")
        except UnicodeEncodeError as e:
            raise UnknownResidueError(seq[e.start], e.start) from None
        ids = self.encode_bytes(b)
        if add_bos or add_eos:
            parts = []
            if add_bos:
                parts.append(np.array([self.bos_id], dtype=np.uint8))
            parts.append(ids)
            if add_eos:
                parts.append(np.array([self.eos_id], dtype=np.uint8))
            ids = np.concatenate(parts)
        return ids

    # ------------------------------------------------------------------ model input
    @staticmethod
    def special_tokens(causal: bool) -> int:
        """How many special tokens :meth:`frame` adds: 1 (bos) for a causal (UNI) model, 2 (bos,
        eos) for a bidirectional (BID) one; a model of ``max_len`` positions holds
        ``max_len - special_tokens(causal)`` residues."""
        return 1 if causal else 2

    @staticmethod
    def residue_slice(n_residues: int) -> slice:
        """Where ``n_residues`` residues sit in their :meth:`frame` (positions ``1 .. n``, causal or
        not): it maps a position of the model's input (its maps, representations) back to a residue."""
        return slice(1, 1 + int(n_residues))

    def frame(self, residues: np.ndarray | str, causal: bool) -> tuple[np.ndarray, slice]:
        """The model's input for one sequence (residue ids without special tokens, or a string,
        encoded first): BID ``[bos, s, eos]``, UNI ``[bos, s]`` (a UNI model never reads eos; in
        training it is the last target). Returns the int64 token ids and :meth:`residue_slice`:
        ``ids[where]`` are the residues. Training's crops (``data/collate.py``) cut windows of it."""
        residues = self.encode(residues) if isinstance(residues, str) else np.asarray(residues)
        n = len(residues)
        ids = np.empty(n + self.special_tokens(causal), dtype=np.int64)
        ids[0] = self.bos_id
        ids[1 : n + 1] = residues
        if not causal:
            ids[n + 1] = self.eos_id
        return ids, self.residue_slice(n)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Iterable[int] | np.ndarray, skip_special: bool = True) -> str:
        """Decode ids to a string. Special tokens are dropped unless ``skip_special=False``,
        in which case they appear as ``_`` (pad), ``^`` (bos), ``$`` (eos), ``#`` (mask)."""
        arr = np.asarray(ids)
        if hasattr(ids, "detach"):  # torch tensor
            arr = ids.detach().cpu().numpy()
        arr = arr.astype(np.int64).ravel()
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token id out of range [0, {self.vocab_size}): {arr.min()}..{arr.max()}")
        if skip_special:
            arr = arr[arr >= self.n_special]
        return self._decode_table[arr].tobytes().decode("ascii")

    def vocab(self) -> dict[str, int]:
        """Token string -> id, as stored in the shard and manifest ``vocab`` attributes."""
        return {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return self.vocab_size
