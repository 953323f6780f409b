"""Make tests/data/pooling_reference.npz: page vectors and what colpali-engine 0.3.18's
HierarchicalTokenPooler makes of them (pool factors 2 and 3), for tests/embed/test_pooling.py.

colpali-engine cannot be installed beside this project's torch (it pins torch < 2.14 and
imports torchvision, ../shared/docs/FACTS.md), so its wheel is unpacked and the three files
the pooler needs are loaded from their paths, unchanged:
    colpali_engine/utils/torch_utils.py
    colpali_engine/compression/token_pooling/base_token_pooling.py
    colpali_engine/compression/token_pooling/hierarchical_token_pooling.py
Their parent packages are registered as empty packages so that the wheel's __init__ files
(which import the models, hence torchvision) are not run; nothing of the pooler is replaced.

    pip download --no-deps colpali-engine==0.3.18 -d /tmp/cp
    python -m zipfile -e /tmp/cp/colpali_engine-0.3.18-py3-none-any.whl /tmp/cp/ext
    PYTHONPATH=. python tests/data/make_pooling_reference.py /tmp/cp/ext

Made on 2026-12-03 with torch 2.13.0+cpu, scipy 1.17.1, numpy 2.4.6 (CPU).

Cases (inputs stored as float16, the values of a stored page; pooled in float32):
  random_96       96 seeded Gaussian unit vectors (no structure)
  structured_420  420 vectors in 24 noisy groups plus 60 exact copies of one vector (a blank
                  page area gives many near-equal tokens), shuffled
  tiny_model_page the tiny ColQwen2's real output (all real tokens, prompt included) for a
                  rendered sample page (pipeline.devtools), the vectors the embedding job pools
Stored per case and factor: the pooled vectors (float16) and colpali's cluster id per token.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import types

import numpy as np
import torch

COLPALI_VERSION = "0.3.18"
FACTORS = (2, 3)
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pooling_reference.npz")


def load_colpali_pooler(root: str):
    """HierarchicalTokenPooler from an unpacked colpali-engine wheel at ``root``."""
    for pkg in ("colpali_engine", "colpali_engine.utils", "colpali_engine.compression",
                "colpali_engine.compression.token_pooling"):
        module = types.ModuleType(pkg)
        module.__path__ = [os.path.join(root, *pkg.split("."))]
        sys.modules[pkg] = module
    for name in ("colpali_engine.utils.torch_utils",
                 "colpali_engine.compression.token_pooling.base_token_pooling",
                 "colpali_engine.compression.token_pooling.hierarchical_token_pooling"):
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, *name.split(".")) + ".py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    with open(os.path.join(root, f"colpali_engine-{COLPALI_VERSION}.dist-info", "METADATA")) as f:
        assert f"Version: {COLPALI_VERSION}\n" in f.read()
    return sys.modules["colpali_engine.compression.token_pooling.hierarchical_token_pooling"].HierarchicalTokenPooler


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def tiny_model_page() -> np.ndarray:
    from PIL import Image

    from pipeline.devtools.tiny import build_tiny_model
    from pipeline.embed.model import embed_pages, load_model

    with tempfile.TemporaryDirectory() as tmp:
        lm = load_model(build_tiny_model(os.path.join(tmp, "tiny")), device="cpu")
        page = Image.new("RGB", (280, 364), "white")
        rng = np.random.default_rng(3)
        pixels = np.asarray(page).copy()
        for row in range(40, 330, 18):  # lines of "text": dark strokes of random length
            pixels[row:row + 6, 30:30 + int(rng.integers(60, 220))] = 20
        return embed_pages(lm, [pixels])[0]


def cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20261203)
    random_96 = unit(rng.standard_normal((96, 128)))
    centers = unit(rng.standard_normal((24, 128)))
    groups = centers[rng.integers(0, 24, 360)] + rng.uniform(0.05, 0.6, (360, 1)) * rng.standard_normal((360, 128)) / 11
    blank = np.repeat(unit(rng.standard_normal((1, 128))), 60, axis=0)
    structured = unit(np.concatenate([groups, blank]))[rng.permutation(420)]
    return {"random_96": random_96, "structured_420": structured, "tiny_model_page": tiny_model_page()}


def main(root: str) -> None:
    pooler = load_colpali_pooler(root)()
    arrays = {}
    for name, vectors in cases().items():
        stored = np.asarray(vectors, dtype=np.float16)
        arrays[f"{name}/input"] = stored
        for f in FACTORS:
            out = pooler.pool_embeddings([torch.from_numpy(stored.astype(np.float32))], pool_factor=f,
                                         return_dict=True)
            pooled = out.pooled_embeddings[0].numpy()
            labels = np.full(len(stored), -1, dtype=np.int16)
            for cid, (idx,) in out.cluster_id_to_indices[0].items():
                labels[idx.numpy()] = cid
            assert (labels >= 0).all()
            arrays[f"{name}/f{f}/pooled"] = pooled.astype(np.float16)
            arrays[f"{name}/f{f}/labels"] = labels
            print(f"{name}: {len(stored)} vectors -> {len(pooled)} at factor {f}")
    arrays["colpali_version"] = np.array(COLPALI_VERSION)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
