"""The files that ship inside the package, found the same way in a checkout and in an installed wheel.

``conf/`` holds the Hydra configs and ``sample_data/`` the embedded sample that ``make demo`` and the
studies run on (``sample_data/README.md``: what each file is, its source and its license). In a
checkout both are symlinks to the repository's top-level ``conf/`` and ``data/``; ``pip install .``
copies them into the package (``[tool.setuptools.package-data]`` in pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
CONF = PACKAGE / "conf"
# resolved: in a checkout the commands the demo prints name data/..., not the symlink
SAMPLE_DATA = (PACKAGE / "sample_data").resolve()
STRUCTURES = SAMPLE_DATA / "structures" / "biopython"
