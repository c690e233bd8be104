"""The arithmetic that fixes dedup and splits: plain operations on bytes, the same on every machine.

dedup key  BLAKE2b-128(token bytes)                   (case and a trailing ``*`` do not matter)
split      u = splitmix64(hash[:8] XOR salt(seed)) / 2**64  ->  train if u < f_train,
           valid if u < f_train + f_valid, else test
id key     the id itself (<= 15 bytes) or BLAKE2b-128(id), mixed by splitmix64
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from .common import TEST_CODE, TRAIN_CODE, VALID_CODE

_MASK_64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment: turns the seed into the salt
SHORT_ID_BYTES = 15  # an id of at most this many bytes is its own key (byte 15 holds its length)
_LONG_ID_MARK = 0xFF  # byte 15 of a hashed (long) id's key: never a length

# BLAKE2b-128 with the digest size bound once: the keyword parsing is a good part of a per-record call
blake2b_128 = functools.partial(hashlib.blake2b, digest_size=16)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays (wrapping arithmetic, identical on every machine)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def split_codes(seq_hash_hi: np.ndarray, seed: int, fractions: dict) -> np.ndarray:
    """0 train / 1 valid / 2 test from the first 64 bits of the sequence hash and the seed."""
    salt = mix64(np.array([(int(seed) + _GOLDEN_GAMMA) & _MASK_64], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        mixed = mix64(seq_hash_hi.astype(np.uint64) ^ salt)
    uniform = (mixed >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # 53 bits -> [0, 1)
    train_below = fractions["train"]
    valid_below = fractions["train"] + fractions["valid"]
    codes = np.where(uniform < train_below, TRAIN_CODE, np.where(uniform < valid_below, VALID_CODE, TEST_CODE))
    return codes.astype(np.uint8)


def id_keys(ids: list[bytes], lengths: np.ndarray) -> np.ndarray:
    """128-bit keys of record ids, uint64 ``(n, 2)``: equal keys mean equal ids (the ``idh`` field).

    Ids are grouped (duplicate_id_conflict) by these keys only. A BLAKE2b call per id costs about
    as much as the rest of the id handling, yet accessions are short: an id of at most 15 bytes is
    its own key (zero-padded, its length in byte 15), packed by NumPy for the whole batch. A longer
    id gets its BLAKE2b-128 digest with byte 15 set to 0xFF (never a length), so the two kinds
    cannot meet. A bijective splitmix64 mix then spreads the keys: the resolve step sorts on, and
    buckets by, their first 64 bits.
    """
    n = len(ids)
    lengths = np.asarray(lengths)
    long_ids = np.flatnonzero(lengths > SHORT_ID_BYTES)
    if long_ids.size == n:  # all long (UniRef ids, say): digests only
        raw = np.frombuffer(b"".join([blake2b_128(i).digest() for i in ids]), np.uint8).reshape(n, 16).copy()
        raw[:, SHORT_ID_BYTES] = _LONG_ID_MARK
    else:
        raw = np.array(ids, dtype="S16").view(np.uint8).reshape(n, 16)  # longer ids truncated: replaced below
        raw[:, SHORT_ID_BYTES] = np.minimum(lengths, 255)
        if long_ids.size:
            digests = b"".join([blake2b_128(ids[i]).digest() for i in long_ids.tolist()])
            raw[long_ids] = np.frombuffer(digests, np.uint8).reshape(-1, 16)
            raw[long_ids, SHORT_ID_BYTES] = _LONG_ID_MARK
    words = raw.view("<u8")
    high = mix64(words[:, 1])
    return np.stack([mix64(words[:, 0] ^ high), high], axis=1)
