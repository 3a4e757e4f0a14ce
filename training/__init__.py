"""Fine-tuning BAGEL: the components `examples/finetune.py` drives (torchtitan style, one job each).

Not remote code: `from_pretrained` never imports this package (tests/test_layout.py checks it); its
modules import the root modules relatively (`from ..modeling_bagel import ...`).

- `config`: the run's declared schema (pydantic) and `--help`
- `data`: the reference's data readers and the packed, mixed, resumable dataset
- `packing`: training packs from samples by the reference's rules; VAE encoding of a pack
- `loader`: this rank's packs from the config (a file of packs, or the readers)
- `model`: the FSDP2 model: freezing, LoRA, activation checkpointing, layer-by-layer load and shard
- `distributed`: the process group and the host-side group for token counts
- `step`: loss over all ranks (`always_run`), forward, backward and the optimizer step
- `optim`: AdamW (torch's or torchao's 8-bit), the learning-rate schedule, EMA
- `checkpoint`: DCP save / resume, the final `save_pretrained`
- `progress`: log.jsonl and the progress bar
"""
