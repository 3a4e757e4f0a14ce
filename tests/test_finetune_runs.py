"""examples/finetune.py as users run it, on CPU ranks with gloo and a tiny checkpoint:

- ranks with deliberately different packs (text only, text-to-image only, edit, understanding)
  give the loss and gradients of one process on the same packs (full, GEN-only, LoRA; 2 and 4
  ranks), and keep stepping;
- the README's fine-tuning commands, run as written (2 ranks instead of the README's GPU counts;
  the tiny model, a few steps and the test's paths appended as key=value), on a small generated
  dataset in the README's formats (t2i parquet, edit parquet, LLaVA JSONL), for full, GEN-only
  and LoRA with 0 and 1 DataLoader workers: killed after a step or while a checkpoint is written,
  the same command resumes with bit-equal losses and gradient norms and a log with each step
  once; the full run reads text-to-image data alone (its lm head never has optimizer state);
- a damaged checkpoint is refused with a way out, and `resume=false` restarts, without torchrun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal
from bagel_remote.training import packing
from bagel_remote.training.config import load_config
from bagel_remote.training.model import apply_freezing, is_und_param, lora_config
from conftest import REPO_ROOT
from test_data import _png, write_t2i
from test_packing import _pil

peft = pytest.importorskip("peft")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The tiny checkpoint, a dataset in the README's three formats, and a run config in the
    template's layout (examples/finetune.yaml with its data filled in)."""
    root = tmp_path_factory.mktemp("finetune_runs")
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from make_tiny_checkpoint import make_tiny_checkpoint

    make_tiny_checkpoint(root / "checkpoint")
    write_t2i(root / "t2i", files=1, row_groups=2, rows=2)
    (root / "edit").mkdir()
    chains = [[_png(32, 32, 10 + 3 * i + j) for j in range(3)] for i in range(4)]
    instructions = [[["make it red", "redden"], ["bigger"]]] * 4
    pq.write_table(
        pa.table({"image_list": chains, "instruction_list": instructions}),
        root / "edit" / "part-0.parquet",
        row_group_size=2,
    )
    (root / "images").mkdir()
    lines = []
    for i in range(4):
        _pil(28, 28, 20 + i).save(root / "images" / f"{i}.png")
        lines.append(
            {
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is it?"},
                    {"from": "gpt", "value": f"A thing {i}."},
                ],
            }
        )
    lines.append({"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi there."}]})
    (root / "llava.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def run_config(workspace: Path, name: str, sources: list[str], num_workers: int, **keys) -> Path:
    """A copy of examples/finetune.yaml with the tiny model, its data and `keys` filled in."""
    cfg = yaml.safe_load((REPO_ROOT / "examples" / "finetune.yaml").read_text())
    specs = {
        "t2i": {"kind": "t2i", "path": str(workspace / "t2i")},
        "edit": {"kind": "edit", "path": str(workspace / "edit")},
        "llava": {"kind": "llava", "path": str(workspace / "llava.jsonl"), "image_dir": str(workspace / "images")},
    }
    cfg.update(model=str(workspace / "checkpoint"), warmup_steps=1, save_dtype="float32", **keys)
    cfg["data"] = {
        "sources": [specs[s] for s in sources],
        "weights": [2, 1, 1][: len(sources)],
        "max_num_tokens": 1024,
        "expected_num_tokens": 700,
        "max_num_tokens_per_sample": 1024,
        "num_workers": num_workers,
    }
    path = workspace / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def readme_commands() -> dict[str, list[str]]:
    """The README's fine-tuning commands (its Fine-tuning section's bash block), by mode."""
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"## Fine-tuning\n.*?```bash\n(.*?)```", text, re.S).group(1)
    commands = [line.split() for line in block.splitlines() if line.startswith("torchrun")]
    markers = {"lora": "lora_rank=64", "gen": "freeze_und=true"}
    found = {mode: next(c for c in commands if marker in c) for mode, marker in markers.items()}
    found["full"] = next(c for c in commands if not set(markers.values()) & set(c))
    return found


def run(command: list[str], config: Path, out_dir: Path, *extra: str, exit_at: str | None = None, ok: bool = True):
    """A README command with 2 ranks, `my_run.yaml` -> `config`, then `out_dir` and `extra` appended."""
    paths = {"my_run.yaml": str(config), "examples/finetune.py": str(REPO_ROOT / "examples" / "finetune.py")}
    args = [paths.get(word, word) for word in command[1:]]
    nproc = args.index("--nproc_per_node")
    args[nproc + 1] = "2"
    full = [sys.executable, "-m", "torch.distributed.run", "--standalone", *args, f"out_dir={out_dir}", *extra]
    env = {**ENV, "HF_MODULES_CACHE": str(config.parent / "modules")}
    if exit_at:
        env["BAGEL_FINETUNE_EXIT_AT"] = exit_at
    result = subprocess.run(full, capture_output=True, text=True, env=env, timeout=300)
    if ok:
        assert result.returncode == 0, result.stderr[-6000:]
    return result


def log_of(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def same_steps(log: list[dict], reference: list[dict], steps) -> None:
    """Bit-equal loss, CE, MSE and gradient norm (and the same tokens) at the `steps` both logs have."""
    by_step = {entry["step"]: entry for entry in reference}
    compared = [entry for entry in log if entry["step"] in steps and entry["step"] in by_step]
    assert len(compared) >= 2, "at least two steps to compare"
    for entry in compared:
        want = by_step[entry["step"]]
        for key in ("loss", "ce", "mse", "grad_norm", "tokens", "vit_tokens", "vae_tokens", "mse_tokens"):
            assert entry[key] == want[key], (entry["step"], key, entry[key], want[key])


# ----------------------------------------------------------------------------------------------
# N ranks on N different packs = one process on the N packs
# ----------------------------------------------------------------------------------------------


def _packs(checkpoint: Path) -> list[dict]:
    """Four packs that differ in every part: text only (CE, no image), text-to-image only (noised
    latents, MSE, no CE), an edit (clean and noised latents, a ViT image, MSE, no CE), an
    understanding sample (a ViT image, CE). Latents encoded (posterior mean) and noise fixed."""
    model = BagelForUnifiedMultimodal.from_pretrained(checkpoint)
    processor = model.processor
    sizes = packing.ImageSizes(64, 32, 16), packing.ImageSizes(56, 28, 14)
    builder = packing.PlanBuilder(processor.tokenizer, vae_sizes=sizes[0], vit_sizes=sizes[1], edit_vit_sizes=sizes[1])
    config = packing.PackingConfig.from_model_config(
        model.config,
        processor.special_token_ids,
        text_cond_dropout_prob=0,
        vit_cond_dropout_prob=0,
        vae_cond_dropout_prob=0,
    )
    answer = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A small square."}]
    plans = [
        [builder.text("Just some text to learn.", loss=True)[0]],
        builder.text_to_image("a red square", _pil(48, 48, 1)),
        builder.edit([_pil(48, 48, 2), _pil(48, 48, 3)], ["make it blue"]),
        builder.understanding([_pil(42, 28, 4)], answer),
    ]
    packs, generator = [], torch.Generator().manual_seed(0)
    for plan in plans:
        pack = packing.pack_samples([plan], config, generator)
        pack = packing.encode_pack(model, pack, "cpu", sample=False)
        if "padded_latent" in pack:
            num = pack["packed_vae_token_indexes"].shape[0]
            pack["packed_noise"] = torch.randn(num, model.model.llm2vae.out_features, generator=generator)
        packs.append(pack)
    return packs


def _one_process(checkpoint: Path, packs: list[dict], mode: str, start: dict) -> tuple[dict, dict]:
    """One process, one plain model, on all packs: the trainer's loss (CE over all CE weights, MSE
    over all noised tokens) and its gradients."""
    cfg = load_config([f"model={checkpoint}", *finetune_ranks_modes()[mode]])
    model = BagelForUnifiedMultimodal.from_pretrained(checkpoint).train()
    apply_freezing(model, cfg)
    if cfg["lora_rank"]:
        peft.get_peft_model(model, lora_config(cfg))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in start.items():
            params[name].copy_(value)
    ce_sum = mse_sum = 0.0
    ce_den = mse_den = 0.0
    for pack in packs:
        out = model(**pack)
        if out["ce"] is not None:
            ce_sum = ce_sum + (out["ce"] * pack["ce_loss_weights"]).sum()
            ce_den = ce_den + pack["ce_loss_weights"].sum()
        if out["mse"] is not None:
            mse_sum, mse_den = mse_sum + out["mse"].mean(-1).sum(), mse_den + out["mse"].shape[0]
    ce, mse = ce_sum / max(ce_den, 1e-12), mse_sum / max(mse_den, 1)
    (ce + mse).backward()
    grads = {name: params[name].grad for name in start}
    return {"ce": float(ce.detach()), "mse": float(mse.detach()), "loss": float((ce + mse).detach())}, grads


def finetune_ranks_modes():
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import finetune_ranks

    return finetune_ranks.MODES


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_with_different_packs_equal_one_process(workspace, world):
    """2 ranks: an understanding pack (ViT, CE) against a text-to-image one (latents, MSE): the
    mismatched ViT all-gathers and reduce-scatters of the issue. 4 ranks: text only, t2i only,
    edit, understanding."""
    packs = _packs(workspace / "checkpoint")
    packs = [packs[3], packs[1]] if world == 2 else packs
    packs_path, out = workspace / f"packs{world}.pt", workspace / f"ranks{world}.pt"
    torch.save(packs, packs_path)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(world),
        str(REPO_ROOT / "tests" / "finetune_ranks.py"),
        str(workspace / "checkpoint"),
        str(packs_path),
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]
    results = torch.load(out, weights_only=False)
    for mode, got in results.items():
        want, want_grads = _one_process(workspace / "checkpoint", packs, mode, got["start"])
        metrics = got["metrics"]
        assert metrics["tokens"] == sum(p["sequence_length"] for p in packs)
        assert metrics["vit_tokens"] == sum(p["packed_vit_tokens"].shape[0] for p in packs if "packed_vit_tokens" in p)
        for key in ("loss", "ce", "mse"):
            assert metrics[key] == pytest.approx(want[key], rel=1e-5), (mode, key)
        largest = max(g.abs().max().item() for g in want_grads.values() if g is not None)
        reached = 0
        for name, grad in got["grads"].items():
            expected = want_grads[name]
            if expected is None:  # a part no pack uses: no gradient, or a zero one (run on zero tokens)
                assert grad is None or not grad.any(), (mode, name)
                continue
            reached += 1
            assert grad is not None, (mode, name)
            # to float rounding: of the tensor, or of the whole gradient for a tensor that is all
            # rounding (the key bias, which the softmax cancels)
            err, scale = (grad - expected).abs().max().item(), expected.abs().max().item()
            assert err <= 2e-5 * scale + 1e-7 * largest, (mode, name, err, scale)
        assert reached > 0
        if mode == "lora":
            assert all("lora_" in name for name in got["grads"])
        if mode == "gen":
            assert not any(is_und_param(name) for name in got["grads"])
        for step in got["steps"]:  # three more whole steps: other packs (rotated), then pack 0 everywhere
            assert torch.isfinite(torch.tensor([step["loss"], step["grad_norm"]])).all() and step["loss"] > 0
        assert (got["steps"][2]["grad_norm"] == 0) == (mode == "gen")  # GEN-only without anything to generate


# ----------------------------------------------------------------------------------------------
# The README's commands: kills, resumes, logs
# ----------------------------------------------------------------------------------------------


SCENARIOS = [  # (mode, DataLoader workers, where the run is killed)
    ("lora", 1, "step"),
    ("lora", 0, "save"),
    ("gen", 0, "save"),
    ("gen", 1, "step"),
    ("full", 0, "step"),
    ("full", 1, "save"),
]


@pytest.mark.parametrize("mode, workers, kill", SCENARIOS, ids=[f"{m}-workers{w}-kill_at_{k}" for m, w, k in SCENARIOS])
def test_readme_command_killed_and_resumed(workspace, mode, workers, kill):
    """A README command (LoRA and GEN-only on mixed t2i + edit + LLaVA data, full on text-to-image
    data alone: no CE, so the lm head never has optimizer state), 6 steps, a checkpoint every 3,
    killed right after step 5 or while step 6's checkpoint is written (DCP's files written, not yet
    published); the same command again resumes from step 3's checkpoint and redoes steps 4-6 with
    bit-equal losses, gradient norms and token counts, and the log lists each step once."""
    command = readme_commands()[mode]
    sources = ["t2i"] if mode == "full" else ["t2i", "edit", "llava"]
    config = run_config(workspace, f"{mode}{workers}", sources, num_workers=workers)
    keys = ["max_steps=6", "save_every=3"]
    keys += {"gen": ["optimizer=adamw"], "full": ["ema_decay=0.5"]}.get(mode, [])  # (torchao's 8-bit AdamW compiles)
    out = workspace / f"{mode}{workers}"
    killed = run(command, config, out, *keys, exit_at="step:5" if kill == "step" else "save:6", ok=False)
    assert killed.returncode != 0
    before = log_of(out)
    assert [e["step"] for e in before] == list(range(1, 6 if kill == "step" else 7))
    published = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert published == ["step_00000003"] + (["step_00000006.partial"] if kill == "save" else [])

    resumed = run(command, config, out, *keys)
    assert "resumed from" in resumed.stderr and "step_00000003 (step 3)" in resumed.stderr
    after = log_of(out)
    assert [e["step"] for e in after] == [1, 2, 3, 4, 5, 6]
    same_steps(after, before, range(4, 7))  # steps 4, 5 (and 6) computed again after the resume: the same bits
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    if kill == "step":  # what the saved model holds: once per mode
        CHECKS[mode](workspace, out, command, after, resumed.stderr)


def _lora_checks(workspace, out, command, log, stderr):
    kinds = {(e["vit_tokens"] > 0, e["vae_tokens"] > 0, e["ce_tokens"] > 0) for e in log}
    assert len(kinds) > 1, "the packs differ between steps"
    cfg = load_config([w for w in command if "=" in w])  # the trained-parameter count is PEFT's
    plain = BagelForUnifiedMultimodal.from_pretrained(workspace / "checkpoint")
    count = peft.get_peft_model(plain, lora_config(cfg)).get_nb_trainable_parameters()[0]
    assert f"{count:,} trained parameters" in stderr
    from safetensors.torch import load_file

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # the adapter trained
    # the adapter loads with PEFT, and the merged final model gives its outputs
    base = BagelForUnifiedMultimodal.from_pretrained(workspace / "checkpoint")
    adapted = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    merged = BagelForUnifiedMultimodal.from_pretrained(out / "final").eval()
    start = BagelForUnifiedMultimodal.from_pretrained(workspace / "checkpoint").state_dict()
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, start[k])]
    assert changed and all(re.search(r"\.(self_attn|mlp(_moe_gen)?)\.", k) for k in changed)
    pack = _packs(workspace / "checkpoint")[2]  # an edit: UND and GEN tokens
    with torch.no_grad():
        want = adapted.base_model.model(**pack, output_hidden_states=True)
        got = merged(**pack, output_hidden_states=True)
    for key in ("mse", "last_hidden_state"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


def _gen_checks(workspace, out, command, log, stderr):
    final = BagelForUnifiedMultimodal.from_pretrained(out / "final").state_dict()
    start = BagelForUnifiedMultimodal.from_pretrained(workspace / "checkpoint").state_dict()
    changed = [k for k in final if not torch.equal(final[k], start[k])]
    assert changed and not any(is_und_param(k) for k in changed)
    assert any(e["ce_tokens"] > 0 for e in log)  # CE in the packs, yet the UND path stayed frozen


def _full_checks(workspace, out, command, log, stderr):
    assert all(e["ce_tokens"] == 0 and e["vit_tokens"] == 0 for e in log)  # text-to-image data alone
    saved = BagelForUnifiedMultimodal.from_pretrained(out / "final")
    final, start = saved.state_dict(), BagelForUnifiedMultimodal.from_pretrained(workspace / "checkpoint").state_dict()
    head = "model.language_model.lm_head.weight"
    assert torch.equal(final[head], start[head])  # never given a gradient (and resumed without optimizer state)
    assert any("vae2llm" in k and not torch.equal(final[k], start[k]) for k in final)
    assert saved.config.text_config.freeze_und is False and saved.processor is not None


CHECKS = {"lora": _lora_checks, "gen": _gen_checks, "full": _full_checks}


def test_damaged_checkpoint_is_refused_then_resume_false_restarts_as_one_process(workspace):
    """An out_dir whose last run left a checkpoint that cannot be loaded: a clear error naming the
    way out; `resume=false` then starts afresh. Both started without torchrun (one process)."""
    torch.save([_packs(workspace / "checkpoint")[2]], workspace / "one_pack.pt")
    out = workspace / "damaged"
    (out / "checkpoints" / "step_00000009").mkdir(parents=True)  # a run that died: no DCP files
    (out / "log.jsonl").write_text('{"step": 1, "loss": 0}\n')
    command = [
        sys.executable,
        str(REPO_ROOT / "examples" / "finetune.py"),
        f"model={workspace / 'checkpoint'}",
        f"data={workspace / 'one_pack.pt'}",
        f"out_dir={out}",
        "max_steps=1",
        "save_dtype=float32",
    ]
    env = {**ENV, "HF_MODULES_CACHE": str(workspace / "modules")}
    failed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert failed.returncode != 0
    assert "Cannot resume from" in failed.stderr and "resume=false" in failed.stderr
    fresh = subprocess.run([*command, "resume=false"], capture_output=True, text=True, env=env, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-4000:]
    assert "Not started by torchrun: training as one process" in fresh.stderr
    assert "resume=false: deleting" in fresh.stderr
    log = log_of(out)
    assert [e["step"] for e in log] == [1] and log[0]["loss"] > 0 and log[0]["mse_tokens"] > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]
    assert (out / "final" / "config.json").is_file()


def test_a_weight_first_trained_after_the_resume_starts_its_optimizer_state_as_uninterrupted(workspace):
    """Full fine-tuning, one process: text-to-image packs up to the checkpoint (step 3), so the lm
    head has no AdamW state in it; an understanding pack at step 4 gives it its first gradient.
    Killed after step 5 and resumed, steps 4 and 5 are bit-equal (a state made up at loading would
    start its moments and bias correction elsewhere)."""
    packs = _packs(workspace / "checkpoint")
    torch.save([packs[1], packs[1], packs[1], packs[3], packs[3], packs[3]], workspace / "late_ce.pt")
    out = workspace / "late_ce"
    command = [
        sys.executable,
        str(REPO_ROOT / "examples" / "finetune.py"),
        f"model={workspace / 'checkpoint'}",
        f"data={workspace / 'late_ce.pt'}",
        f"out_dir={out}",
        "max_steps=6",
        "save_every=3",
        "lr=1e-3",
        "warmup_steps=0",
        "save_dtype=float32",
    ]
    env = {**ENV, "HF_MODULES_CACHE": str(workspace / "modules")}
    killed = subprocess.run(
        command, capture_output=True, text=True, env={**env, "BAGEL_FINETUNE_EXIT_AT": "step:5"}, timeout=300
    )
    assert killed.returncode != 0
    before = log_of(out)
    assert [e["ce_tokens"] > 0 for e in before] == [False, False, False, True, True]
    resumed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    same_steps(log_of(out), before, range(4, 6))
