"""The gallery: every figure of every notebook as a PNG, for review by eye at projector size.

    make figures                      # or: .venv/bin/python tools/figures.py [OUT]

Each notebook runs top to bottom on a fresh kernel (as the tests run them); each image it
displays is written to OUT (default `build/figures/`) as `<notebook>-c<cell>-<n>.png`, and an
index lists them with the first line of the cell that drew them. Widgets draw inside their
own output areas, which a headless run does not capture: the widget tests render those.
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def render(notebook: Path, out: Path) -> list[str]:
    """Run one notebook; write its PNG outputs; return the index lines."""
    nb: Any = nbformat.read(notebook, as_version=4)  # type: ignore[no-untyped-call]
    NotebookClient(nb, timeout=300, kernel_name="python3").execute(cwd=str(notebook.parent))
    lines = []
    for number, cell in enumerate(nb.cells):
        pngs = [
            o["data"]["image/png"]
            for o in cell.get("outputs", [])
            if "image/png" in o.get("data", {})
        ]
        for n, png in enumerate(pngs):
            name = f"{notebook.stem}-c{number:02d}-{n}.png"
            (out / name).write_bytes(base64.b64decode(png))
            lines.append(f"{name}  {cell.source.splitlines()[0] if cell.source else ''}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=ROOT / "build" / "figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    index = []
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        index += render(notebook, args.out)
        print(f"{notebook.stem}: done", file=sys.stderr)
    (args.out / "index.txt").write_text("\n".join(index) + "\n")
    print(f"{len(index)} figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
