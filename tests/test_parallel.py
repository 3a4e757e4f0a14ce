"""Generation over several processes (parallel_bagel.py) on CPU with gloo: every layout gives what
one process gives, on every rank.

Each test forks its ranks (torch.multiprocessing, a FileStore in tmp_path), one thread each, which
share the tiny-a model loaded here; every rank runs the parallel generation and, rank 0, the
single-process one, and saves both; the test compares them here. The tiny decoder has 4 heads and 2 KV heads, so
sp 2 gives each rank its own KV head and sp 4 makes two ranks share one.
"""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bagel_remote.contexts_bagel import SpecialTokenIds
from bagel_remote.guidance_bagel import GuidanceParams
from bagel_remote.parallel_bagel import BagelParallel, ParallelLayout, ulysses_kv_heads
from bagel_remote.step_cache_bagel import AdaptiveTaylor
from conftest import TINY_PROCESSOR_SIZES, assert_close

SPECIAL = SpecialTokenIds(10, 11, 12, 13)  # tiny-a's ids
PROMPTS = [[272, 115, 200, 48, 82, 271], [185, 28, 161, 276, 94, 17, 3, 250, 99]]


# ----------------------------------------------------------------------------------------------
# Running ranks
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(parity):
    from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal

    return BagelForUnifiedMultimodal.from_pretrained(parity.checkpoint)


def _run_ranks(tmp_path, model, world: int, case: str) -> list[dict]:
    """Run CASES[case] on `world` forked ranks (which share the loaded model: no import, no load);
    what each rank returned."""

    def rank_main(rank: int) -> None:
        torch.set_num_threads(1)  # the ranks share the machine's cores
        torch.manual_seed(rank)  # unseeded ranks would draw different noise
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=rank, world_size=world)
        try:
            result = CASES[case](model, rank)
        finally:
            dist.destroy_process_group()
        with open(tmp_path / f"{rank}.pkl", "wb") as f:
            pickle.dump(result, f)

    mp.start_processes(rank_main, nprocs=world, start_method="fork")
    results = []
    for rank in range(world):
        with open(tmp_path / f"{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return results


def _noise(model, h: int, w: int, seed: int) -> torch.Tensor:
    dim = model.config.latent_patch_size**2 * model.model.latent_channel
    return torch.randn(h * w, dim, generator=torch.Generator().manual_seed(seed))


def _t2i(model, rank: int, layouts: list, batch: int) -> dict:
    """Text-to-image latents (sizes 64x96 and 48x32, 5 steps: 3 guided in (0.4, 1], 2 unguided)
    for each layout, and on rank 0 the single-process ones."""
    sizes = [(64, 96), (48, 32)][:batch]
    noise = [_noise(model, h // 16, w // 16, 11 + i) for i, (h, w) in enumerate(sizes)]
    params = GuidanceParams(num_timesteps=6, timestep_shift=1.0, cfg_text_scale=4.0, cfg_interval=(0.4, 1.0))
    full = model.add_text_tokens(model.new_context(batch), PROMPTS[:batch], SPECIAL)
    run = lambda parallel, noise=noise: model.generate_latents(
        full,
        model.new_context(batch),
        full,
        sizes,
        SPECIAL,  # noqa: E731
        params,
        init_noise=noise,
        parallel=parallel,
    )
    out = {str(layout): run(layout) for layout in layouts}
    out["unseeded"] = run(layouts[0], None)  # every rank's own noise: rank 0's wins
    if rank == 0:
        out["single"] = run(None)
    return out


def _edit(model, rank: int, layouts: list, steps: int = 3, step_cache=None) -> dict:
    """Editing latents (three branches: full, without the text, without the image; guided on every
    step, text_channel renorm) for a batch of two."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) * 2 - 1, torch.rand(3, 32, 48, generator=g) * 2 - 1]
    image_ctx = model.add_vae_images(model.new_context(2), images, SPECIAL)
    full = model.add_text_tokens(image_ctx, PROMPTS, SPECIAL)
    cfg_img = model.add_text_tokens(model.new_context(2), PROMPTS, SPECIAL)
    sizes = [(64, 64), (32, 48)]
    noise = [_noise(model, h // 16, w // 16, 21 + i) for i, (h, w) in enumerate(sizes)]
    params = GuidanceParams(
        num_timesteps=steps + 1,
        cfg_text_scale=4.0,
        cfg_img_scale=2.0,
        cfg_interval=(0.0, 1.0),
        cfg_renorm_type="text_channel",
    )
    run = lambda parallel: model.generate_latents(
        full,
        image_ctx,
        cfg_img,
        sizes,
        SPECIAL,
        params,
        init_noise=noise,  # noqa: E731
        parallel=parallel,
        step_cache=step_cache,
    )
    out = {str(layout): run(layout) for layout in layouts}
    if rank == 0:
        out["single"] = run(None)
    return out


def _processor():
    from bagel_remote.processing_bagel import BagelProcessor
    from tiny_tokenizer import build_tiny_tokenizer  # scripts/ is on sys.path (conftest)

    return BagelProcessor(build_tiny_tokenizer(None, vocab_size=320), **TINY_PROCESSOR_SIZES)


class _Collector:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.ids, self.ended = [], False

    def put(self, ids: torch.Tensor) -> None:
        self.ids += ids.tolist()

    def end(self) -> None:
        self.ended = True


def _api(model, rank: int) -> dict:
    """generate_image / chat through the public API, batch-parallel and CFG-parallel."""
    processor = _processor()
    prompts = ["a red cat", "a blue dog on a mat", "a green bird"]
    kwargs = dict(height=32, width=48, num_steps=3, progress=False, processor=processor)
    out = {
        "batch": model.generate_image(prompts, seed=5, parallel="batch", **kwargs),
        "cfg": model.generate_image(prompts[0], seed=5, parallel="cfg", **kwargs),
        "unseeded": model.generate_image(prompts[0], parallel="cfg", **kwargs),
        "chat": model.chat(None, prompts, max_new_tokens=5, processor=processor, parallel="batch"),
    }
    streamed = _Collector()
    out["streamed_chat"] = model.chat(
        None, prompts[0], max_new_tokens=5, processor=processor, parallel="cfg", streamer=streamed
    )
    out["streamed"] = (streamed.ids, streamed.ended)
    if rank == 0:
        out["single"] = model.generate_image(prompts, seed=5, **kwargs)
        out["single_chat"] = model.chat(None, prompts, max_new_tokens=5, processor=processor)
    return out


CASES = {
    "cfg2": lambda model, rank: {**_t2i(model, rank, ["cfg"], batch=2), **{"one": _t2i(model, rank, ["cfg"], 1)}},
    "cfg3": lambda model, rank: _edit(model, rank, ["cfg", BagelParallel(cfg=3)]),
    "sp2": lambda model, rank: {"t2i": _t2i(model, rank, ["sp"], 2), "edit": _edit(model, rank, [{"sp": 2}])},
    "sp4": lambda model, rank: {
        "t2i": _t2i(model, rank, [BagelParallel(cfg=2, sp=2), "sp"], 2),
        "edit": _edit(model, rank, [BagelParallel(cfg=2, sp=2), BagelParallel(batch=2, cfg=2)]),
    },
    "api": _api,
    # 9 steps: the reference's TaylorSeer runs steps 0-4 and 7 and predicts 5, 6 and 8; cfg 4 leaves
    # a rank without a branch, which still takes part in the adaptive policy's agreement.
    "cache": lambda model, rank: {
        name: _edit(model, rank, [BagelParallel(cfg=2, sp=2), BagelParallel(cfg=4)], steps=9, step_cache=policy)
        for name, policy in (("taylorseer", "taylorseer"), ("adaptive", AdaptiveTaylor(tolerance=0.05)), ("none", None))
    },
}


def _assert_same_on_every_rank(results: list[dict], key: str) -> None:
    for rank, result in enumerate(results[1:], 1):
        assert all(torch.equal(a, b) for a, b in zip(results[0][key], result[key])), f"{key}: rank {rank} differs"


# ----------------------------------------------------------------------------------------------
# CFG-parallel: exact
# ----------------------------------------------------------------------------------------------


def test_cfg_parallel_two_ranks_equals_one_process(tmp_path, model):
    """Text guidance on two ranks, a batch of two images of different sizes: the single-process
    latents, bitwise the same on both ranks, over guided and unguided steps. Against one process
    equal to float32 rounding, not bitwise: a rank's GEMMs have half the rows of the one process's
    (its branch alone), and whether the CPU's BLAS sums such rows in the same order depends on the
    CPU (bitwise on AVX2 / AVX-512 machines seen here, 3e-6 apart with AMX)."""
    results = _run_ranks(tmp_path, model, 2, "cfg2")
    _assert_same_on_every_rank(results, "cfg")
    _assert_same_on_every_rank(results, "unseeded")
    for a, b in zip(results[0]["cfg"], results[0]["single"]):
        assert_close(a, b, 1e-5, "two images")
    one = [r["one"] for r in results]
    _assert_same_on_every_rank(one, "cfg")
    assert_close(one[0]["cfg"][0], one[0]["single"][0], 1e-5, "one request")


def test_cfg_parallel_three_branches_equals_one_process(tmp_path, model):
    """Editing's three branches on three ranks, and the same with cfg=-1 spelled out: equal to
    float32 rounding to one process (as with two ranks)."""
    results = _run_ranks(tmp_path, model, 3, "cfg3")
    for key in ("cfg", str(BagelParallel(cfg=3))):
        _assert_same_on_every_rank(results, key)
        for a, b in zip(results[0][key], results[0]["single"]):
            assert_close(a, b, 1e-5, key)


# ----------------------------------------------------------------------------------------------
# Sequence-parallel (Ulysses): to float32 rounding
# ----------------------------------------------------------------------------------------------


def test_sequence_parallel_two_ranks(tmp_path, model):
    results = _run_ranks(tmp_path, model, 2, "sp2")
    for case, key in (("t2i", "sp"), ("edit", str({"sp": 2}))):
        per_case = [r[case] for r in results]
        _assert_same_on_every_rank(per_case, key)
        for a, b in zip(per_case[0][key], per_case[0]["single"]):
            assert_close(a, b, 1e-5, f"{case} sp=2")


def test_sequence_parallel_four_ranks_with_cfg(tmp_path, model):
    """cfg 2 x sp 2, sp 4 (two ranks per KV head), and batch 2 x cfg 2 for editing (three
    branches on two cfg groups)."""
    results = _run_ranks(tmp_path, model, 4, "sp4")
    for case, keys in (
        ("t2i", [str(BagelParallel(cfg=2, sp=2)), "sp"]),
        ("edit", [str(BagelParallel(cfg=2, sp=2)), str(BagelParallel(batch=2, cfg=2))]),
    ):
        per_case = [r[case] for r in results]
        for key in keys:
            _assert_same_on_every_rank(per_case, key)
            for a, b in zip(per_case[0][key], per_case[0]["single"]):
                assert_close(a, b, 1e-5, f"{case} {key}")


def test_step_caches_over_cfg_and_sequence_parallel_ranks(tmp_path, model):
    """Editing with each step cache on cfg 2 x sp 2 and on cfg 4 (a rank without a branch): every
    rank keeps its own branches' caches and gets one process's result with the same cache, to
    float32 rounding (so the same steps were predicted), bitwise alike on every rank."""
    results = _run_ranks(tmp_path, model, 4, "cache")
    keys = [str(BagelParallel(cfg=2, sp=2)), str(BagelParallel(cfg=4))]
    for name in ("taylorseer", "adaptive", "none"):
        per_cache = [r[name] for r in results]
        for key in keys:
            _assert_same_on_every_rank(per_cache, key)
            for a, b in zip(per_cache[0][key], per_cache[0]["single"]):
                assert_close(a, b, 1e-5, f"{name} {key}")
    for name in ("taylorseer", "adaptive"):  # the caches did predict: not the uncached latents
        cached, exact = results[0][name]["single"], results[0]["none"]["single"]
        assert max((a - b).abs().max().item() for a, b in zip(cached, exact)) > 1e-4, name


# ----------------------------------------------------------------------------------------------
# The public API: batch-parallel keeps the order; unseeded ranks agree
# ----------------------------------------------------------------------------------------------


def test_batch_parallel_api(tmp_path, model):
    """Three prompts over two ranks (2 + 1): every rank gets all three images, in order, equal to
    one process's; chat too (and a streamer follows a CFG-parallel chat). An unseeded
    CFG-parallel call gives the same image on both ranks."""
    import numpy as np

    results = _run_ranks(tmp_path, model, 2, "api")
    pixels = lambda image: np.asarray(image, dtype=np.int16)  # noqa: E731
    single = results[0]["single"]
    for rank, result in enumerate(results):
        assert len(result["batch"]) == 3
        for i, (image, expected) in enumerate(zip(result["batch"], single)):
            assert image.size == (48, 32)
            assert np.abs(pixels(image) - pixels(expected)).max() <= 1, f"rank {rank}, request {i}"
        assert np.abs(pixels(result["cfg"]) - pixels(single[0])).max() <= 1, f"rank {rank}, cfg"
        assert result["chat"] == results[0]["single_chat"], f"rank {rank}, chat"
        # an unseeded CFG-parallel chat goes through run_requests: the streamer still gets the answer
        ids, ended = result["streamed"]
        assert ended and ids[0] == 10 and len(ids) > 1, f"rank {rank}, streamer"
        assert result["streamed_chat"] == results[0]["single_chat"][0], f"rank {rank}, streamed chat"
    assert np.array_equal(pixels(results[0]["unseeded"]), pixels(results[1]["unseeded"]))
    assert np.abs(pixels(single[0]) - pixels(single[1])).max() > 1  # the requests differ


# ----------------------------------------------------------------------------------------------
# On GPUs (NCCL, bf16): skipped with fewer than 2
# ----------------------------------------------------------------------------------------------


def _gpu_rank_main(rank: int, world: int, store: str, out: str, checkpoint: str) -> None:
    """One spawned rank of the GPU test (CUDA cannot be forked): the tiny model in bf16 on cuda:rank."""
    from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = BagelForUnifiedMultimodal.from_pretrained(checkpoint).to(f"cuda:{rank}", torch.bfloat16)
        layouts = ["cfg", "sp"] if world == 2 else [BagelParallel(cfg=2, sp=2), "sp", BagelParallel(batch=2, cfg=2)]
        result = {"t2i": _t2i(model, rank, layouts, 2), "edit": _edit(model, rank, layouts)}
    finally:
        dist.destroy_process_group()
    cpu = lambda d: {k: cpu(v) if isinstance(v, dict) else [x.float().cpu() for x in v] for k, v in d.items()}  # noqa: E731
    torch.save(cpu(result), f"{out}/{rank}.pt")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs")
def test_parallel_layouts_on_gpus(tmp_path, parity):
    """Every layout that fits 2 (or 4) GPUs: the same latents on every rank, and one GPU's to bf16
    rounding (the largest relative difference is printed: pytest -s)."""
    world = 4 if torch.cuda.device_count() >= 4 else 2
    mp.spawn(_gpu_rank_main, args=(world, str(tmp_path / "store"), str(tmp_path), str(parity.checkpoint)), nprocs=world)
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(world)]
    for case in ("t2i", "edit"):
        per_case = [r[case] for r in results]
        for key in (k for k in per_case[0] if k not in ("single", "unseeded")):
            _assert_same_on_every_rank(per_case, key)
            for a, b in zip(per_case[0][key], per_case[0]["single"]):
                print(f"{case} {key}: max |diff| / max |ref| = {((a - b).abs().max() / b.abs().max()).item():.2e}")
                assert_close(a, b, 5e-2, f"{case} {key}")


# ----------------------------------------------------------------------------------------------
# Bad layouts: clear errors
# ----------------------------------------------------------------------------------------------


def test_layout_sizes():
    assert BagelParallel(cfg=-1).sizes(4) == (1, 4, 1)
    assert BagelParallel(cfg=2, sp=-1).sizes(8) == (1, 2, 4)
    assert BagelParallel(batch=2, cfg=2).sizes(4) == (2, 2, 1)
    with pytest.raises(ValueError, match="does not fit the 4 ranks"):
        BagelParallel(cfg=3).sizes(4)
    with pytest.raises(ValueError, match="does not fit the 4 ranks"):
        BagelParallel(cfg=3, sp=-1).sizes(4)
    with pytest.raises(ValueError, match="positive"):
        BagelParallel(cfg=0).sizes(4)


def test_ulysses_heads():
    assert ulysses_kv_heads(28, 4, 4) == [0, 1, 2, 3]  # BAGEL-7B: 7 query heads, one KV head a rank
    assert ulysses_kv_heads(28, 4, 2) == [0, 1, 2, 3]  # 14 query heads, two KV heads a rank
    assert ulysses_kv_heads(4, 2, 4) == [0, 0, 1, 1]  # two ranks per KV head
    with pytest.raises(ValueError, match=r"use sp in \[2, 4, 28\]"):
        ulysses_kv_heads(28, 4, 7)


def test_bad_parallel_argument():
    with pytest.raises(ValueError, match="use 'batch', 'cfg' or 'sp'"):
        ParallelLayout.of("tensor", "cpu")
    with pytest.raises(ValueError, match="use 'batch', 'cfg' or 'sp'"):
        ParallelLayout.of({"cfg": 2, "tp": 2}, "cpu")


def test_parallel_outside_a_distributed_job(monkeypatch):
    if dist.is_initialized():
        pytest.skip("a process group is already running")
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        ParallelLayout.of("cfg", "cpu")
