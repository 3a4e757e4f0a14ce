"""Write a tiny random BAGEL checkpoint in the released layout, for tests and quick experiments.

    python scripts/make_tiny_checkpoint.py --out DIR [--seed 0]

The directory gets exactly what a BAGEL Hub repository holds: ``config.json`` (with ``auto_map``),
``llm_config.json`` + ``vit_config.json``, ``ema.safetensors``, ``ae.safetensors``, the tokenizer
files (a tiny byte-level BPE with the four BAGEL special tokens), ``processor_config.json`` when
the processor module exists, and the remote-code ``.py`` files, so it loads with
``AutoModel.from_pretrained(DIR, trust_remote_code=True)`` offline. It takes about a second.

Shapes: LLM hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 320; ViT hidden 32, 3 layers in
``vit_config.json`` (2 built), patch 14, image_size 980 so that its position table covers the
processor's 70 x 70 patch grid; VAE ch 32, ch_mult [1, 1, 1, 1] (8x downsampling), one res block,
16 latent channels. The processor resizes VAE images to at most 256 x 256 (the tiny model's default
image size; the latent table, max_latent_size 64, covers 1024 x 1024 as BAGEL-7B-MoT's).
Weights come from the model's own initialisation under ``torch.manual_seed(seed)``,
except ``llm2vae`` (zeros at init) which gets small random values so that generation is non-trivial.
The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repo_package import import_repo  # noqa: E402
from tiny_tokenizer import build_tiny_tokenizer  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

TINY_VOCAB_SIZE = 320
TINY_LLM_CONFIG = dict(
    architectures=["Qwen2ForCausalLM"],
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    initializer_range=0.02,
    tie_word_embeddings=False,
    use_sliding_window=False,
    attention_dropout=0.0,
)
TINY_VIT_CONFIG = dict(
    architectures=["SiglipVisionModel"],
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,  # as released: the model drops the last layer (vit_select_layer=-2)
    num_attention_heads=2,
    patch_size=14,
    image_size=980,  # 70 patches per side: the config's vit_max_num_patch_per_side
    num_channels=3,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    attention_dropout=0.0,
)
TINY_VAE_CONFIG = dict(
    resolution=256,
    in_channels=3,
    downsample=8,
    ch=32,
    out_ch=3,
    ch_mult=[1, 1, 1, 1],
    num_res_blocks=1,
    z_channels=16,
    scale_factor=0.3611,
    shift_factor=0.1159,
)
LLM2VAE_STD = 0.02
# The processor's VAE resize rule: images up to 256 x 256, the tiny model's default generation size
# (the reference's 1024 / 512 would make every call of the tiny model take seconds to minutes).
TINY_VAE_MAX_SIZE, TINY_VAE_MIN_SIZE = 256, 128


def tiny_config(tokenizer):
    """The tiny BagelConfig whose special ids are the tokenizer's."""
    import_repo()
    from bagel_remote.configuration_bagel import BagelConfig

    ids = dict(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    vocab_size = max(TINY_VOCAB_SIZE, len(tokenizer))
    return BagelConfig(
        llm_config=dict(TINY_LLM_CONFIG, vocab_size=vocab_size, **ids),
        vit_config=dict(TINY_VIT_CONFIG),
        vae_config=dict(TINY_VAE_CONFIG),
        latent_patch_size=2,
        max_latent_size=64,
        vit_max_num_patch_per_side=TINY_VIT_CONFIG["image_size"] // TINY_VIT_CONFIG["patch_size"],
        connector_act="gelu_pytorch_tanh",
        interpolate_pos=False,
        timestep_shift=1.0,
        stage=2,
        pad_token_id=ids["pad_token_id"],
    )


def make_tiny_checkpoint(out_dir, seed: int = 0) -> Path:
    """Write the tiny checkpoint to `out_dir` (created if needed) and return its path."""
    import torch

    import_repo()
    from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(None, vocab_size=TINY_VOCAB_SIZE)
    config = tiny_config(tokenizer)

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        model = BagelForUnifiedMultimodal(config)
        with torch.no_grad():
            model.model.llm2vae.weight.normal_(0.0, LLM2VAE_STD)
            model.model.llm2vae.bias.normal_(0.0, LLM2VAE_STD)
    model.eval().save_pretrained(out)

    try:
        from bagel_remote.processing_bagel import BagelProcessor
    except ImportError:  # the processor module is optional: fall back to the bare tokenizer
        tokenizer.save_pretrained(str(out))
    else:
        processor = BagelProcessor(
            tokenizer, config=config, vae_max_size=TINY_VAE_MAX_SIZE, vae_min_size=TINY_VAE_MIN_SIZE
        )
        processor.save_pretrained(str(out))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_tiny_checkpoint(args.out, seed=args.seed)
    print(f"wrote a tiny BAGEL checkpoint to {path}: {', '.join(sorted(p.name for p in path.iterdir()))}")


if __name__ == "__main__":
    main()
