"""One command that shows the corpus job end to end, offline, on this machine:
builds the tiny random ColQwen2, writes a sample corpus, embeds it with a local Ray.

    python -m jobs.demo [--workdir demo]
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="demo", help="where model, corpus and outputs go (default: %(default)s)")
    args = p.parse_args(argv)
    from pipeline.devtools.samples import make_sample_corpus
    from pipeline.devtools.tiny import build_tiny_model
    from jobs import embed_corpus

    model = os.path.join(args.workdir, "tiny-colqwen2")
    corpus = os.path.join(args.workdir, "corpus")
    output = os.path.join(args.workdir, "embeddings")
    if not os.path.exists(os.path.join(model, "config.json")):
        build_tiny_model(model)
    make_sample_corpus(corpus)
    rc = embed_corpus.main(["--input", corpus, "--output", output, "--model", model, "--batch-size", "4"])
    if rc == 0:
        print(f"\nread it back:  python -c \"import pyarrow.parquet as pq; "
              f"print(pq.read_table('{output}/pages').select(['page_id','n_vectors']))\"")
    return rc


if __name__ == "__main__":
    from pipeline import cli

    sys.exit(cli.guarded(main, prog="demo"))
