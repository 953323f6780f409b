"""BlockCompiler: an actor's first batches run eagerly while its blocks compile in the
background, then every pass is compiled; a failed compilation leaves it eager. Real tiny
ColQwen2 on CPU; the compile backend is a real Dynamo backend (``aot_eager``'s graphs) that
the test holds at a gate, so "while compiling" is a state the test controls, not a race."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from pipeline.embed import model as M


def batches(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):  # mixed sizes: padding, two image sizes in one batch
        out.append([rng.integers(0, 255, (28 * 6, 28 * 4, 3), dtype=np.uint8),
                    rng.integers(0, 255, (28 * 4, 28 * 4, 3), dtype=np.uint8),
                    rng.integers(0, 255, (28 * 6, 28 * 4, 3), dtype=np.uint8)])
    return out


class GatedBackend:
    """A Dynamo backend that compiles only when the gate opens, and counts the calls of
    what it compiled (the passes that ran compiled code)."""

    def __init__(self, fail=False):
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.fail = fail
        self.compiled_calls = 0
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.entered.set()
        assert self.gate.wait(120)
        if self.fail:
            raise RuntimeError("backend refused this graph")
        self.graphs += 1

        def run(*args):
            self.compiled_calls += 1
            return gm.forward(*args)

        return run


@pytest.fixture()
def fresh_lm(tiny_model):
    import torch._dynamo

    torch._dynamo.reset()  # each test compiles from nothing
    return M.load_model(tiny_model, device="cpu")


def test_batches_run_eagerly_while_the_blocks_compile_then_compiled(fresh_lm):
    lm = fresh_lm
    data = batches(5)
    want = [M.embed_pages(lm, b) for b in data]  # eager, no compiler
    backend = GatedBackend()
    lm.compiler = M.BlockCompiler(M.compiled_blocks(lm.model), background=True, backend=backend)
    done = []
    # the first batch starts the compilation and does not wait for it
    first = M.embed_pages(lm, data[0], on_compiled=done.append)
    assert backend.entered.wait(60) and not lm.compiler.ready
    during = [first] + [M.embed_pages(lm, b) for b in data[1:3]]
    assert lm.compiler.eager_passes == 3 and backend.compiled_calls == 0
    for got, exp in zip(during, want):  # eager passes: the eager embeddings, bit for bit
        for g, e in zip(got, exp):
            np.testing.assert_array_equal(g, e)
    backend.gate.set()
    assert lm.compiler.wait(120) and lm.compiler.ready and lm.compiler.error is None
    assert done == [lm.compiler] and lm.compiler.seconds > 0
    calls = backend.compiled_calls
    assert calls > 0  # the background pass ran the compiled blocks
    after = [M.embed_pages(lm, b) for b in data[3:]]
    assert backend.compiled_calls > calls and lm.compiler.eager_passes == 3  # compiled from now on
    for got, exp in zip(after, want[3:]):
        for g, e in zip(got, exp):
            np.testing.assert_allclose(g, e, atol=1e-5)
    assert backend.graphs >= 2  # a vision block and a text layer, reused by every block


def test_a_failed_background_compilation_leaves_the_actor_eager_and_says_so(fresh_lm, caplog):
    lm = fresh_lm
    data = batches(3, seed=1)
    want = [M.embed_pages(lm, b) for b in data]
    backend = GatedBackend(fail=True)
    lm.compiler = M.BlockCompiler(M.compiled_blocks(lm.model), background=True, backend=backend)
    backend.gate.set()
    with caplog.at_level(logging.WARNING, logger="pipeline.embed.model"):
        got = [M.embed_pages(lm, data[0])]
        assert lm.compiler.wait(120)
        got += [M.embed_pages(lm, b) for b in data[1:]]
    assert lm.compiler.error is not None and not lm.compiler.ready
    assert "stays eager" in caplog.text and "--compile off" in caplog.text
    assert lm.compiler.eager_passes == 3
    for g_batch, e_batch in zip(got, want):
        for g, e in zip(g_batch, e_batch):
            np.testing.assert_array_equal(g, e)


def test_wait_for_compile_compiles_in_the_first_batch(fresh_lm):
    lm = fresh_lm
    data = batches(2, seed=2)
    want = [M.embed_pages(lm, b) for b in data]
    backend = GatedBackend()
    backend.gate.set()
    lm.compiler = M.BlockCompiler(M.compiled_blocks(lm.model), background=False, backend=backend)
    assert lm.compiler.ready and lm.compiler.wait(0)
    got = M.embed_pages(lm, data[0])
    assert backend.compiled_calls > 0 and lm.compiler.eager_passes == 0
    for g, e in zip(got, want[0]):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_the_job_compiles_in_the_background_unless_told_to_wait():
    from jobs import embed_corpus
    from pipeline.config import embed_config
    from pipeline.embed.flow import embedder_arguments

    def kwargs(argv):
        args = embed_corpus.build_parser().parse_args(["--input", "a", "--output", "b", *argv])
        options = {k: v for k, v in vars(args).items() if k not in ("config", "verbose", "debug")}
        return embedder_arguments(embed_config(options, None), "cuda", 2)

    assert kwargs([])["compile_model"] and kwargs([])["compile_in_background"]
    assert kwargs(["--wait-for-compile"])["compile_in_background"] is False
    assert "--wait-for-compile" in embed_corpus.build_parser().format_help()
