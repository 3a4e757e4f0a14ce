"""Stage-2 training step (forward + backward, bf16 autocast, no optimizer) on one packed batch of
8148 tokens: 5 text-to-image samples (30 text tokens + a 512x512 noised latent, `noise` mode) and
2 understanding samples (490x490 ViT image + 200 text tokens with CE). Full-width model, 8 LLM
layers (--layers), full ViT.

    python bench/train_step.py [--layers 8] [--steps 10]
"""

import argparse

import torch
from common import PEAK_BF16_FLOPS, Timer, build_model, full_size_config, import_repo, report, train_flops


def packed_batch(
    config, device="cuda", t2i_samples=5, und_samples=2, text_len=30, latent_side=32, vit_side=35, und_text=200
):
    """The collator's packed inputs for the workload above (random ids and pixels)."""
    p = config.latent_patch_size
    z = int(config.vae_config["z_channels"])
    vocab = config.text_config.vocab_size
    text_idx, vit_idx, vae_idx, ce_idx, mse_idx = [], [], [], [], []
    positions, sample_lens, split_lens, modes, latent_shapes, timesteps = [], [], [], [], [], []
    pos_ids_latent, pos_ids_vit = [], []
    cursor = 0

    def take(n):
        nonlocal cursor
        rows = list(range(cursor, cursor + n))
        cursor += n
        return rows

    for _ in range(t2i_samples):
        rows = take(text_len + 2)  # [bos] text [eos]
        text_idx += rows
        positions += list(range(len(rows)))
        marker_start, latent_rows, marker_end = take(1), take(latent_side**2), take(1)
        text_idx += marker_start + marker_end
        vae_idx += latent_rows
        mse_idx += latent_rows
        positions += [len(rows)] * (latent_side**2 + 2)
        sample_lens.append(len(rows) + latent_side**2 + 2)
        split_lens += [len(rows), latent_side**2 + 2]
        modes += ["causal", "noise"]
        latent_shapes.append((latent_side, latent_side))
        timesteps += [0.5] * latent_side**2
        pos_ids_latent += [r * config.max_latent_size + c for r in range(latent_side) for c in range(latent_side)]
    for _ in range(und_samples):
        marker_start, vit_rows, marker_end = take(1), take(vit_side**2), take(1)
        text_idx += marker_start + marker_end
        vit_idx += vit_rows
        positions += [0] * (vit_side**2 + 2)
        rows = take(und_text + 2)
        text_idx += rows
        ce_idx += rows[:-1]
        positions += list(range(1, len(rows) + 1))
        sample_lens.append(vit_side**2 + 2 + len(rows))
        split_lens += [vit_side**2 + 2, len(rows)]
        modes += ["full", "causal"]
        pos_ids_vit += [r * config.vit_max_num_patch_per_side + c for r in range(vit_side) for c in range(vit_side)]
    latent_hw = latent_side * p
    long = lambda x: torch.tensor(x, dtype=torch.long, device=device)
    return dict(
        sequence_length=cursor,
        sample_lens=sample_lens,
        split_lens=split_lens,
        attn_modes=modes,
        packed_text_ids=torch.randint(0, vocab, (len(text_idx),), device=device),
        packed_text_indexes=long(text_idx),
        packed_position_ids=long(positions),
        packed_vit_tokens=torch.randn(len(vit_idx), 3 * config.vit_patch_size**2, device=device),
        packed_vit_token_indexes=long(vit_idx),
        packed_vit_position_ids=long(pos_ids_vit),
        vit_token_seqlens=torch.tensor([vit_side**2] * und_samples, dtype=torch.int32, device=device),
        padded_latent=torch.randn(t2i_samples, z, latent_hw, latent_hw, device=device),
        patchified_vae_latent_shapes=latent_shapes,
        packed_latent_position_ids=long(pos_ids_latent),
        packed_vae_token_indexes=long(vae_idx),
        packed_timesteps=torch.tensor(timesteps, device=device),
        mse_loss_indexes=long(mse_idx),
        ce_loss_indexes=long(ce_idx),
        packed_label_ids=torch.randint(0, vocab, (len(ce_idx),), device=device),
    )


def make_step(model, batch):
    """One training step on `batch`: forward under bf16 autocast, backward of ce + mse, no optimizer."""

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**batch)
        (out["ce"].mean() + out["mse"].mean()).backward()
        model.zero_grad(set_to_none=True)

    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--no-input-check",
        action="store_true",
        help="skip the training forward's input check (check_training_inputs), to measure what it costs",
    )
    args = parser.parse_args()
    if args.no_input_check:
        import_repo()
        import bagel_remote.modeling_bagel as modeling

        modeling.check_training_inputs = lambda model, inputs: []
    torch.manual_seed(0)
    config = full_size_config(num_llm_layers=args.layers)
    model = build_model(config, dtype=torch.float32).train()
    batch = packed_batch(config)
    step = make_step(model, batch)
    for _ in range(3):
        step()
    torch.cuda.reset_peak_memory_stats()
    with Timer() as t:
        for _ in range(args.steps):
            step()
    seconds = t.seconds / args.steps
    tokens = batch["sequence_length"]
    report(
        workload="train_step",
        layers=args.layers,
        input_check=not args.no_input_check,
        tokens=tokens,
        seconds=round(seconds, 4),
        tokens_per_s=round(tokens / seconds),
        mfu=round(train_flops(config, batch) / seconds / PEAK_BF16_FLOPS, 3),
    )


if __name__ == "__main__":
    main()
