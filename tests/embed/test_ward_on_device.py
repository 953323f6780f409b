"""--pool-factor's Ward merge loop on the device (pipeline/embed/ward_triton.py): the Triton
kernel, run by Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is imported: a
subprocess, as tests/score does), against scipy's own loop on the same distances, bit for bit,
and the pooled pages of the model against the host path. On a GPU the same check is
benchmarks/check_pooling_gpu.py."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton not installed (pip install -e .[dev])")


def _interpret(code: str, *args: str, env: dict | None = None) -> str:
    path = os.pathsep.join([ROOT, f"{ROOT}/tests", os.environ.get("PYTHONPATH", "")])
    full = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path, **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code, *args], env=full, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and "OK" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc.stdout


@needs_triton
def test_device_merges_equal_scipys_loop_bit_for_bit_ties_included():
    """Random points, points on a small integer grid (many equal distances), repeated points
    (zero distances), and a page's real pooling distances (755 vectors of 128): the linkage
    matrix from the kernel's merges equals scipy's ``linkage(method="ward")`` exactly, and so do
    the labels; pages of one vector take no merge; a page with a NaN distance is flagged and
    raises scipy's error while the others in its batch are right."""
    code = r"""
import numpy as np, torch
from scipy.cluster.hierarchy import linkage, fcluster
from scipy.spatial.distance import pdist
from pipeline.embed import ward_triton as W
from pipeline.embed.pooling import condensed_distances, device_labels
from pipeline.embed.ward import labels_from_distances
rng = np.random.default_rng(0)
def points(n, kind):
    if kind == "random": return rng.standard_normal((n, 8))
    if kind == "grid": return rng.integers(0, 3, size=(n, 2)).astype(float)
    return np.repeat(rng.standard_normal((n, 4)), 3, axis=0)[:n]
lengths = [2, 1, 3, 5, 17, 40, 0, 64, 33]
for kind in ("random", "grid", "repeated"):
    conds = [pdist(points(n, kind)) for n in lengths if n > 1]
    made, flags = W.ward_merges(torch.from_numpy(np.concatenate(conds)), lengths)
    made = made.numpy()
    assert flags.tolist() == [0] * len(conds)
    start = 0
    for n, c in zip([n for n in lengths if n > 1], conds):
        z = W.linkage_from_merges(made[start:start + n - 1], n)
        assert np.array_equal(z, linkage(c, method="ward")), (kind, n)
        # the vectorised naming of clusters is scipy's union-find
        order = np.argsort(made[start:start + n - 1, 2], kind="mergesort")
        assert np.array_equal(z, W._label_by_union_find(made[start:start + n - 1][order], n)), (kind, n)
        start += n - 1
    labels = device_labels(made, flags.numpy(), lengths, 3)
    want = [labels_from_distances(c, n, 3) for n, c in zip([n for n in lengths if n > 1], conds)]
    assert [l is None for l in labels] == [n <= 1 for n in lengths]
    for got, exp in zip([l for l in labels if l is not None], want):
        assert np.array_equal(got, exp)
# small tie-heavy configurations in one batch, among them one where keeping the chain's previous
# element on a tie (scipy's `<`, not `<=`) changes the tree
small = [np.array([[0, 0], [2, 0], [2, 1], [1, 2], [2, 1], [1, 2], [1, 1], [2, 2]], dtype=float)]
small += [rng.integers(0, 3, size=(int(rng.integers(3, 9)), int(rng.integers(1, 3)))).astype(float) for _ in range(40)]
conds = [pdist(p) for p in small]
made = W.ward_merges(torch.from_numpy(np.concatenate(conds)), [len(p) for p in small])[0].numpy()
start = 0
for p, c in zip(small, conds):
    n = len(p)
    assert np.array_equal(W.linkage_from_merges(made[start:start + n - 1], n), linkage(c, method="ward")), p.tolist()
    start += n - 1
# a real page's pooling distances (1 - E E^T of unit vectors in bf16, then pdist), as the actor has them
x = torch.nn.functional.normalize(torch.randn(755, 128, generator=torch.Generator().manual_seed(3)), dim=-1)
c = condensed_distances(x.to(torch.bfloat16))
bad = condensed_distances(x[:40]); bad[7] = float("nan")
made, flags = W.ward_merges(torch.cat([c, bad]), [755, 40])
assert flags.tolist() == [0, 1]
assert np.array_equal(W.linkage_from_merges(made[:754].numpy(), 755), linkage(c.numpy(), method="ward"))
try:
    device_labels(made.numpy(), flags.numpy(), [755, 40], 3)
    raise SystemExit("a NaN distance was not refused")
except ValueError as exc:
    assert "finite" in str(exc)
print("OK")
"""
    _interpret(code)


@needs_triton
def test_tiled_distances_equal_scipys_pdist_bit_for_bit():
    """The device path's distances (pipeline.embed.ward_triton.pooling_distances: 1 - E E^T in
    float32, then a tiled kernel summing over the columns in order) equal scipy's ``pdist`` of
    the same matrix, as colpali's ``linkage(D, metric="euclidean")`` computes it, bit for bit:
    rows of 0, 1 and 2 vectors, a row longer than a tile, tiles of 16 and the default."""
    code = r"""
import numpy as np, torch
from scipy.spatial.distance import pdist
from pipeline.embed import ward_triton as W
from pipeline.embed.pooling import condensed_distances
g = torch.Generator().manual_seed(0)
lengths = [5, 1, 70, 0, 2, 33]
flat = torch.nn.functional.normalize(torch.randn(sum(lengths), 128, generator=g), dim=-1).to(torch.bfloat16)
want, start = [], 0
for n in lengths:
    if n > 1:
        x = flat[start:start + n].float()
        want.append(pdist((1 - x @ x.T).double().numpy()))
        assert np.array_equal(want[-1], condensed_distances(flat[start:start + n]).numpy())
    start += n
want = np.concatenate(want)
for config in ((16, 4), None):
    got = W.pooling_distances(flat, lengths, config=config)
    assert got.dtype == torch.float64 and got.shape == want.shape
    assert np.array_equal(got.numpy(), want), config
# the pages' matrices a page or two at a time (a small budget): the same distances
W.SIMS_BUDGET_BYTES = 8 * 40 * 40
assert np.array_equal(W.pooling_distances(flat, lengths, config=(16, 4)).numpy(), want)
assert W.pooling_distances(flat[:1], [1]).numel() == 0
print("OK")
"""
    _interpret(code)


@needs_triton
def test_device_merges_pool_as_colpali_engine_0_3_18():
    """``cluster_labels`` / ``pool_embeddings`` with the merge loop on the device give
    colpali's labels and pooled vectors (tests/data/pooling_reference.npz)."""
    code = r"""
import numpy as np, torch
from pipeline.embed import pooling
assert pooling.ward_on_device("cpu")
ref = np.load("tests/data/pooling_reference.npz")
from pipeline.embed.ward_triton import labels_from_merges, ward_merges
for case in ("random_96", "structured_420", "tiny_model_page"):
    x = torch.from_numpy(ref[f"{case}/input"].astype(np.float32))
    n = len(x)
    made = ward_merges(pooling.condensed_distances(x), [n])[0].numpy()  # one loop serves both factors
    for f in (2, 3):
        labels = labels_from_merges(made, n, f)
        assert np.array_equal(labels, ref[f"{case}/f{f}/labels"]), (case, f)
        ours = pooling.pool_by_labels(x, labels).numpy()
        np.testing.assert_allclose(ours, ref[f"{case}/f{f}/pooled"].astype(np.float32), rtol=0, atol=2.5e-4)
# and through the public functions, which take the device path here
x = torch.from_numpy(ref["random_96/input"].astype(np.float32))
assert np.array_equal(pooling.cluster_labels(x, 3), ref["random_96/f3/labels"])
np.testing.assert_allclose(pooling.pool_embeddings(x, 3).numpy(), ref["random_96/f3/pooled"].astype(np.float32),
                           rtol=0, atol=2.5e-4)
print("OK")
"""
    _interpret(code, env={"VDR_WARD_ON_DEVICE": "1"})


@needs_triton
def test_the_model_pools_the_same_pages_with_the_merge_loop_on_the_device(tiny_model):
    """embed_pages with ``--pool-factor`` 3 (the actor's path: PendingEmbeddings) gives the same
    float16 vectors with the merge loop on the device as on the host, bit for bit.

    The device side runs first, so it holds the process's first forward pass. Until
    :func:`pipeline.embed.model.warm_up_mkl_vml` (called by ``load_model``) that pass could
    differ under CPU load (5 in 110 runs beside two busy loops; CI failed once; it was marked
    xfail): MKL's VML picked its ``cos`` kernel at that first call, made on two threads at
    once, and one thread's half of the vision rotary embedding came out with a low-accuracy
    kernel (pytorch/pytorch#188792); same labels on both sides, the vectors off by float16
    ulps (4.8e-7, 1.2e-4, 7.6e-6)."""
    code = r"""
import os, sys, numpy as np, torch
from pipeline.embed.model import ForwardTimer, embed_pages, load_model
lm = load_model(sys.argv[1], device="cpu")
rng = np.random.default_rng(0)
pages = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((112, 168), (224, 140), (56, 56))]
runs = {}
for where in ("1", "0"):
    os.environ["VDR_WARD_ON_DEVICE"] = where
    timer = ForwardTimer("cpu")
    runs[where] = embed_pages(lm, pages, timer=timer, pool_factor=3, out_dtype=torch.float16)
    assert timer.pool_host_s["merge"] > 0
for a, b in zip(runs["1"], runs["0"]):
    assert a.dtype == np.float16 and a.shape == b.shape
    np.testing.assert_array_equal(a, b)
print("OK")
"""
    _interpret(code, tiny_model)


def test_load_model_warms_up_mkls_vml_before_the_first_forward(tiny_model, monkeypatch):
    """The guard of the test above: ``load_model`` runs MKL's VML functions once on one
    element before the weights load (so before any forward can run them on several threads:
    their first call picks their kernel, racily; pytorch/pytorch#188792), and the warm-up calls
    each of them on one CPU element (below ATen's grain: one thread), in float32 and float64."""
    import torch

    from pipeline.embed import model

    calls = []
    fetch = model.fetch_model

    def fetch_after_warm_up(*args, **kwargs):
        assert calls == [1], "the warm-up must come before the weights load"
        return fetch(*args, **kwargs)

    monkeypatch.setattr(model, "warm_up_mkl_vml", lambda: calls.append(1))
    monkeypatch.setattr(model, "fetch_model", fetch_after_warm_up)
    model.load_model(tiny_model, device="cpu")
    assert calls == [1]
    monkeypatch.undo()
    if not torch.backends.mkl.is_available():
        pytest.skip("torch built without MKL: nothing to warm up")
    seen = []
    for op in model._MKL_VML_OPS:
        real = getattr(torch, op)

        def spy(x, *a, _op=op, _real=real, **k):
            seen.append((_op, x.dtype, x.device.type, x.numel(), x.is_contiguous()))
            return _real(x, *a, **k)

        monkeypatch.setattr(torch, op, spy)
    monkeypatch.setattr(model, "_MKL_VML_WARM", False)
    with torch.device("meta"):  # a default device elsewhere must not move the warm-up off the CPU
        model.warm_up_mkl_vml()
    assert model._MKL_VML_WARM
    want = {(op, dt, "cpu", 1, True) for op in model._MKL_VML_OPS for dt in (torch.float32, torch.float64)}
    assert set(seen) == want and len(seen) == len(want)
    model.warm_up_mkl_vml()  # once per process
    assert len(seen) == len(want)


def test_a_merge_made_after_a_lower_one_it_depends_on_is_named_by_the_union_find():
    """Rounding in the update can leave a merge lower than a merge it depends on; the sorted
    order then breaks the rule the vectorised naming relies on, and the union-find (scipy's
    ``label``) names the clusters instead: a valid linkage matrix, scipy's answer."""
    from scipy.cluster.hierarchy import is_valid_linkage

    from pipeline.embed.ward_triton import _label_by_union_find, linkage_from_merges

    # 4 points: (0, 1) at 1.0, then (1, 2) at 0.9 (uses the cluster in slot 1), then (2, 3) at 2.0
    made = np.array([[0, 1, 1.0, 2], [1, 2, 0.9, 3], [2, 3, 2.0, 4]], dtype=np.float64)
    z = linkage_from_merges(made, 4)
    order = np.argsort(made[:, 2], kind="mergesort")
    np.testing.assert_array_equal(z, _label_by_union_find(made[order], 4))
    assert is_valid_linkage(z)
    # sorted, (1, 2) at 0.9 comes first and makes node 4; the union-find then finds point 1 in
    # node 4, so the merge at 1.0 joins point 0 and node 4
    assert z[1, 0] == 0 and z[1, 1] == 4


@pytest.mark.parametrize("raw,device,want", [("", "cpu", False), ("auto", "cpu", False), ("0", "cuda:0", False),
                                             (" OFF ", "cuda", False)])
def test_where_the_merge_loop_runs_by_default_and_when_told(monkeypatch, raw, device, want):
    from pipeline.embed.pooling import ward_on_device

    monkeypatch.setenv("VDR_WARD_ON_DEVICE", raw)
    assert ward_on_device(device) is want


@needs_triton
def test_the_merge_loop_on_the_device_when_told_and_a_misspelt_switch_refused(monkeypatch):
    from pipeline.embed.pooling import ward_on_device

    monkeypatch.setenv("VDR_WARD_ON_DEVICE", "1")
    assert ward_on_device("cuda:0") is True
    # a CPU actor (the switch reaches every worker): on the host, since Triton has no CPU
    # driver (review: it raised "0 active drivers" at the first batch), unless interpreted
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert ward_on_device("cpu") is False
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ward_on_device("cpu") is True
    monkeypatch.setenv("VDR_WARD_ON_DEVICE", "gpu")
    with pytest.raises(ValueError, match="VDR_WARD_ON_DEVICE"):
        ward_on_device("cuda")


def _in_slots(z: np.ndarray, n: int) -> np.ndarray:
    """scipy's linkage matrix as the chain's merges: clusters named by their slot (their largest
    point: the chain keeps a merge in the larger slot)."""
    slot = list(range(n)) + [0] * (n - 1)
    out = z.copy()
    for i, (a, b) in enumerate(z[:, :2].astype(int)):
        out[i, 0], out[i, 1] = sorted((slot[a], slot[b]))
        slot[n + i] = max(slot[a], slot[b])
    return out


def test_merges_in_any_order_the_chain_could_make_them_give_scipys_linkage():
    """The chain makes merges in its own order, not by height. Any order in which each merge
    comes after the merges of its two clusters, sorted and named on the host, gives scipy's
    linkage matrix (distinct heights: 790 points, a real page's size; no interpreter needed)."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import pdist

    from pipeline.embed.ward_triton import labels_from_merges, linkage_from_merges

    rng = np.random.default_rng(4)
    n = 790
    z = linkage(pdist(rng.standard_normal((n, 16))), method="ward")
    slots = _in_slots(z, n)
    # a random order that keeps each merge after the ones that made its clusters
    children = {n + i: [int(a), int(b)] for i, (a, b) in enumerate(z[:, :2])}
    ready = [i for i in range(n - 1) if all(c < n for c in children[n + i])]
    done, order = set(), []
    while ready:
        i = ready.pop(int(rng.integers(len(ready))))
        order.append(i)
        done.add(n + i)
        parent = next((p for p, cs in children.items() if n + i in cs), None)
        if parent is not None and all(c < n or c in done for c in children[parent]):
            ready.append(parent - n)
    assert sorted(order) == list(range(n - 1)) and order != list(range(n - 1))
    np.testing.assert_array_equal(linkage_from_merges(slots[order], n), z)
    from scipy.cluster.hierarchy import fcluster

    np.testing.assert_array_equal(labels_from_merges(slots[order], n, 3),
                                  fcluster(z, t=n // 3, criterion="maxclust") - 1)


def test_pooling_kernels_that_fail_to_queue_fall_back_to_the_host_once(tiny_model, monkeypatch, caplog):
    """A GPU whose Triton cannot compile the kernels (or any error queueing them) loses no page:
    the batch pools on the host with the same labels, one warning says why, and later batches
    do not try the kernels again."""
    import logging

    import torch

    from pipeline.embed import pooling, ward_triton
    from pipeline.embed.model import embed_pages, load_model

    lm = load_model(tiny_model, device="cpu")
    rng = np.random.default_rng(1)
    pages = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((112, 168), (56, 84))]
    monkeypatch.setenv("VDR_WARD_ON_DEVICE", "0")
    want = embed_pages(lm, pages, pool_factor=3, out_dtype=torch.float16)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("PTXASError: ptxas fatal: unknown target")

    monkeypatch.setattr(ward_triton, "pooling_distances", broken)
    monkeypatch.setattr(pooling, "_DEVICE_POOLING_ERRORS", [])
    monkeypatch.setenv("VDR_WARD_ON_DEVICE", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets ward_on_device say yes on this CPU
    with caplog.at_level(logging.WARNING, logger="pipeline.embed.pooling"):
        for _ in range(2):
            got = embed_pages(lm, pages, pool_factor=3, out_dtype=torch.float16)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
    assert len(calls) == 1
    warnings = [r for r in caplog.records if "pooling kernels failed" in r.getMessage()]
    assert len(warnings) == 1 and "ptxas" in warnings[0].getMessage()
    assert not pooling.ward_on_device("cuda:0")
