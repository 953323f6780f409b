"""Job configuration: frozen dataclasses validated up front, with errors that say what to change."""

from __future__ import annotations

import dataclasses
import json

from pipeline.embed.model import DEFAULT_MAX_VISUAL_TOKENS, DEFAULT_MODEL


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    input: str
    output: str
    model: str = DEFAULT_MODEL
    max_visual_tokens: int = DEFAULT_MAX_VISUAL_TOKENS
    endpoint_url: str | None = None
    # GPU actor pool
    batch_size: int = 16
    min_actors: int | None = None  # None: every GPU the cluster has now (1 on CPU or with none yet)
    max_actors: int | None = None  # None: one per GPU (or 1 on CPU)
    gpus_per_actor: float | None = None  # None: 1 if the cluster has GPUs, else 0 (CPU)
    dtype: str = "auto"
    attn_implementation: str = "auto"
    load_in_4bit: bool = False
    compile: str = "auto"  # torch.compile the model's blocks; auto: on GPU
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
    ray_address: str | None = None

    def __post_init__(self):
        problems = []
        if not self.input:
            problems.append("--input is required (a local folder, file, s3:// or gs:// prefix)")
        if not self.output:
            problems.append("--output is required (a local folder, s3:// or gs:// prefix)")
        if self.input and self.output and self.input.rstrip("/") == self.output.rstrip("/"):
            problems.append("--output must differ from --input (outputs would be read back as documents)")
        if self.max_visual_tokens < 4:
            problems.append(f"--max-visual-tokens must be >= 4 (ColQwen2 was trained with 768), got {self.max_visual_tokens}")
        if self.batch_size < 1:
            problems.append(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.min_actors is not None and self.min_actors < 1:
            problems.append(f"--min-actors must be >= 1, got {self.min_actors}")
        if self.max_actors is not None and self.min_actors is not None and self.max_actors < self.min_actors:
            problems.append(f"--max-actors ({self.max_actors}) must be >= --min-actors ({self.min_actors})")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            problems.append("--gpus-per-actor must be >= 0 (0 runs the model on CPU)")
        if self.compile not in ("auto", "on", "off"):
            problems.append(f"--compile must be auto, on or off, got {self.compile!r}")
        if self.render_timeout_s <= 0:
            problems.append("--render-timeout-s must be positive")
        if self.rows_per_file < 1:
            problems.append("--rows-per-file must be >= 1")
        if self.docs_per_render_task < 1:
            problems.append("--docs-per-render-task must be >= 1")
        if problems:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(problems))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def load_yaml(path: str) -> dict:
    """Options from a YAML file; keys are the long flags with dashes or underscores."""
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}
