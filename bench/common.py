"""Shared helpers of the GPU benchmarks: import the repo as a package, build a full-size BAGEL with
random weights straight on the GPU, time and measure."""

from __future__ import annotations

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
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
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


def special_ids(config):
    from bagel_remote.generation_bagel import SpecialTokenIds

    if config.text_config.vocab_size < 151654:  # the tiny tokenizer's (scripts/tiny_tokenizer.py)
        return SpecialTokenIds(10, 11, 12, 13)
    # Qwen2 / BAGEL ids: <|im_start|>, <|im_end|>, <|vision_start|>, <|vision_end|>.
    return SpecialTokenIds(151644, 151645, 151652, 151653)


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
