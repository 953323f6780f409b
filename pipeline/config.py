"""Each job's options: frozen dataclasses validated up front, with errors that say what to change.

Imports neither torch nor Ray: parsing a flag must not load CUDA libraries.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

DEFAULT_MODEL = "vidore/colqwen2-v1.0-hf"
DEFAULT_MAX_VISUAL_TOKENS = 768
# Always computed by the evaluation; more can be added by name.
DEFAULT_MEASURES: tuple[str, ...] = ("nDCG@5", "nDCG@10", "R@10", "RR@10", "AP")


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    input: str
    output: str
    model: str = DEFAULT_MODEL
    max_visual_tokens: int = DEFAULT_MAX_VISUAL_TOKENS
    endpoint_url: str | None = None
    # GPU actor pool
    batch_size: int = 16
    min_actors: int | None = None  # None: every GPU the cluster has now, or can add when it has none yet (1 on CPU)
    max_actors: int | None = None  # None: one per GPU the cluster has or can grow to (1 on CPU)
    gpus_per_actor: float | None = None  # None: 1 when the model runs on GPUs, else 0 (CPU)
    device: str = "auto"  # auto: GPUs if the cluster has them now or its autoscaler can add them
    dtype: str = "auto"
    attn_implementation: str = "auto"
    compile: str = "auto"  # torch.compile the model's blocks; auto: on GPU; plain: without precompiled blocks
    # a shared place (s3://, gs://, a shared path) for compiled artefacts, read by new nodes
    # before they compile; each node also keeps them in $VDR_COMPILE_CACHE (pipeline/embed/compile_cache.py)
    compile_cache: str | None = None
    # hierarchical token pooling of each page's vectors in the actor (pipeline/embed/pooling.py);
    # 1 = off. Queries are never pooled.
    pool_factor: int = 1
    # "default": every matmul in --dtype; "fp8": the large ones in FP8 (pipeline/embed/fp8.py)
    precision: str = "default"
    # the vision attention's kernel: auto = FlashAttention 4 where installed on a Hopper GPU, else
    # SDPA (auto also needs a Qwen2-VL model in bf16/fp16 without FlashAttention 2); fa4 insists;
    # sdpa never uses it (pipeline/embed/vision_kernels.py). Not given (flag or --config),
    # $VDR_VISION_ATTENTION decides, on the driver (embed_config): the actors get the resolved
    # value (their arguments name kept actors, --keep-embedders)
    vision_attention: str = "auto"
    # batches each actor holds at once: 2 = one on the GPU while the host prepares the next
    # (threads of one actor, device work queued one batch at a time; pipeline/embed/model.py);
    # None: 2 when the model runs on GPUs, else 1 (resolve_batches_in_flight)
    batches_in_flight: int | None = None
    # --keep-embedders SECONDS: the model actors outlive the job (Ray detached actors, named by
    # model, settings and code) for the next job, each ending after SECONDS without a call; 0: off
    keep_embedders: float = 0.0
    # CPU rendering
    docs_per_render_task: int = 4
    render_timeout_s: float = 120.0
    max_dpi: float = 300.0
    max_longest_side_px: int = 8192
    max_image_pixels: int = 178_956_970
    max_file_bytes: int = 1 << 30
    max_pages_per_doc: int = 0
    all_files: bool = False  # also try files without a PDF/image extension
    # output
    rows_per_file: int = 256
    retry_errors: bool = False  # delete OUT/errors first, so failed documents are tried again
    # OUT holds vectors of another model, token budget, dtype or prompt: start the next
    # generation (OUT/generations/<n>) instead of refusing the run
    force_new_config: bool = False
    ray_address: str | None = None
    # object storage: each request waits at most this long for the endpoint (connect, and
    # between bytes), and is tried this many times by the client library (SDK backoff)
    storage_timeout_s: float = float(os.environ.get("PIPELINE_STORAGE_TIMEOUT_S", "20"))
    storage_attempts: int = int(os.environ.get("PIPELINE_STORAGE_ATTEMPTS", "6"))
    # --preflight: list and render without the model, report counts, CPU and GPU-hours
    preflight: bool = False
    gpu_pages_per_second: float | None = None  # None: the measured H200 rate, scaled by tokens

    def __post_init__(self):
        problems = []
        if self.gpu_pages_per_second is not None and not self.gpu_pages_per_second > 0:
            problems.append(f"--gpu-pages-per-second must be > 0, got {self.gpu_pages_per_second}")
        if not self.input:
            problems.append("--input is required (a local folder, file, s3:// or gs:// prefix; or `input:` in --config)")
        if not self.output:
            problems.append("--output is required (a local folder, s3:// or gs:// prefix; or `output:` in --config)")
        if self.input and self.output and same_place(self.input, self.output):
            problems.append("--output must differ from --input (outputs would be read back as documents)")
        if self.max_visual_tokens < 4:
            problems.append(f"--max-visual-tokens must be >= 4 (ColQwen2 was trained with 768), got {self.max_visual_tokens}")
        if not isinstance(self.pool_factor, int) or self.pool_factor < 1:
            problems.append(f"--pool-factor must be an integer >= 1 (1 = no pooling), got {self.pool_factor!r}")
        if self.precision not in ("default", "fp8"):
            problems.append(f"--precision must be default or fp8, got {self.precision!r}")
        if self.vision_attention not in ("auto", "sdpa", "fa4"):
            problems.append(f"--vision-attention must be auto, sdpa or fa4, got {self.vision_attention!r}")
        if self.vision_attention == "fa4" and (self.device == "cpu" or self.gpus_per_actor == 0):
            problems.append("--vision-attention fa4 runs on GPUs: drop --device cpu / --gpus-per-actor 0, "
                            "or use --vision-attention auto or sdpa")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.batches_in_flight not in (None, 1, 2):
            problems.append(f"--batches-in-flight must be 1 or 2, got {self.batches_in_flight!r}")
        if isinstance(self.keep_embedders, bool) or not isinstance(self.keep_embedders, (int, float)) \
                or not math.isfinite(self.keep_embedders) or self.keep_embedders < 0:
            problems.append(f"--keep-embedders must be a number of seconds >= 0 (0: off), got {self.keep_embedders!r}")
        if self.min_actors is not None and self.min_actors < 1:
            problems.append(f"--min-actors must be >= 1, got {self.min_actors}")
        if self.max_actors is not None and self.min_actors is not None and self.max_actors < self.min_actors:
            problems.append(f"--max-actors ({self.max_actors}) must be >= --min-actors ({self.min_actors})")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            problems.append("--gpus-per-actor must be >= 0 (0 runs the model on CPU)")
        if self.device not in ("auto", "cuda", "cpu"):
            problems.append(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.device == "cpu" and self.gpus_per_actor:
            problems.append("--device cpu runs the model on CPU actors: drop --gpus-per-actor")
        if self.compile not in ("auto", "on", "off", "plain"):
            problems.append(f"--compile must be auto, on, off or plain, got {self.compile!r}")
        if self.render_timeout_s <= 0:
            problems.append("--render-timeout-s must be positive")
        if self.rows_per_file < 1:
            problems.append("--rows-per-file must be >= 1")
        if self.docs_per_render_task < 1:
            problems.append("--docs-per-render-task must be >= 1")
        if not self.storage_timeout_s > 0:
            problems.append(f"--storage-timeout-s must be positive, got {self.storage_timeout_s}")
        if self.storage_attempts < 1:
            problems.append(f"--storage-attempts must be >= 1, got {self.storage_attempts}")
        if problems:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))

    def embedder_settings(self, device: str, batches_in_flight: int) -> dict:
        """The model actors' constructor arguments (:class:`pipeline.embed.stages.PageEmbedder`)
        for a job whose actors run on ``device``: ``--compile`` on and auto (on GPUs) compile the
        blocks ahead of time (precompiled), plain with torch.compile per block, off not at all."""
        return {"model": self.model, "device": device, "dtype": self.dtype,
                "attn_implementation": self.attn_implementation, "endpoint_url": self.endpoint_url,
                "compile_model": self.compile in ("on", "plain") or (self.compile == "auto" and device == "cuda"),
                "precompiled": self.compile != "plain",
                "pool_factor": self.pool_factor, "compile_cache": self.compile_cache,
                "precision": self.precision, "batches_in_flight": batches_in_flight,
                "vision_attention": self.vision_attention}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


_FLAG_ON, _FLAG_OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def env_flag(name: str, default: bool) -> bool:
    """An on/off switch from the environment (``VDR_PRECOMPILE``, ``VDR_LINEAR_PATCH_EMBED``,
    ``VDR_PERSISTENT_NORMS``): 1/true/on/yes or 0/false/off/no, any case; unset or empty: the
    default. Another value is refused, so a misspelt switch is not silently ignored."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value not in _FLAG_ON + _FLAG_OFF:
        raise ValueError(f"{name}={value!r}: use 1 or 0 (on/off, true/false, yes/no)")
    return value in _FLAG_ON


def absolute_local(values: dict, keys: tuple[str, ...], only_existing: tuple[str, ...] = ()) -> dict:
    """Local paths made absolute: Ray workers (and a job's copy of its working dir) run
    in other directories than the driver. URIs (``s3://``...) are left alone; keys in
    ``only_existing`` are changed only when the path exists (a model may be a hub name)."""
    for key in keys:
        value = values.get(key)
        if isinstance(value, str) and value and "://" not in value and (key not in only_existing or os.path.exists(value)):
            values[key] = os.path.abspath(value)
    return values


# Options that existed once: a run that still asks for one is told why it is gone.
REMOVED_OPTIONS = {
    "load_in_4bit": "bitsandbytes NF4 was no faster than bf16 on an H200 (43.0 vs 42.7 pages/s eager; the compiled "
                    "bf16 default runs 61.1) and moved page vectors to a mean cosine of 0.83 against bf16 "
                    "(benchmarks/RESULTS.md, 2026-12-03). Drop the flag: the model's bf16 weights need about 4 GiB.",
}


def embed_config(options: Mapping[str, Any], yaml_path: str | None = None) -> EmbedConfig:
    """Options from a YAML file (optional), overridden by ``options`` (None values ignored)."""
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update({k: v for k, v in options.items() if v is not None})
    absolute_local(values, ("input", "output", "model"), only_existing=("model",))
    for key, why in REMOVED_OPTIONS.items():
        if values.pop(key, None):
            raise ValueError(f"--{key.replace('_', '-')} was removed: {why}")
    unknown = sorted(set(values) - set(EmbedConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown option(s) in {yaml_path}: {', '.join(unknown)}")
    for key in ("input", "output"):  # missing: EmbedConfig says which flag is required, not a TypeError
        values.setdefault(key, None)
    env_choice = os.environ.get("VDR_VISION_ATTENTION", "").strip().lower()
    if env_choice:  # checked even where the flag wins: a misspelt switch is refused, not ignored
        if env_choice not in ("auto", "sdpa", "fa4"):
            raise ValueError(f"$VDR_VISION_ATTENTION must be auto, sdpa or fa4, got {env_choice!r}")
        values.setdefault("vision_attention", env_choice)  # neither the flag nor --config gave it
    return EmbedConfig(**values)


def load_yaml(path: str) -> dict:
    """Options from a YAML file; keys are the long flags with dashes or underscores."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


# Scoring precisions (pipeline.score.fp8): both give the exact top-k, bit for bit.
SCORE_PRECISIONS = ("exact", "fp8-exact-topk")
CACHE_HELP = ("keep a page-major float16 copy of each shard under CORPUS/_cache (rebuilt when missing, stale or "
              "damaged; the Parquet files stay the source of truth) and read it on later runs at storage speed with "
              "no decode (a 20,000-page shard: 0.6-0.7 s against ~2.5 s from Parquet on an H200 node). Needs write "
              "access beside the corpus and as much space as its float16 vectors; a read-only corpus is scored "
              "without it")
KEEP_EMBEDDERS_HELP = ("keep the model actors (Ray detached actors, named by model, settings and code) for the next "
                       "job on this cluster, each ending itself after SECONDS without a call: a later job with the "
                       "same model and settings sends them its pages and skips their start (worker, imports, model "
                       "load, first compiled batch: 18-33 s per actor, measured on an H200 node on 2026-12-04; an "
                       "estimated 7-13 s where the node already holds the model's compiled blocks). The pool is "
                       "then fixed "
                       "at --min-actors. They hold their GPU meanwhile, so an autoscaler keeps that node up; "
                       "default 0: each job ends its own")
KEEP_SCORERS_HELP = ("keep the scoring actors (Ray detached actors, named by corpus, settings and scoring code) for "
                     "the next job on this cluster, each ending itself after SECONDS without a call: a later job of "
                     "the same corpus and settings skips their start (torch's import, CUDA, the kernels' first use: "
                     "~5-6 s on an H200 node). They hold their GPU (or CPUs) meanwhile, so an autoscaler keeps "
                     "that node up; default 0: each job ends its own")


def shard_size_arg(value: str) -> int | str:
    """argparse type of --shard-size-pages: a positive integer or 'auto'."""
    import argparse

    if value == "auto":
        return value
    if not value.strip().isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--shard-size-pages must be a positive integer or 'auto', got {value!r}")
    return int(value)


PRECISION_HELP = ("exact (default), or fp8-exact-topk: score every page in FP8, then re-score exactly every page "
                  "whose FP8 error bound lets it reach the top-k; same results, the summary counts the re-scored pages")


def score_config(options: Mapping[str, Any]) -> "ScoreConfig":
    """``jobs.score_queries``' parsed flags -> its configuration (the logging flags left out);
    local paths made absolute, as the other jobs' are (the summary named the corpus as typed)."""
    values = absolute_local({k: v for k, v in options.items() if k not in ("debug", "verbose")},
                            ("corpus", "queries", "output", "query_embeddings", "model"), only_existing=("model",))
    return ScoreConfig(**values)


def same_place(a: str, b: str) -> bool:
    """Two URIs or local paths that name one folder (local paths compared absolute)."""
    return normalized_place(a) == normalized_place(b)


def normalized_place(uri: str) -> str:
    """A URI without its trailing slash; a local path made absolute."""
    return uri.rstrip("/") if "://" in uri else os.path.abspath(uri)


@dataclass(frozen=True)
class ScoreConfig:
    """``jobs.score_queries``: exact MaxSim of a query set against an embedded corpus."""

    corpus: str
    queries: str
    output: str
    top_k: int
    endpoint_url: str | None = None
    run_tag: str = "colqwen2-maxsim"
    # query embedding
    model: str | None = None  # default: the model recorded in the corpus metadata
    query_embeddings: str | None = None  # reuse these instead of loading the model
    embed_batch_size: int = 32
    max_visual_tokens: int | None = None  # when set, the corpus must have been embedded with it
    allow_model_mismatch: bool = False
    generation: int | None = None  # of an embeddings output; None: its current one (OUT/generation.json)
    # sharding and actors
    shard_size_pages: int | str = "auto"
    query_batch_size: int = 0  # 0: auto
    num_actors: int = 0  # 0: one per GPU, or min(4, CPUs) without GPUs
    gpus_per_actor: float | None = None  # None: 1 when scoring on GPUs, else 0
    device: str = "auto"  # auto: GPUs if the cluster has them now or its autoscaler can add them
    cpus_per_actor: float = 1
    backend: str = "auto"
    precision: str = "exact"  # or "fp8-exact-topk": FP8 candidates, exact re-scoring (same results)
    ray_address: str | None = None
    # shard loading: keep a page-major float16 copy of each shard beside the corpus
    # (CORPUS/_cache, rebuilt when missing or stale; the Parquet files stay the source), and
    # read a worker's next shard while it scores this one
    cache: bool = False
    prefetch: bool = True
    # keep the scoring actors for later jobs of the same corpus and settings on this cluster,
    # ending each after this many seconds without a call (0: each job starts and ends its own)
    keep_scorers: float = 0.0

    def __post_init__(self):
        problems = []
        for name in ("corpus", "queries", "output"):
            if not getattr(self, name):
                problems.append(f"--{name} is required")
        if self.corpus and self.output and same_place(self.corpus, self.output):
            problems.append("--output must differ from --corpus (the scoring job's summary.json would replace the "
                            "embedding job's): give the run a folder of its own, e.g. runs/<date>")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            problems.append(f"--top-k must be a positive integer, got {self.top_k!r}")
        if self.generation is not None and (not isinstance(self.generation, int) or self.generation < 1):
            problems.append(f"--generation must be a generation number (1 or more), got {self.generation!r}")
        if self.shard_size_pages != "auto" and (not isinstance(self.shard_size_pages, int) or self.shard_size_pages < 1):
            problems.append(f"--shard-size-pages must be a positive integer or 'auto', got {self.shard_size_pages!r}")
        if self.embed_batch_size < 1:
            problems.append(f"--embed-batch-size must be >= 1, got {self.embed_batch_size}")
        if self.query_batch_size < 0 or self.num_actors < 0:
            problems.append("--query-batch-size and --num-actors must be >= 0 (0 = automatic)")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            problems.append("--gpus-per-actor must be >= 0 (0 scores on CPU)")
        if self.device not in ("auto", "cuda", "cpu"):
            problems.append(f"--device must be auto, cuda or cpu, got {self.device!r}")
        if self.backend not in ("auto", "torch", "triton"):
            problems.append(f"--backend must be auto, torch or triton, got {self.backend!r}")
        if self.precision not in SCORE_PRECISIONS:
            problems.append(f"--precision must be one of {', '.join(SCORE_PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.keep_scorers, (int, float)) or self.keep_scorers < 0:
            problems.append(f"--keep-scorers must be a number of seconds >= 0 (0: off), got {self.keep_scorers!r}")
        if problems:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))

    @classmethod
    def from_flags(cls, flags: typing.Sequence[str], **values) -> "ScoreConfig":
        """``values`` plus extra command-line style flags (``["--num-actors", "4"]``), as a
        scheduled evaluation's ``score_args`` gives them."""
        return cls(**{**values, **_parse_flags(cls, flags)})


def _parse_flags(cls, flags: typing.Sequence[str]) -> dict:
    hints = typing.get_type_hints(cls)
    out: dict = {}
    items = list(flags)
    i = 0
    while i < len(items):
        flag = items[i]
        name, _, inline = flag[2:].partition("=") if flag.startswith("--") else ("", "", "")
        key = name.replace("-", "_")
        if key not in hints:
            raise ValueError(f"unknown scoring option {flag!r}; see python -m jobs.score_queries --help")
        hint = hints[key]
        if hint is bool:
            out[key] = True
            i += 1
            continue
        if not inline:
            if i + 1 >= len(items):
                raise ValueError(f"scoring option {flag} needs a value")
            inline = items[i + 1]
            i += 1
        i += 1
        if "int" in str(hint) and inline != "auto":
            out[key] = float(inline) if "float" in str(hint) else int(inline)
        elif "float" in str(hint):
            out[key] = float(inline)
        else:
            out[key] = inline
    return out


@dataclass(frozen=True)
class EvaluateConfig:
    """``jobs.evaluate``: ir_measures metrics of a run against relevance judgements."""

    run: str
    qrels: str
    output: str
    measures: tuple[str, ...] = DEFAULT_MEASURES
    corpus: str | None = None
    endpoint_url: str | None = None
    ranking: str = "score"

    def __post_init__(self):
        if self.ranking not in ("score", "rank"):
            raise ValueError(f"ranking must be 'score' or 'rank', got {self.ranking!r}")
        object.__setattr__(self, "measures", _measure_names(self.measures))


def _measure_names(names) -> tuple[str, ...]:
    return tuple(str(m) for m in parse_measures(names))


def parse_measures(names: Iterable[str]) -> list:
    """Measure names (``"nDCG@10"``, ``"P(rel=2)@5"``) -> ir_measures measures, in order, once each.

    >>> [str(m) for m in parse_measures(["nDCG@10", "AP", "nDCG@10"])]
    ['nDCG@10', 'AP']
    """
    import ir_measures  # no torch, no Ray

    measures, seen = [], set()
    for name in names:
        name = name.strip()
        if not name:
            continue
        try:
            measure = ir_measures.parse_measure(name)
        except Exception as exc:  # ir_measures raises ValueError/NameError/SyntaxError
            raise ValueError(
                f"unknown measure {name!r}: use an ir_measures name such as nDCG@10, R@100, "
                f"RR@10, AP, P(rel=2)@5 ({exc})"
            ) from exc
        key = str(measure)
        if key not in seen:
            seen.add(key)
            measures.append(measure)
    if not measures:
        raise ValueError("no measures to compute")
    return measures


@dataclass(frozen=True)
class RegressionPolicy:
    """When a drop is a regression.

    ``max_drop`` applies to every measure in ``measures`` (default: all measures computed)
    unless ``per_measure`` names its own; with ``relative`` the drop is a fraction of the
    reference value (0.05 = 5 %), otherwise absolute (0.01 = one point of nDCG).
    ``against`` says which references gate the exit status.
    """

    max_drop: float = 0.01
    per_measure: Mapping[str, float] = field(default_factory=dict)
    relative: bool = False
    measures: tuple[str, ...] | None = None
    against: tuple[str, ...] = ("previous", "baseline")

    def __post_init__(self):
        import math

        for name, value in [("max_drop", self.max_drop), *self.per_measure.items()]:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or math.isnan(value):
                raise ValueError(f"regression threshold {name}={value!r} must be a number >= 0")
        bad = set(self.against) - {"previous", "baseline"}
        if bad:
            raise ValueError(f"regression.against accepts 'previous' and 'baseline', not {sorted(bad)}")
        if self.measures is not None:
            object.__setattr__(self, "measures", tuple(self.measures))
        object.__setattr__(self, "against", tuple(self.against))
        object.__setattr__(self, "per_measure", dict(self.per_measure))

    @classmethod
    def from_mapping(cls, value: Mapping | None) -> "RegressionPolicy":
        value = dict(value or {})
        known = {"max_drop", "per_measure", "relative", "measures", "against"}
        unknown = set(value) - known
        if unknown:
            raise ValueError(f"unknown regression settings {sorted(unknown)}; known: {sorted(known)}")
        return cls(**value)

    def threshold(self, measure: str) -> float | None:
        """Allowed drop for ``measure``; None when the measure does not gate."""
        if measure in self.per_measure:
            return float(self.per_measure[measure])
        if self.measures is not None and measure not in self.measures:
            return None
        return float(self.max_drop)


@dataclass(frozen=True)
class OfflineEvalConfig:
    """Everything one scheduled evaluation needs. Paths are URIs (relative ones resolve
    against the working directory, as on ``ray job submit --working-dir .``)."""

    corpus: str
    queries: str
    qrels: str
    output_root: str
    history: str | None = None  # default: output_root/history
    model: str | None = None  # default: the model recorded in the corpus metadata
    max_visual_tokens: int | None = None  # when set, the corpus must have been embedded with it
    top_k: int = 100
    measures: tuple[str, ...] = DEFAULT_MEASURES
    baseline: Any = None  # run id, metrics.json URI, {measure: value}, or None (HISTORY/baseline.json)
    regression: RegressionPolicy = field(default_factory=RegressionPolicy)
    fail_on_regression: bool = True
    query_embeddings: str | None = None  # reuse these instead of loading the model
    run: str | None = None  # evaluate this existing run instead of scoring
    score_args: tuple[str, ...] = ()  # extra flags for jobs.score_queries (shards, actors, ...)
    ranking: str = "score"
    endpoint_url: str | None = None
    ray_address: str | None = None

    def __post_init__(self):
        for name in ("corpus", "queries", "qrels", "output_root"):
            if not getattr(self, name):
                raise ValueError(f"config needs '{name}' (in the YAML file or as --{name.replace('_', '-')})")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.max_visual_tokens is not None and (not isinstance(self.max_visual_tokens, int) or self.max_visual_tokens < 1):
            raise ValueError(f"max_visual_tokens must be a positive integer, got {self.max_visual_tokens!r}")
        if self.ranking not in ("score", "rank"):
            raise ValueError(f"ranking must be 'score' or 'rank', got {self.ranking!r}")
        if isinstance(self.regression, Mapping):
            object.__setattr__(self, "regression", RegressionPolicy.from_mapping(self.regression))
        object.__setattr__(self, "measures", _measure_names(self.measures))
        object.__setattr__(self, "score_args", tuple(str(a) for a in self.score_args))
        _parse_flags(ScoreConfig, self.score_args)  # a bad flag fails now, not after the scoring

    @property
    def history_uri(self) -> str:
        from pipeline.storage import join_uri

        return self.history or join_uri(self.output_root, "history")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["measures"] = list(self.measures)
        out["score_args"] = list(self.score_args)
        out["regression"] = {
            "max_drop": self.regression.max_drop,
            "per_measure": dict(self.regression.per_measure),
            "relative": self.regression.relative,
            "measures": list(self.regression.measures) if self.regression.measures is not None else None,
            "against": list(self.regression.against),
        }
        out["history"] = self.history_uri
        return out


def offline_eval_config(path: str | None, overrides: Mapping[str, Any]) -> OfflineEvalConfig:
    """YAML file (optional) + overrides (None values ignored) -> validated config."""
    values: dict[str, Any] = {}
    if path:
        import yaml

        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
        values.update(loaded)
    known = {f.name for f in dataclasses.fields(OfflineEvalConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
    extra_measures = overrides.get("extra_measures") or []
    for key, value in overrides.items():
        if key == "extra_measures" or value is None:
            continue
        if key == "max_drop":
            values["regression"] = {**(values.get("regression") or {}), "max_drop": value}
            continue
        values[key] = value
    # The default measures are always computed; the file and the flags add to them.
    values["measures"] = DEFAULT_MEASURES + tuple(values.get("measures") or ()) + tuple(extra_measures)
    if values.get("score_args") is not None:
        values["score_args"] = tuple(values["score_args"])
    for name in ("corpus", "queries", "qrels", "output_root"):
        if not values.get(name):
            raise ValueError(f"config needs '{name}' (in the YAML file or as --{name.replace('_', '-')})")
    # Local paths become absolute so that the history's links and the resolved config stay
    # valid from anywhere (a Ray job runs in a temporary copy of its working dir).
    absolute_local(values, ("corpus", "queries", "qrels", "output_root", "history", "query_embeddings", "run"))
    if isinstance(values.get("baseline"), str) and values["baseline"].endswith(".json"):
        absolute_local(values, ("baseline",))
    return OfflineEvalConfig(**values)


def resolve_batches_in_flight(batches_in_flight: int | None, device: str) -> int:
    """--batches-in-flight's default: 2 on GPUs, where the host's preparation of the next batch
    then hides behind this one's forward (measured on an H200, 2026-12-03, the 3,000-page job
    after its first batch: GPU busy 99.1-99.5% and 60.3-61.9 pages/s at 2, against 91.6-91.9%
    and 56.4-56.7 pages/s at 1, in two runs each; benchmarks/RESULTS.md); 1 on CPUs, where both
    threads would share the same cores."""
    if batches_in_flight is not None:
        return batches_in_flight
    return 2 if device == "cuda" else 1
