"""Text-to-image: 1024x1024, 50 steps, text guidance 4.0 in (0.4, 1.0], shift 3.0, one prompt of
30 tokens, VAE decode included; full-size BAGEL-7B-MoT with random weights, bf16. MFU counts the
decoder's FLOPs of every denoising forward (VAE excluded) over the whole time.

    python bench/t2i.py [--size 1024] [--steps 50] [--batch 1]
"""

import argparse

import torch
from common import (PEAK_BF16_FLOPS, Timer, attention_flops, build_model, decoder_weights, full_size_config, report,
                    special_ids)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = full_size_config()
    from bagel_remote.generation_bagel import GuidanceParams

    model = build_model(config)
    special = special_ids(config)
    params = GuidanceParams(num_timesteps=args.steps, timestep_shift=3.0, cfg_text_scale=4.0, cfg_img_scale=1.0,
                            cfg_interval=(0.4, 1.0), cfg_renorm_type="global")
    prompts = [torch.randint(0, 150000, (30,)).tolist() for _ in range(args.batch)]
    sizes = [(args.size, args.size)] * args.batch

    forwards = []  # (context length, latent tokens) of each sequence of each denoising forward
    predict_velocity = model._predict_velocity

    def counted(context, x, t, pos, counts, n_branches, special):
        forwards.extend(zip(context.lengths, counts * n_branches))
        return predict_velocity(context, x, t, pos, counts, n_branches, special)

    model._predict_velocity = counted

    def generate():
        context = model.add_text_tokens(model.new_context(args.batch), prompts, special)
        latents = model.generate_latents(context, model.new_context(args.batch), context, sizes, special, params)
        return model.decode_latents(latents, sizes)

    generate()  # warm-up
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        forwards.clear()
        with Timer() as t:
            images = generate()
        times.append(t.seconds)
    assert torch.isfinite(images[0]).all()
    gen, und = decoder_weights(model, "gen"), decoder_weights(model, "und")
    flops = sum(2 * gen * n + 2 * und * 2 + attention_flops(model.config.text_config, n + 2, length + n + 2) for length, n in forwards)
    seconds = min(times)
    report(workload="t2i", size=args.size, steps=args.steps, batch=args.batch, seconds=round(seconds, 3),
           seconds_per_image=round(seconds / args.batch, 3),
           latent_tokens_per_s=round(sum(n for _, n in forwards) / seconds), mfu=round(flops / seconds / PEAK_BF16_FLOPS, 3))


if __name__ == "__main__":
    main()
