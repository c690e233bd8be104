"""The files that ship inside the package, found the same way in a checkout and in an installed wheel.

``conf/`` holds the Hydra configs and ``sample_data/`` the embedded sample that ``make demo`` and the
studies run on (``sample_data/README.md``: what each file is, its source and its license). In a
checkout both are symlinks to the repository's top-level ``conf/`` and ``data/``; ``pip install .``
copies them into the package (``[tool.setuptools.package-data]`` in pyproject.toml).

The larger real data sets (pfam40, kortemme40, the Swiss-Prot and UniProt sets) do not ship:
:func:`shared_data` finds their folder, for the library, the benchmarks and the tests alike.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CONF = PACKAGE / "conf"
# resolved: in a checkout the commands the demo prints name data/..., not the symlink
SAMPLE_DATA = (PACKAGE / "sample_data").resolve()
STRUCTURES = SAMPLE_DATA / "structures" / "biopython"

# the package folder of a checkout sits beside pyproject.toml; an installed one has no checkout
CHECKOUT = PACKAGE.parent if (PACKAGE.parent / "pyproject.toml").is_file() else None
SHARED_DATA_VAR = "PP_SHARED_DATA"


def shared_data() -> Path | None:
    """The folder of the larger real data sets: ``$PP_SHARED_DATA`` when set, else ``../shared/data``
    beside a checkout; ``None`` for an installed package without the variable. Read at each call
    and not checked here: a caller names what it needs when it is missing."""
    if value := os.environ.get(SHARED_DATA_VAR):
        return Path(value)
    return None if CHECKOUT is None else CHECKOUT.parent / "shared" / "data"
