"""Where a text-to-image run spends its time: one guided denoising step and the VAE decode,
profiled (top CUDA kernels and CPU-side ops).

    python bench/profile_t2i.py [--size 1024]
"""

import argparse

import torch
from common import Timer, build_model, full_size_config, report, special_ids
from torch.profiler import ProfilerActivity, profile


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = full_size_config()
    from bagel_remote.generation_bagel import GuidanceParams

    model = build_model(config)
    special = special_ids(config)
    sizes = [(args.size, args.size)]
    context = model.add_text_tokens(model.new_context(1), [list(range(1000, 1030))], special)
    guided = GuidanceParams(num_timesteps=2, cfg_text_scale=4.0, cfg_interval=(0.0, 1.0))
    run = lambda: model.generate_latents(context, model.new_context(1), context, sizes, special, guided)
    run()
    with Timer() as t_step:
        latents = run()
    with Timer() as t_decode:
        model.decode_latents(latents, sizes)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12))
    report(workload="t2i_profile", guided_step_s=round(t_step.seconds, 4), vae_decode_s=round(t_decode.seconds, 4))


if __name__ == "__main__":
    main()
