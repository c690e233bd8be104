"""An L x L sum built from row tiles (the layers' head-mean APC maps of ``reduce=all``, the contact
head's logits summed over layers): in memory up to ``max_bytes``, above it in a temporary chunked
HDF5 file, so a long sequence costs disk, not memory (read and written with explicit I/O: the
page cache holds it, the process's resident memory does not).

Tiles come as whole rows (:meth:`TileSum.add_rows`) or as the upper part of rows, from the
diagonal on (:meth:`TileSum.add_upper`, e.g. :meth:`LayerTiles.apc_upper`); with ``mirror`` the
part below the diagonal is added transposed, so a symmetric sum is whole and :meth:`TileSum.rows`
reads full rows; without it only the upper part (:meth:`TileSum.upper`) is kept, which is all that
pairs i < j need. The spill file lives in ``spill_dir`` (default: the temporary directory, $TMPDIR)
and is removed by :meth:`TileSum.close`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

log = logging.getLogger(__name__)

MAX_BYTES = 256 << 20  # in memory up to this size (float32: L <= 8192), spilled to disk above it
SPILL_DTYPE = np.float32


class TileSum:
    """An (L, L) sum, in memory or spilled (see the module docstring); a context manager."""

    def __init__(
        self,
        length: int,
        tile: int,
        mirror: bool = True,
        dtype=np.float32,
        max_bytes: int | None = None,
        spill_dir: str | Path | None = None,
    ):
        self.length, self.mirror = int(length), bool(mirror)
        self.dtype = np.dtype(dtype)
        self._tmp = self._h5 = self._mem = self._ds = None
        if self.length**2 * self.dtype.itemsize <= (MAX_BYTES if max_bytes is None else max_bytes):
            self._mem = np.zeros((self.length, self.length), dtype=self.dtype)
            return
        self.dtype = np.dtype(SPILL_DTYPE)
        self._tmp = tempfile.TemporaryDirectory(prefix="pp-tilesum-", dir=spill_dir)
        path = Path(self._tmp.name) / "sum.h5"
        c = max(1, min(int(tile), self.length))
        self._h5 = h5py.File(path, "w")
        self._ds = self._h5.create_dataset("sum", (self.length, self.length), self.dtype, chunks=(c, c), fillvalue=0)
        log.info("summing a %d x %d map on disk (%s, %.1f GB)", length, length, path, self.length**2 * 4 / 1e9)

    @property
    def spilled(self) -> bool:
        return self._ds is not None

    def _add(self, rows: slice, cols: slice, values: np.ndarray) -> None:
        if self._mem is not None:
            self._mem[rows, cols] += values
        else:
            self._ds[rows, cols] = self._ds[rows, cols] + values

    def add_rows(self, i0: int, i1: int, values: torch.Tensor | np.ndarray) -> None:
        """Add whole rows i0..i1 ((r, L))."""
        self._add(slice(i0, i1), slice(0, self.length), _array(values, self.dtype))

    def add_upper(self, i0: int, i1: int, values: torch.Tensor | np.ndarray) -> None:
        """Add rows i0..i1 from column i0 on ((r, L - i0)); with ``mirror`` also their part right
        of the tile, transposed, below it."""
        v = _array(values, self.dtype)
        self._add(slice(i0, i1), slice(i0, self.length), v)
        if self.mirror and i1 < self.length:
            self._add(slice(i1, self.length), slice(i0, i1), v[:, i1 - i0 :].T)

    def rows(self, i0: int, i1: int) -> np.ndarray:
        """(r, L): rows i0..i1 of the sum (whole when ``mirror``, else right of the diagonal tile only)."""
        return self._mem[i0:i1].copy() if self._mem is not None else self._ds[i0:i1, :]

    def upper(self, i0: int, i1: int) -> np.ndarray:
        """(r, L - i0): rows i0..i1 from column i0 on."""
        return self._mem[i0:i1, i0:].copy() if self._mem is not None else self._ds[i0:i1, i0:]

    def close(self) -> None:
        """Free the memory, remove the spill file."""
        self._mem = self._ds = None
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> TileSum:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _array(values: torch.Tensor | np.ndarray, dtype: np.dtype) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=dtype)
