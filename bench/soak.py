"""Soak: many mixed calls on one full-size BAGEL-7B-MoT (random weights, bf16), as a server sees
them: chat of 1-16 requests with prompts of 5-2000 tokens (a quarter with a 224² or 448² image)
and 8-24 new tokens, text-to-image and editing at 256-512 px with 2-3 steps. Prints allocated and
reserved memory every 50 calls, then one JSON line: memory growth after the decode pool has
filled (allocated minus the pool's KV caches, from call `--settle` to the end, in MB) and calls per
second. Stops at `--calls` or after `--max-seconds`, whichever comes first (the JSON says how many
calls ran).

    python bench/soak.py [--calls 1000] [--max-seconds 270] [--settle 100] [--seed 0]
"""

import argparse
import random
import time

import torch
from common import build_model, full_size_config, no_stop, report, special_ids

MB = 1e6


def chat(model, special, rng):
    """1-16 requests, prompts log-uniform in 5-2000 tokens, some with an image; greedy, no eos."""
    batch = rng.randint(1, 16)
    context = model.new_context(batch)
    if rng.random() < 0.25:
        side = rng.choice([224, 448])
        image = torch.rand(3, side, side, device=model.device) * 2 - 1
        context = model.add_vit_images(context, [image] * batch, special)
    prompts = [[rng.randrange(150000) for _ in range(int(5 * 400 ** rng.random()))] for _ in range(batch)]
    context = model.add_text_tokens(context, prompts, special)
    stop_never = no_stop(special)
    model.generate_text_ids(context, stop_never, max_length=rng.randint(8, 24) + 1)


def text_to_image(model, special, rng):
    from bagel_remote.guidance_bagel import GuidanceParams

    batch, size = rng.randint(1, 2), rng.choice([256, 384, 512])
    prompts = [[rng.randrange(150000) for _ in range(rng.randint(10, 60))] for _ in range(batch)]
    context = model.add_text_tokens(model.new_context(batch), prompts, special)
    params = GuidanceParams(num_timesteps=rng.randint(3, 4), cfg_interval=(0.0, 1.0))
    sizes = [(size, size)] * batch
    latents = model.generate_latents(context, model.new_context(batch), context, sizes, special, params)
    model.decode_latents(latents, sizes)


def edit(model, special, rng):
    from bagel_remote.guidance_bagel import GuidanceParams

    size = rng.choice([256, 512])
    image = torch.rand(3, size, size, device=model.device) * 2 - 1
    prompt = [[rng.randrange(150000) for _ in range(rng.randint(10, 40))]]
    images = model.add_vae_images(model.new_context(1), [image], special)
    images = model.add_vit_images(images, [image[:, : size // 14 * 14, : size // 14 * 14]], special)
    full = model.add_text_tokens(images, prompt, special)
    text_only = model.add_text_tokens(model.new_context(1), prompt, special)
    params = GuidanceParams(
        num_timesteps=rng.randint(3, 4), cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel"
    )
    latents = model.generate_latents(full, images, text_only, [(size, size)], special, params)
    model.decode_latents(latents, [(size, size)])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--max-seconds", type=float, default=270.0)
    parser.add_argument("--settle", type=int, default=100, help="calls before the growth baseline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model = build_model(full_size_config())
    special = special_ids(model.config)
    pool = model._decode_pool()
    kinds = {"chat": (chat, 0.7), "t2i": (text_to_image, 0.15), "edit": (edit, 0.15)}
    counts = dict.fromkeys(kinds, 0)

    def memory() -> dict:
        torch.cuda.synchronize()
        return dict(allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved(), pool=pool.nbytes)

    baseline = None
    start = time.perf_counter()
    calls = 0
    while calls < args.calls and time.perf_counter() - start < args.max_seconds:
        name = rng.choices(list(kinds), weights=[w for _, w in kinds.values()])[0]
        kinds[name][0](model, special, rng)
        counts[name] += 1
        calls += 1
        if calls == args.settle:
            baseline = memory()
        if calls % 50 == 0:
            m = memory()
            print(
                f"call {calls:5d}  {time.perf_counter() - start:7.1f} s  allocated {m['allocated'] / 1e9:7.3f} GB  "
                f"reserved {m['reserved'] / 1e9:7.3f} GB  decode pool {m['pool'] / MB:8.1f} MB "
                f"({len(pool.runners)} shapes, {pool.captures} captures)",
                flush=True,
            )
    seconds = time.perf_counter() - start
    end = memory()
    growth = {}
    if baseline is not None:
        outside_pool = lambda m: m["allocated"] - m["pool"]
        growth = dict(
            growth_mb=round((outside_pool(end) - outside_pool(baseline)) / MB, 1),
            allocated_growth_mb=round((end["allocated"] - baseline["allocated"]) / MB, 1),
            reserved_growth_mb=round((end["reserved"] - baseline["reserved"]) / MB, 1),
        )
    report(
        workload="soak",
        calls=calls,
        **counts,
        seconds=round(seconds, 1),
        calls_per_s=round(calls / seconds, 2),
        settle_calls=args.settle,
        **growth,
        pool_mb=round(end["pool"] / MB, 1),
        captures=pool.captures,
        allocated_gb=round(end["allocated"] / 1e9, 3),
        reserved_gb=round(end["reserved"] / 1e9, 3),
    )


if __name__ == "__main__":
    main()
