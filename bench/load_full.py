"""Load time and peak GPU memory of a full-size BAGEL-7B-MoT checkpoint (random weights).

Builds a random full-size model on the GPU in bf16, saves it in the released layout
(ema.safetensors + ae.safetensors), frees it, then times `from_pretrained(..., dtype=bf16,
device_map="cuda")` for stage 2 and stage 1. The files were just written, so they are read from
the page cache (a warm load).

    python bench/load_full.py [--dir /tmp/bagel-7b-random]
"""

import argparse
import gc

import torch
from common import Timer, build_model, full_size_config, report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", default="/tmp/bagel-7b-random")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(full_size_config())
    with Timer() as t_save:
        model.save_pretrained(args.dir)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal

    for stage in (2, 1):
        torch.cuda.reset_peak_memory_stats()
        with Timer() as t_load:
            model, info = BagelForUnifiedMultimodal.from_pretrained(
                args.dir, stage=stage, dtype=torch.bfloat16, device_map="cuda", output_loading_info=True
            )
        params = sum(p.numel() for p in model.parameters())
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in model.parameters())
        report(
            workload="load",
            stage=stage,
            params_b=round(params / 1e9, 2),
            load_s=round(t_load.seconds, 2),
            save_s=round(t_save.seconds, 2),
        )
        del model
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
