"""BAGEL-7B-MoT on smaller GPUs: load modes under a memory cap, one JSON line per mode.

The full-size model with random weights is built on the GPU in bf16, its reference outputs are
computed (one guided denoising step's velocity, chat logits), and it is saved to `--dir` in the
released layout; skipped when `--dir` already holds it (the same seed gives the same weights).
Then each mode loads it back through `from_pretrained` under
`torch.cuda.set_per_process_memory_fraction` (emulating a card of `cap_gb`) and reports: load
time, text-to-image (`--size`², `--steps` steps, guided: time and peak GB), chat (an image of
980² and a 30-token prompt, `--new-tokens` greedy tokens: decode tokens/s and peak GB), and the
relative error against bf16 of the guided velocity of the first denoising step and of the first
chat step's logits.

    python bench/memory.py --modes bf16,nf4,nf4-stage1,bnb-int8        # first call (saves ~30 GB)
    python bench/memory.py --modes torchao-int8,torchao-float8,offload-24,offload-16
    python bench/memory.py --modes nf4 --steps 10 --new-tokens 32       # quicker

Modes: bf16 (no cap, one GPU), offload-24 / offload-16 (bf16, `device_map="auto"` with a
`max_memory` that leaves the rest on the CPU), nf4 / bnb-int8 (bitsandbytes), torchao-int8
(int8 weight-only), torchao-float8 (float8 dynamic activations and weights), nf4-stage1 (stage 1
in 4-bit, chat only).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import Timer, build_model, full_size_config, import_repo, no_stop, report, special_ids

GB = 1e9
_CHILD = "BAGEL_MEMORY_BENCH_MODE"  # set in the process that runs one mode


def _bnb(**kwargs):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**kwargs)


def _torchao(kind: str):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig() if kind == "int8" else Float8DynamicActivationFloat8WeightConfig())


def _nf4():
    return _bnb(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


# mode -> (card size emulated in GB or None, stage, from_pretrained arguments beyond dtype); with
# device_map="auto", `run_mode` adds the max_memory that leaves the rest on the CPU
MODES = {
    "bf16": (None, 2, lambda: {"device_map": {"": 0}}),
    "offload-24": (24, 2, lambda: {"device_map": "auto"}),
    "offload-16": (16, 2, lambda: {"device_map": "auto"}),
    "nf4": (16, 2, lambda: {"device_map": {"": 0}, "quantization_config": _nf4()}),
    "bnb-int8": (24, 2, lambda: {"device_map": {"": 0}, "quantization_config": _bnb(load_in_8bit=True)}),
    "torchao-int8": (24, 2, lambda: {"device_map": {"": 0}, "quantization_config": _torchao("int8")}),
    "torchao-float8": (24, 2, lambda: {"device_map": {"": 0}, "quantization_config": _torchao("float8")}),
    "nf4-stage1": (8, 1, lambda: {"device_map": {"": 0}, "quantization_config": _nf4()}),
}


class Workload:
    """The fixed inputs of every mode (seeded), and how to run them on a model."""

    def __init__(self, config, args):
        generator = torch.Generator().manual_seed(1)
        self.special = special_ids(config)
        self.no_stop = no_stop(self.special)
        self.prompt = torch.randint(0, 150000, (30,), generator=generator).tolist()
        self.image = torch.rand(3, 980, 980, generator=generator) * 2 - 1
        self.size, self.steps, self.new_tokens = args.size, args.steps, args.new_tokens
        tokens = (args.size // 16) ** 2
        self.noise = [torch.randn(tokens, 64, generator=generator)]

    def params(self, steps: int):
        from bagel_remote.guidance_bagel import GuidanceParams

        return GuidanceParams(
            num_timesteps=steps,
            timestep_shift=3.0,
            cfg_text_scale=4.0,
            cfg_img_scale=1.0,
            cfg_interval=(0.4, 1.0),
            cfg_renorm_type="global",
        )

    def t2i(self, model, steps: int):
        sizes = [(self.size, self.size)]
        context = model.add_text_tokens(model.new_context(), [self.prompt], self.special)
        latents = model.generate_latents(
            context, model.new_context(), context, sizes, self.special, self.params(steps), init_noise=self.noise
        )
        return latents, model.decode_latents(latents, sizes)

    def velocity(self, model) -> torch.Tensor:
        """The guided velocity of the first denoising step (t = 1 -> 0 in one step: x1 = x0 - v)."""
        latents, _ = self.t2i(model, steps=2)
        return (self.noise[0].cuda().float() - latents[0].float()).cpu()

    def chat_context(self, model):
        context = model.add_vit_images(model.new_context(), [self.image.cuda()], self.special)
        return model.add_text_tokens(context, [self.prompt], self.special)

    def first_logits(self, model) -> torch.Tensor:
        _, logits = model.generate_text_ids(self.chat_context(model), self.no_stop, max_length=2, return_logits=True)
        return logits[0][0].float().cpu()


def ensure_checkpoint(directory: Path, workload_args) -> None:
    """Build the random full-size model on the GPU, keep its bf16 reference outputs and save it."""
    reference = directory / "reference.pt"
    if (
        reference.is_file()
        and torch.load(reference)["size"] == workload_args.size
        and (directory / "ema.safetensors").is_file()
    ):
        return
    torch.manual_seed(0)
    config = full_size_config()
    model = build_model(config)
    work = Workload(config, workload_args)
    with torch.no_grad():
        reference = {"velocity": work.velocity(model), "logits": work.first_logits(model), "size": workload_args.size}
    with Timer() as t_save:
        model.save_pretrained(directory)
    torch.save(reference, directory / "reference.pt")
    report(workload="memory-save", seconds=round(t_save.seconds, 1))
    del model
    gc.collect()
    torch.cuda.empty_cache()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return round(((actual - expected).norm() / expected.norm()).item(), 5)


def run_mode(name: str, directory: Path, args) -> None:
    import_repo()
    from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal

    cap, stage, make_kwargs = MODES[name]
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GB / total) if cap else 1.0)
    kwargs = make_kwargs()
    if kwargs["device_map"] == "auto":  # what the GPU may hold of the weights, the rest on the CPU
        kwargs["max_memory"] = {0: int((cap - args.headroom_gb) * GB), "cpu": int(200 * GB)}
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = BagelForUnifiedMultimodal.from_pretrained(directory, stage=stage, dtype=torch.bfloat16, **kwargs)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    result = {
        "workload": "memory",
        "mode": name,
        "cap_gb": cap,
        "stage": stage,
        "load_s": round(load_s, 1),
        "weights_gb": round(torch.cuda.memory_allocated() / GB, 2),
    }
    devices = sorted({str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()})
    result["devices"] = devices
    work = Workload(model.config, args)
    reference = torch.load(directory / "reference.pt")
    with torch.no_grad():
        if stage == 2:
            result["velocity_rel_err"] = _relative_error(work.velocity(model), reference["velocity"])
            work.t2i(model, steps=2)  # warm-up
            torch.cuda.reset_peak_memory_stats()
            with Timer() as t:
                _, images = work.t2i(model, steps=args.steps)
            assert torch.isfinite(images[0]).all()
            result.update(t2i_s=round(t.seconds, 2), t2i_peak_gb=round(torch.cuda.max_memory_allocated() / GB, 2))
        result["logits_rel_err"] = _relative_error(work.first_logits(model), reference["logits"])
        context = work.chat_context(model)
        model.generate_text_ids(context, work.no_stop, max_length=8)  # warm-up (and graph capture)
        torch.cuda.reset_peak_memory_stats()
        with Timer() as t:
            ids = model.generate_text_ids(context, work.no_stop, max_length=args.new_tokens + 1)
        result.update(
            chat_tokens_per_s=round((len(ids[0]) - 1) / t.seconds, 1),
            chat_peak_gb=round(torch.cuda.max_memory_allocated() / GB, 2),
        )
    report(size=args.size, steps=args.steps, new_tokens=args.new_tokens, **result)
    del model, context
    gc.collect()
    torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--dir", default="/tmp/bagel-7b-random-memory")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--headroom-gb",
        type=float,
        default=4.0,
        help="GPU memory the offload modes keep free of weights (activations, staging)",
    )
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    directory = Path(args.dir)
    if not os.environ.get(_CHILD):  # each mode in a fresh process: a memory cap counts what was reserved before
        ensure_checkpoint(directory, args)
        for name in modes:
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--modes", name], env={**os.environ, _CHILD: "1"})
        return
    try:
        run_mode(modes[0], directory, args)
    except Exception as err:  # a failing mode reports why, and the next mode still runs
        report(workload="memory", mode=modes[0], error=f"{type(err).__name__}: {err}"[:500])


if __name__ == "__main__":
    main()
