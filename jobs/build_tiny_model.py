"""Write a tiny random ColQwen2 checkpoint (offline) for tests and the demo.

    python -m jobs.build_tiny_model --output models/tiny-colqwen2
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.build_tiny_model",
        description="Build a tiny random ColQwen2 (same architecture and processor as "
        "vidore/colqwen2-v1.0-hf, a few MB) without network access.",
    )
    parser.add_argument("--output", default="models/tiny-colqwen2", help="directory to write (default: %(default)s)")
    parser.add_argument("--max-visual-tokens", type=int, default=768, help="processor's token cap (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default: %(default)s)")
    args = parser.parse_args(argv)
    from pipeline.devtools.tiny import build_tiny_model

    path = build_tiny_model(args.output, args.max_visual_tokens, args.seed)
    print(f"tiny ColQwen2 written to {path}")
    return 0


if __name__ == "__main__":
    from pipeline import cli

    sys.exit(cli.guarded(main, prog="build_tiny_model"))
