"""Text-to-image: 1024x1024, 50 steps, text guidance 4.0 in (0.4, 1.0], shift 3.0, prompts of
30 tokens, VAE decode included; full-size BAGEL-7B-MoT with random weights, bf16. MFU counts the
decoder's FLOPs of every denoising forward (VAE excluded) over the whole time (and all GPUs).

    python bench/t2i.py [--size 1024] [--steps 50] [--batch 1]
    python bench/t2i.py --step-cache taylorseer adaptive adaptive=0.05 [--upstream ../Bagel]
    torchrun --nproc-per-node N bench/t2i.py --gpus N [--layouts cfg=2 sp=2 ...]

With --gpus N, rank 0 first times one GPU alone (the `single` line), then every layout of
parallel_bagel (default: those that fit N) runs on all N: one JSON line each, with the time per
image, the speed-up over one GPU at the same number of requests, and the largest difference of
the final latents from one GPU's. A batch layout gets --batch requests per batch group.
`--tiny` runs the same code on CPU (gloo) with the tiny random model: a check of the code path
(`torchrun --nproc-per-node 4 bench/t2i.py --gpus 4 --tiny`), not a measurement.

Every line says whether the repeats gave bitwise the same latents (`bitwise_repeats`). With
`--step-cache`, one GPU times each step cache after the exact path (a name, or `adaptive=TOL` for
its tolerance): time, peak memory, decoder branch passes against the exact path's, and the
relative error of the final latents and of the decoded images against the exact run.
`--upstream CHECKOUT` first runs ../shared/tools/bench_upstream.py --taylorseer (the reference
and its TaylorSeer, same size and steps) in a subprocess on the same GPU and prints its line;
`--upstream-path` is the PYTHONPATH holding the transformers it needs (../shared/tools/README.md).
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from common import (
    PEAK_BF16_FLOPS,
    Timer,
    attention_flops,
    build_model,
    decoder_weights,
    full_size_config,
    report,
    special_ids,
    tiny_config,
)

DEFAULT_LAYOUTS = {2: ["cfg=2", "sp=2", "batch=2"], 4: ["cfg=2,sp=2", "sp=4", "batch=4", "batch=2,cfg=2"]}


def parse_layout(text: str) -> dict:
    """'cfg=2,sp=2' -> {'cfg': 2, 'sp': 2}"""
    return {name: int(size) for name, size in (part.split("=") for part in text.split(","))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gpus", type=int, default=1, help="ranks of the torchrun launch")
    parser.add_argument("--layouts", nargs="*", default=None, help="e.g. cfg=2 sp=2 cfg=2,sp=2 batch=4")
    parser.add_argument("--tiny", action="store_true", help="tiny random model on CPU (gloo): checks the code path")
    parser.add_argument("--step-cache", nargs="*", default=[], help="e.g. taylorseer adaptive adaptive=0.05 (one GPU)")
    parser.add_argument("--upstream", default=None, help="a checkout of ByteDance-Seed/Bagel: time its TaylorSeer too")
    parser.add_argument("--upstream-path", default="site-ref", help="PYTHONPATH with the reference's transformers")
    args = parser.parse_args()
    if args.step_cache and args.gpus > 1:
        raise SystemExit("--step-cache times one GPU: run it without --gpus.")
    if args.upstream:  # first, while this process holds no GPU memory
        run_upstream(args)
    if args.tiny and args.size == 1024:
        args.size, args.steps = 128, 6

    device = "cpu" if args.tiny else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if args.gpus > 1:
        if not args.tiny:
            torch.cuda.set_device(device)
        dist.init_process_group("gloo" if args.tiny else "nccl")
        if dist.get_world_size() != args.gpus:
            raise SystemExit(f"--gpus {args.gpus} but torchrun started {dist.get_world_size()} processes.")
    rank = dist.get_rank() if args.gpus > 1 else 0

    torch.manual_seed(0)
    config = tiny_config() if args.tiny else full_size_config()
    from bagel_remote.guidance_bagel import GuidanceParams
    from bagel_remote.parallel_bagel import ParallelLayout

    model = build_model(config, torch.float32 if args.tiny else torch.bfloat16, device)
    if args.gpus > 1:  # the same random weights on every rank
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, 0)
    special = special_ids(config)
    params = GuidanceParams(
        num_timesteps=args.steps,
        timestep_shift=3.0,
        cfg_text_scale=4.0,
        cfg_img_scale=1.0,
        cfg_interval=(0.4, 1.0),
        cfg_renorm_type="global",
    )
    vocab = config.text_config.vocab_size
    dim = config.latent_patch_size**2 * model.model.latent_channel
    grid = args.size // (model.vae.downsample * config.latent_patch_size)

    forwards = []  # (context length, latent tokens) of each sequence of each denoising forward
    latent_hidden = model._latent_hidden  # every decoder pass of the denoising loop, cached or not

    def counted(context, x, t, pos, counts, n_branches, special, shard=None, final_norm=True):
        forwards.extend(zip(context.lengths, counts * n_branches))
        return latent_hidden(context, x, t, pos, counts, n_branches, special, shard=shard, final_norm=final_norm)

    model._latent_hidden = counted
    decoded = []  # the images of the last call

    def generate(prompts: list, seeds: list, parallel, step_cache=None) -> list:
        """Final latents (on the host) of each prompt; the VAE decode is timed too."""
        context = model.add_text_tokens(model.new_context(len(prompts)), prompts, special)
        noise = [torch.randn(grid * grid, dim, generator=torch.Generator().manual_seed(s)) for s in seeds]
        sizes = [(args.size, args.size)] * len(prompts)
        latents = model.generate_latents(
            context,
            model.new_context(len(prompts)),
            context,
            sizes,
            special,
            params,
            init_noise=noise,
            parallel=parallel,
            step_cache=step_cache,
        )
        images = model.decode_latents(latents, sizes)
        assert all(torch.isfinite(image).all() for image in images)
        decoded[:] = [image.float().cpu() for image in images]
        return [latent.float().cpu() for latent in latents]

    repeats_equal = {}  # id(run) -> whether every repeat gave bitwise the same latents

    def timed(run, all_ranks: bool) -> tuple[float, list]:
        run()  # warm-up
        times, outputs = [], []
        for _ in range(args.repeats):
            forwards.clear()
            if all_ranks:  # start together
                dist.barrier()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            with Timer() as t:
                outputs.append(run())
            times.append(t.seconds)
        repeats_equal[id(run)] = all(all(torch.equal(a, b) for a, b in zip(out, outputs[0])) for out in outputs)
        return min(times), outputs[-1]

    def flops() -> float:
        gen, und = decoder_weights(model, "gen"), decoder_weights(model, "und")
        return sum(
            2 * gen * n + 2 * und * 2 + attention_flops(config.text_config, n + 2, length + n + 2)
            for length, n in forwards
        )

    requests = lambda n: [
        torch.randint(0, vocab, (30,), generator=torch.Generator().manual_seed(i)).tolist()  # noqa: E731
        for i in range(n)
    ]
    single: dict[int, tuple[float, list, float]] = {}  # requests -> (seconds, latents, FLOPs) on one GPU

    def one_gpu(n: int) -> tuple[float, list, float]:
        if n not in single:
            run = lambda: generate(requests(n), list(range(n)), None)  # noqa: E731
            seconds, latents = timed(run, all_ranks=False)
            single[n] = seconds, latents, flops()
            report(
                workload="t2i",
                gpus=1,
                layout="single",
                size=args.size,
                steps=args.steps,
                requests=n,
                seconds=round(seconds, 3),
                seconds_per_image=round(seconds / n, 3),
                latent_tokens_per_s=round(sum(c for _, c in forwards) / seconds),
                mfu=round(flops() / seconds / PEAK_BF16_FLOPS, 3),
                branch_passes=len(forwards) // n,
                bitwise_repeats=repeats_equal[id(run)],
            )
        return single[n]

    if args.gpus == 1:
        one_gpu(args.batch)
        exact_images = list(decoded)
        for spec in args.step_cache:
            step_cache = parse_step_cache(spec)
            n = args.batch
            run = lambda: generate(requests(n), list(range(n)), None, step_cache)  # noqa: E731
            seconds, latents = timed(run, all_ranks=False)
            ref_seconds, ref_latents, _ = single[n]
            relative = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
            report(
                workload="t2i",
                gpus=1,
                layout="single",
                step_cache=spec,
                size=args.size,
                steps=args.steps,
                requests=n,
                seconds=round(seconds, 3),
                seconds_per_image=round(seconds / n, 3),
                speedup_vs_exact=round(ref_seconds / seconds, 3),
                branch_passes=len(forwards) // n,
                latent_rel_err=round(max(relative(a, b) for a, b in zip(latents, ref_latents)), 5),
                image_rel_err=round(max(relative(a, b) for a, b in zip(decoded, exact_images)), 5),
                bitwise_repeats=repeats_equal[id(run)],
            )
        return
    for text in args.layouts or DEFAULT_LAYOUTS.get(args.gpus, [f"batch={args.gpus}"]):
        layout = ParallelLayout.of(parse_layout(text), device)
        n = args.batch * layout.size("batch")
        if rank == 0:
            one_gpu(n)
        dist.barrier()
        seeds = list(range(n))
        if layout.size("batch") > 1:
            run = lambda: layout.run_requests(generate, requests(n), seeds)  # noqa: E731
        else:
            run = lambda: generate(requests(n), seeds, layout)  # noqa: E731
        seconds, latents = timed(run, all_ranks=True)
        if rank == 0:
            ref_seconds, ref_latents, ref_flops = single[n]  # the workload's FLOPs are one GPU's
            report(
                workload="t2i",
                gpus=args.gpus,
                layout=text,
                size=args.size,
                steps=args.steps,
                requests=n,
                seconds=round(seconds, 3),
                seconds_per_image=round(seconds / n, 3),
                speedup_vs_1gpu=round(ref_seconds / seconds, 3),
                mfu_per_gpu=round(ref_flops / seconds / args.gpus / PEAK_BF16_FLOPS, 3),
                max_abs_diff_vs_1gpu=max((a - b).abs().max().item() for a, b in zip(latents, ref_latents)),
                max_abs_latent=max(b.abs().max().item() for b in ref_latents),
                bitwise_repeats=repeats_equal[id(run)],
            )
    dist.destroy_process_group()


def parse_step_cache(text: str):
    """'taylorseer', 'adaptive' or 'adaptive=0.05' (its tolerance) -> the step_cache argument."""
    from bagel_remote.step_cache_bagel import AdaptiveTaylor

    name, _, value = text.partition("=")
    return AdaptiveTaylor(tolerance=float(value)) if name == "adaptive" and value else name


def run_upstream(args) -> None:
    """The reference's plain and TaylorSeer text-to-image (../shared/tools/bench_upstream.py) in a
    subprocess on this GPU: its JSON line, tagged."""
    tool = Path(__file__).resolve().parents[2] / "shared" / "tools" / "bench_upstream.py"
    env = dict(os.environ, UPSTREAM_BAGEL=args.upstream, PYTHONPATH=args.upstream_path)
    done = subprocess.run(
        [sys.executable, str(tool), "--taylorseer", "--steps", str(args.steps), "--size", str(args.size)],
        env=env,
        capture_output=True,
        text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise SystemExit(f"bench_upstream.py failed ({done.returncode}):\n{done.stderr[-4000:]}")
    print('{"workload": "t2i", "implementation": "reference", ' + lines[-1][1:], flush=True)


if __name__ == "__main__":
    main()
