"""Shared helpers of the GPU benchmarks: import the repo as a package, build a full-size BAGEL with
random weights straight on the GPU, time and measure."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from repo_package import import_repo  # noqa: E402,F401

REPO_ROOT = Path(__file__).resolve().parent.parent

# What the lent H100 reaches, measured (issue 5): dense bf16 matmul and HBM bandwidth. MFU and
# bandwidth utilisation below are fractions of these.
PEAK_BF16_FLOPS = 798e12
PEAK_HBM_BYTES_PER_S = 3.0e12


def full_size_config(num_llm_layers: int | None = None, stage: int = 2):
    """BAGEL-7B-MoT's configuration (the repo's config.json), optionally with fewer LLM layers."""
    import_repo()
    from bagel_remote.configuration_bagel import BagelConfig

    config = BagelConfig.from_pretrained(REPO_ROOT)
    config.stage = stage
    if num_llm_layers is not None:
        config.text_config.num_hidden_layers = num_llm_layers
    return config


def tiny_config():
    """The tiny random model's configuration (scripts/make_tiny_checkpoint.py), for checking a
    benchmark's code path on CPU."""
    from make_tiny_checkpoint import tiny_config as make_config
    from tiny_tokenizer import build_tiny_tokenizer

    return make_config(build_tiny_tokenizer(None, vocab_size=320))


def build_model(config, dtype=torch.bfloat16, device: str = "cuda"):
    """Random-weight model built directly on the GPU in `dtype` (never on the CPU first)."""
    from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = BagelForUnifiedMultimodal(config)
    finally:
        torch.set_default_dtype(previous)
    # llm2vae starts at zero; give it small random values so generation does real work.
    if config.visual_gen:
        with torch.no_grad():
            model.model.llm2vae.weight.normal_(0, 0.02)
    return model.eval()


def decoder_weights(model, side: str) -> int:
    """Decoder weights one token of `side` ("und" or "gen") multiplies with, lm head excluded."""
    lm = model.model.language_model.model
    return sum(p.numel() for name, p in lm.layers.named_parameters() if ("moe_gen" in name) == (side == "gen"))


def attention_flops(tower_config, queries: int, keys: int) -> float:
    """Forward FLOPs of attention (QK^T and PV) over all layers of a tower (`text_config` for the
    decoder, `vision_config` for the ViT)."""
    return 4 * queries * keys * tower_config.hidden_size * tower_config.num_hidden_layers


# FLOPs per weight and token for (UND tokens, GEN tokens, ViT tokens, CE rows of the lm head), by
# what trains: 2 forward, +2 for the input gradient wherever a gradient flows back, +2 for the
# weight gradient of trained weights. "full": everything trains; "lora": frozen base with adapters
# in every decoder layer (the gradient crosses every decoder layer but stops before the ViT; the
# adapters' own FLOPs are left out); "gen" (`freeze_und`): UND outputs are detached, so UND tokens,
# the ViT and the lm head run forward only, and GEN tokens train.
_TRAIN_FACTORS = {"full": (6, 6, 6, 6), "lora": (4, 4, 2, 4), "gen": (2, 6, 2, 2)}


def train_flops(config, batch, trains: str = "full") -> float:
    """Model FLOPs of one training step on `batch` (forward + backward, recomputation not
    counted), for what trains (`_TRAIN_FACTORS`). Attention: forward, plus twice that backward
    where a gradient flows (with "gen", only in the `noise` splits, which hold the GEN tokens)."""
    und_f, gen_f, vit_f, head_f = _TRAIN_FACTORS[trains]
    text, vit = config.text_config, config.vision_config
    d, hd = text.hidden_size, text.hidden_size // text.num_attention_heads
    kv = text.num_key_value_heads * hd
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * text.intermediate_size
    vit_layer = 4 * vit.hidden_size**2 + 2 * vit.hidden_size * vit.intermediate_size
    n_gen = batch["packed_vae_token_indexes"].shape[0]
    n_und = batch["sequence_length"] - n_gen
    dense = per_layer * text.num_hidden_layers * (und_f * n_und + gen_f * n_gen)
    dense += vit_layer * vit.num_hidden_layers * batch["packed_vit_tokens"].shape[0] * vit_f
    dense += d * text.vocab_size * batch["ce_loss_indexes"].shape[0] * head_f
    backward = lambda mode: 1 if trains == "gen" and mode != "noise" else 3  # noqa: E731
    attn = sum(  # within-split keys (half of them when causal); earlier splits are small
        attention_flops(text, n, n) * (0.5 if mode == "causal" else 1.0) * backward(mode)
        for n, mode in zip(batch["split_lens"], batch["attn_modes"])
    )
    vit_attn = sum(attention_flops(vit, int(s), int(s)) for s in batch["vit_token_seqlens"])
    return dense + attn + vit_attn * (3 if trains == "full" else 1)


def special_ids(config):
    """bos, eos, start and end of image: Qwen2's / BAGEL's ids, or the tiny tokenizer's for
    `tiny_config()` (its vocabulary stops short of Qwen2's special ids)."""
    from bagel_remote.contexts_bagel import SpecialTokenIds

    if config.text_config.vocab_size < 151654:
        from tiny_tokenizer import TINY_A_SPECIAL_TOKEN_IDS

        names = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
        return SpecialTokenIds(*(TINY_A_SPECIAL_TOKEN_IDS[name] for name in names))
    return SpecialTokenIds(151644, 151645, 151652, 151653)


def no_stop(special):
    """The special ids with no eos: decoding runs every step it is given (benchmarks time a fixed count)."""
    return dataclasses.replace(special, eos=-1)


class Timer:
    """Wall time of a CUDA region (synchronised; plain wall time without CUDA)."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def report(**values) -> None:
    values.setdefault("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    values.setdefault("peak_gb", round(torch.cuda.max_memory_allocated() / 1e9, 2) if torch.cuda.is_available() else 0)
    values.setdefault("torch", torch.__version__)
    print(json.dumps(values), flush=True)
