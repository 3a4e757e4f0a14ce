"""Where the time goes: profile one guided text-to-image step (and time the VAE decode), a
graphed chat decode over a 980² image context, or the training step of bench/train_step.py;
prints the top CUDA kernels and how long the GPU sat idle between them.

    python bench/profiling.py t2i [--size 1024]
    python bench/profiling.py decode [--tokens 32] [--step]
    python bench/profiling.py train
"""

import argparse

import torch
from common import Timer, build_model, full_size_config, no_stop, report, special_ids
from torch.profiler import ProfilerActivity, profile


def t2i(model, special, args):
    from bagel_remote.guidance_bagel import GuidanceParams

    sizes = [(args.size, args.size)]
    context = model.add_text_tokens(model.new_context(1), [list(range(1000, 1030))], special)
    guided = GuidanceParams(num_timesteps=2, cfg_text_scale=4.0, cfg_interval=(0.0, 1.0))
    run = lambda: model.generate_latents(context, model.new_context(1), context, sizes, special, guided)
    run()
    with Timer() as t_step:
        latents = run()
    with Timer() as t_decode:
        model.decode_latents(latents, sizes)
    return run, dict(guided_step_s=round(t_step.seconds, 4), vae_decode_s=round(t_decode.seconds, 4))


def decode(model, special, args):
    stop_never = no_stop(special)
    image = torch.rand(3, 980, 980, device="cuda") * 2 - 1
    context = model.add_text_tokens(
        model.add_vit_images(model.new_context(1), [image], special), [list(range(30))], special
    )
    run = lambda: model.generate_text_ids(context, stop_never, max_length=args.tokens)
    run()
    with Timer() as t:
        run()
    return run, dict(
        tokens=args.tokens, seconds=round(t.seconds, 4), ms_per_token=round(1000 * t.seconds / args.tokens, 2)
    )


def train(model, special, args):
    from train_step import make_step, packed_batch

    step = make_step(model, packed_batch(model.config))
    for _ in range(3):
        step()
    with Timer() as t:
        step()
    return step, dict(step_s=round(t.seconds, 4))


KERNEL_KINDS = {  # first match wins: flash's split-KV kernels also say "splitk"
    "attention_ms": ("flash", "fmha", "sdpa", "attention"),
    "matmul_ms": ("nvjet", "gemm", "gemv", "xmma", "splitkreduce"),
}


def _gpu_events(prof) -> list:
    """The profile's GPU kernels and copies, by start time."""
    return sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda e: e.time_range.start
    )


def gpu_time_split(prof) -> dict:
    """GPU time in matmul kernels, attention kernels and everything else, and the idle gaps
    between consecutive kernels / copies (ms)."""
    events = _gpu_events(prof)
    split = dict.fromkeys([*KERNEL_KINDS, "other_ms", "idle_ms"], 0.0)
    for event in events:
        name = event.name.lower()
        kind = next((k for k, keys in KERNEL_KINDS.items() if any(key in name for key in keys)), "other_ms")
        split[kind] += event.time_range.elapsed_us() / 1000
    gaps = (b.time_range.start - a.time_range.end for a, b in zip(events, events[1:]))
    split["idle_ms"] = sum(max(g, 0) for g in gaps) / 1000
    return {k: round(v, 1) for k, v in split.items()}


def print_last_step(prof, steps: int) -> None:
    """About the last of `steps` decode steps: the last 1/steps of the GPU events, in order (the
    call's few setup copies shift it by a few kernels). What each kernel of a step takes: the table
    above sums kernels of one name, e.g. every GEMV shape together."""
    events = _gpu_events(prof)
    last = events[-(len(events) // steps) :]
    for before, event in zip([None, *last], last):
        gap = 0 if before is None else event.time_range.start - before.time_range.end
        print(f"{event.time_range.elapsed_us():8.2f} us  gap {gap:6.2f}  {event.name[:90]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workload", choices=["t2i", "decode", "train"])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--step", action="store_true", help="decode: also list the last step's kernels in order")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.workload == "train":  # the training benchmark's model: 8 LLM layers, float32 weights
        model = build_model(full_size_config(num_llm_layers=8), dtype=torch.float32).train()
    else:
        model = build_model(full_size_config(stage=2 if args.workload == "t2i" else 1))
    workloads = {"t2i": t2i, "decode": decode, "train": train}
    run, numbers = workloads[args.workload](model, special_ids(model.config), args)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))
    if args.workload == "decode" and args.step:
        print_last_step(prof, args.tokens)
    report(workload=f"profile_{args.workload}", **numbers, **gpu_time_split(prof))


if __name__ == "__main__":
    main()
