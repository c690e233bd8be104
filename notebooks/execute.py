"""Run every notebook here top to bottom and store it with its outputs (what the repository page shows).

    .venv/bin/python notebooks/execute.py [name.ipynb ...]

Inputs are the notebooks' defaults: the family-contacts recipe's outputs in
``family_contacts_out/PF00072`` when present (``make family-contacts``), else ``demo_out`` (``make demo``).
One thread (OMP_NUM_THREADS=1), the venv's ``python3`` kernel, the working directory ``notebooks/``.
Refuses to store a notebook whose outputs hold an error or an absolute path of this machine.
"""

from __future__ import annotations

import base64
import io
import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
CELL_SECONDS = 600
PALETTE_ABOVE = 64 * 1024  # PNG outputs larger than this are stored with a 256-colour palette
# absolute paths of a machine (a home, a checkout, a temporary folder) must not reach a stored output
ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(tmp|home|root|work|Users|private|var/folders)/")


def leaks(nb) -> list[str]:
    """Problems in a notebook's stored outputs: error outputs and absolute paths."""
    problems = []
    for n, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                problems.append(f"cell {n}: error output {out.get('ename')}")
            text = out.get("text", "") + "".join(v for k, v in out.get("data", {}).items() if k.startswith("text/"))
            if ABSOLUTE_PATH.search(text):
                problems.append(f"cell {n}: absolute path in output: {ABSOLUTE_PATH.search(text).group(0)}")
    return problems


def shrink_png(data: str) -> str:
    """A base64 PNG re-encoded with a 256-colour palette (noisy attention maps as RGBA PNGs take ~2
    bytes a pixel; a colour map has at most 256 colours, so the figure looks the same)."""
    from PIL import Image

    raw = base64.b64decode(data)
    if len(raw) <= PALETTE_ABOVE:
        return data
    image = Image.open(io.BytesIO(raw)).convert("RGB").quantize(256)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii") if buffer.tell() < len(raw) else data


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    NotebookClient(
        nb, kernel_name="python3", timeout=CELL_SECONDS, resources={"metadata": {"path": str(HERE)}}
    ).execute()
    for cell in nb.cells:  # timings and run ids change every run: keep the diff to what a reader sees
        cell.get("metadata", {}).pop("execution", None)
        for out in cell.get("outputs", []):
            if "image/png" in out.get("data", {}):
                out["data"]["image/png"] = shrink_png(out["data"]["image/png"])
    problems = leaks(nb)
    if problems:
        raise SystemExit(f"{path.name}: not stored: " + "; ".join(problems))
    nbformat.write(nb, path)
    print(f"{path.name}: {sum(c.cell_type == 'code' for c in nb.cells)} cells run, {path.stat().st_size // 1024} KiB")


def main(argv: list[str]) -> None:
    names = argv or sorted(p.name for p in HERE.glob("*.ipynb"))
    for name in names:
        execute(HERE / name)


if __name__ == "__main__":
    main(sys.argv[1:])
