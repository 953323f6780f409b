"""A tiny random ColQwen2, built fully offline, for tests and the demo.

Same architecture and processor as the real checkpoint (Qwen2-VL backbone with M-RoPE,
spatial merge 2, 128-d embeddings), only small: a byte-level BPE trained on a few lines,
two vision blocks and two text layers. Weights are random but seeded, so the same
command always writes the same checkpoint.
"""

from __future__ import annotations

import os

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

_TRAINING_TEXT = [
    "Query: what is the revenue in 2023?", "Describe the image.", "user", "assistant",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "annual report table figure chart page document invoice summary total",
]


# The real ColQwen2 (Qwen2-VL-2B backbone), for GPU benchmarks with random weights:
# FLOPs and memory traffic do not depend on weight values (FACTS.md).
REAL_TEXT = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
             "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
             "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}
REAL_VISION = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4}


def build_tiny_model(output_dir: str, max_visual_tokens: int = 768, seed: int = 0, real_size: bool = False,
                     device: str = "cpu", family: str = "qwen2_vl") -> str:
    """``family="qwen2_5_vl"`` builds a ColQwen2.5-style checkpoint (windowed vision attention)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        ColQwen2Config,
        ColQwen2ForRetrieval,
        ColQwen2Processor,
        Qwen2TokenizerFast,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_TRAINING_TEXT * 4, trainer=trainer)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    vocab = len(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 4 * 28 * 28, "longest_edge": max_visual_tokens * 28 * 28}
    )
    processor = ColQwen2Processor(image_processor=image_processor, tokenizer=tokenizer)

    text_config = {
        "model_type": "qwen2_vl_text",
        "vocab_size": vocab,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "in_channels": 3,
    }
    if real_size:
        text_config.update(REAL_TEXT)
        vision_config.update(REAL_VISION)
    if family == "qwen2_5_vl":
        text_config["model_type"] = "qwen2_5_vl_text"
        vision_config = {
            "depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
            "window_size": 56, "fullatt_block_indexes": [1, 3],
        }
    elif family != "qwen2_vl":
        raise ValueError(f"family must be qwen2_vl or qwen2_5_vl, got {family!r}")
    config = ColQwen2Config(
        vlm_config={
            "model_type": family,
            "text_config": text_config,
            "vision_config": vision_config,
            "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"],
            "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"],
        },
        embedding_dim=128,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = ColQwen2ForRetrieval(config).eval()
    if real_size:
        model = model.to(torch.bfloat16)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir
