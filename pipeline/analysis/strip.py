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
    paths = (argv if argv is not None else sys.argv[1:]) or sorted(glob.glob(os.path.join(REPO_ROOT, "notebooks", "*.ipynb")))
    for p in paths:
        print(("stripped " if strip(p) else "clean    ") + p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
