"""Chat: one 980x980 image (4900 ViT tokens) + a 30-token prompt, then 128 greedy tokens; with
--batch N, N such requests decode together. Full-size BAGEL-7B-MoT with random weights, bf16.
Prefill is compute-bound (MFU); decoding reads the weights and the KV cache once per step, so its
figure is HBM bandwidth utilisation.

    python bench/chat.py [--batch 1] [--new-tokens 128]
"""

import argparse

import torch
from common import (
    PEAK_BF16_FLOPS,
    PEAK_HBM_BYTES_PER_S,
    Timer,
    attention_flops,
    build_model,
    decoder_weights,
    full_size_config,
    no_stop,
    report,
    special_ids,
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--stage", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = full_size_config(stage=args.stage)
    model = build_model(config)
    special = special_ids(config)
    stop_never = no_stop(special)
    images = [torch.rand(3, 980, 980, device="cuda") * 2 - 1 for _ in range(args.batch)]
    prompts = [torch.randint(0, 150000, (30,)).tolist() for _ in range(args.batch)]

    def prefill():
        context = model.add_vit_images(model.new_context(args.batch), images, special)
        return model.add_text_tokens(context, prompts, special)

    context = prefill()
    model.generate_text_ids(context, stop_never, max_length=8)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    with Timer() as t_prefill:
        context = prefill()
    with Timer() as t_decode:
        ids = model.generate_text_ids(context, stop_never, max_length=args.new_tokens + 1)
    generated = sum(len(x) - 1 for x in ids)
    text = config.text_config
    und, head = decoder_weights(model, "und"), text.vocab_size * text.hidden_size
    vit = sum(p.numel() for p in model.model.vit_model.parameters())
    vit_tokens = 4900
    prefill_flops = sum(2 * und * n + attention_flops(text, n, n) for n in context.lengths)
    prefill_flops += args.batch * (2 * vit * vit_tokens + attention_flops(config.vision_config, vit_tokens, vit_tokens))
    kv_bytes_per_token = (
        2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 2
    )
    steps = generated / args.batch
    decode_bytes = steps * 2 * (und + head) + sum(steps * (n + steps / 2) * kv_bytes_per_token for n in context.lengths)
    report(
        workload="chat",
        batch=args.batch,
        prefill_s=round(t_prefill.seconds, 3),
        prefill_mfu=round(prefill_flops / t_prefill.seconds / PEAK_BF16_FLOPS, 3),
        decode_s=round(t_decode.seconds, 3),
        new_tokens=generated,
        tokens_per_s=round(generated / t_decode.seconds, 1),
        decode_hbm_util=round(decode_bytes / t_decode.seconds / PEAK_HBM_BYTES_PER_S, 3),
    )


if __name__ == "__main__":
    main()
