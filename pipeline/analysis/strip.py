"""Remove outputs and execution counts from notebooks before committing them:

    python -m pipeline.analysis.strip [notebooks/*.ipynb]
"""

from __future__ import annotations

import glob
import os
import sys

from pipeline.analysis.inputs import REPO_ROOT


def strip(path: str) -> bool:
    """Strip one notebook in place; True when it changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count, changed = [], None, True
        if "execution" in cell.metadata:
            del cell.metadata["execution"]
            changed = True
    if changed:
        nbformat.write(nb, path)
    return changed


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m pipeline.analysis.strip", description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", help="notebooks to strip in place (default: notebooks/*.ipynb)")
    args = parser.parse_args(argv if argv is not None else sys.argv[1:])
    paths = args.notebooks or sorted(glob.glob(os.path.join(REPO_ROOT, "notebooks", "*.ipynb")))
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    for p in paths:
        print(("stripped " if strip(p) else "clean    ") + p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
