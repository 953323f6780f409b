"""pipeline.config: options from YAML and flags, validation that says what to change, no torch or Ray."""

from __future__ import annotations

import pytest

from jobs import embed_corpus
from pipeline.config import EmbedConfig, ScoreConfig, embed_config


def _config(args) -> EmbedConfig:
    options = {k: v for k, v in vars(args).items() if k not in ("config", "verbose")}
    return embed_config(options, args.config)


def test_yaml_config_with_flags_winning(tmp_path):
    cfg_file = tmp_path / "embed.yaml"
    cfg_file.write_text("input: s3://b/docs\noutput: s3://b/emb\nbatch-size: 8\nmax_visual_tokens: 512\n")
    args = embed_corpus.build_parser().parse_args(["--config", str(cfg_file), "--batch-size", "32"])
    cfg = _config(args)
    assert isinstance(cfg, EmbedConfig)
    assert (cfg.input, cfg.batch_size, cfg.max_visual_tokens) == ("s3://b/docs", 32, 512)
    cfg_file.write_text("input: a\noutput: b\nbatch_sise: 8\n")
    with pytest.raises(ValueError, match="batch_sise"):
        _config(embed_corpus.build_parser().parse_args(["--config", str(cfg_file)]))


def test_compile_choices_reach_the_model_actors():
    """--compile: auto compiles on GPUs only; on and auto precompile the blocks (saved whole,
    pipeline.embed.precompile); plain keeps torch.compile per block; anything else is refused."""
    def settings(compile_, device):
        s = EmbedConfig(input="in", output="out", compile=compile_).embedder_settings(device, 2)
        return s["compile_model"], s["precompiled"]

    assert settings("auto", "cuda") == (True, True) and settings("auto", "cpu")[0] is False
    assert settings("on", "cpu") == (True, True)
    assert settings("plain", "cuda") == (True, False)
    assert settings("off", "cuda")[0] is False
    args = embed_corpus.build_parser().parse_args(["--input", "in", "--output", "out", "--compile", "plain"])
    assert _config(args).compile == "plain"
    with pytest.raises(ValueError, match="--compile must be auto, on, off or plain"):
        EmbedConfig(input="in", output="out", compile="yes")


def test_score_flags_become_typed_options():
    cfg = ScoreConfig.from_flags(["--num-actors", "4", "--shard-size-pages=500", "--allow-model-mismatch"],
                                 corpus="c", queries="q.jsonl", output="o", top_k=10)
    assert (cfg.num_actors, cfg.shard_size_pages, cfg.allow_model_mismatch) == (4, 500, True)
    with pytest.raises(ValueError, match="--num-actorz"):
        ScoreConfig.from_flags(["--num-actorz", "4"], corpus="c", queries="q", output="o", top_k=1)
    with pytest.raises(ValueError, match="--top-k must be a positive integer"):
        ScoreConfig(corpus="c", queries="q", output="o", top_k=0)


def test_removed_4bit_option_says_why(tmp_path, capsys):
    """--load-in-4bit ran no faster than bf16 on an H200 and moved the vectors (RESULTS.md):
    a run that still asks for it is refused with the reason, not silently run in bf16."""
    from jobs import embed_corpus
    from pipeline.config import embed_config

    with pytest.raises(ValueError, match="load-in-4bit was removed: .*no faster"):
        embed_config({"input": "a", "output": "b", "load_in_4bit": True})
    with pytest.raises(SystemExit) as e:
        embed_corpus.main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--load-in-4bit"])
    assert e.value.code == 2 and "--load-in-4bit was removed" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [(["--input", "docs"], "--output"), (["--output", "emb"], "--input")])
def test_a_missing_input_or_output_names_the_flag(argv, flag, capsys):
    """Leaving out --input or --output (with no --config) ends as a usage error that names the
    flag, not as a TypeError from the config's constructor."""
    with pytest.raises(SystemExit) as e:
        embed_corpus.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"{flag} is required" in err and "--config" in err and "TypeError" not in err and "__init__" not in err


def test_output_naming_the_input_folder_is_refused(tmp_path, monkeypatch):
    """--output naming --input's folder (here once relative, once absolute) is refused: the
    outputs would be read back as documents."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--output must differ from --input"):
        EmbedConfig(input="docs", output=str(tmp_path / "docs") + "/")
    assert EmbedConfig(input="docs", output="emb").output == "emb"
