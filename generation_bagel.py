"""BAGEL inference on `BagelForUnifiedMultimodal`: context building, text decoding and image
generation with classifier-free guidance, and the high-level API (`chat`, `generate_image`,
`edit_image`, `interleave`). Each public method checks its arguments first, with
validation_bagel.py's checkers.

The parts live beside it: contexts and cache steps (contexts_bagel.py), the decode engine
(decoding_bagel.py), guidance and the sampler (guidance_bagel.py), step caches
(step_cache_bagel.py), several GPUs (parallel_bagel.py). One forward serves all sequences of a
batch, and the guidance branches of an image generation step run as extra sequences of the same
forward.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import torch
import torch.nn as nn
from transformers.utils import logging

from .attention_bagel import AttentionPlan, TokenRoute
from .autoencoder_bagel import patchify_latent, unpatchify_latent
from .contexts_bagel import BagelContext, CacheStep, SpecialTokenIds, advance
from .decoding_bagel import DecodeCache, DecodePool, DecodeRunner, capacity_bucket, sample_tokens
from .generation_config_bagel import IMAGE_TASKS, TEXT, BagelGenerationConfig, sampling_defaults
from .guidance_bagel import FlowMatchEulerSampler, GuidanceParams, StepCacheBranches, guide, request_generators
from .ops_bagel import capturable
from .parallel_bagel import ParallelLayout, parallel_velocity
from .processing_bagel import check_image_size, get_resize_size, latent_position_ids
from .step_cache_bagel import resolve_step_cache
from .validation_bagel import (
    check_bool,
    check_choice,
    check_contexts,
    check_embedded_ids,
    check_fits_context,
    check_generators,
    check_image_sizes,
    check_image_tensors,
    check_instance,
    check_int,
    check_interleave_inputs,
    check_latent_grid,
    check_processor,
    check_prompts,
    check_sampling,
    check_streamer,
    check_tensor_shapes,
    check_token_ids,
)

logger = logging.get_logger(__name__)

VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here"
)
GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> "
    "image here"
)


def execution_device(module: nn.Module) -> torch.device:
    """Where `module` computes: its accelerate hook's execution device when transformers
    dispatched it (a `device_map` over several devices or offloaded; offloaded weights sit on the
    meta device), else the device of its first parameter."""
    hook = getattr(module, "_hf_hook", None)
    for each in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
        device = getattr(each, "execution_device", None)
        if device is not None:
            return torch.device(device)
    return next(module.parameters()).device


_POOL_CREATION_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------
# The mixin: context operations and generation on BagelForUnifiedMultimodal
# ----------------------------------------------------------------------------------------------


class BagelGenerationMixin:
    """Inference API of `BagelForUnifiedMultimodal` (needs `self.model`, `self.config`, `self.vae`)."""

    # transformers builds `self.generation_config` from it; `from_pretrained` reads generation_config.json into it
    generation_config_class = BagelGenerationConfig

    def default_sampling_arguments(self, task: str | None = None) -> dict[str, Any]:
        """What a call that leaves its sampling arguments out uses, by name: for `task`
        "image_generation" (generate_image) or "image_editing" (edit_image) its guidance arguments
        and the text ones, for None (chat, interleave) the text ones; from `self.generation_config`,
        else BAGEL's defaults."""
        if task is not None:
            check_choice("task", task, IMAGE_TASKS, fix="Or None for the text arguments of chat and interleave.")
        return self._sampling_arguments(task, dict.fromkeys([*IMAGE_TASKS.get(task, {}), *TEXT]))

    def _sampling_arguments(self, task: str | None, given: dict[str, Any]) -> dict[str, Any]:
        """The call's sampling arguments by name, each None taken from `self.generation_config` (for
        image arguments its `task` dict), else BAGEL's default (generation_config_bagel.py)."""
        return sampling_defaults(getattr(self, "generation_config", None), task, given)

    def _sampling(self, task: str | None, **given):
        """`_sampling_arguments`' values, in the order given (one value alone)."""
        values = self._sampling_arguments(task, given)
        return values.values() if len(values) > 1 else next(iter(values.values()))

    # --- contexts --------------------------------------------------------------------------------

    def new_context(self, batch_size: int = 1) -> BagelContext:
        """An empty context for `batch_size` sequences."""
        batch_size = check_int("batch_size", batch_size, minimum=1)
        text = self.config.text_config
        head_dim = text.hidden_size // text.num_attention_heads
        dtype = self.get_input_embeddings().weight.dtype
        empty = torch.zeros(0, text.num_key_value_heads, head_dim, dtype=dtype, device=self._main_device())
        layers = text.num_hidden_layers
        return BagelContext((empty,) * layers, (empty,) * layers, (0,) * batch_size, (0,) * batch_size)

    def _forward_step(
        self,
        context: BagelContext,
        embeds: torch.Tensor,
        new_lengths: list[int],
        position_ids: torch.Tensor,
        causal: bool,
        gen_index: torch.Tensor | None = None,
        store: bool = True,
        shard=None,
        final_norm: bool = True,
    ) -> tuple[torch.Tensor, BagelContext | None]:
        """Run new tokens (packed, sequence after sequence) against the context.
        Returns the last hidden state (N, hidden) (before the final norm without `final_norm`)
        and, with `store`, the extended context.
        `shard` (parallel_bagel's sequence parallelism, without `store`) runs only this rank's
        slice of the new tokens and gathers the hidden states of all of them."""
        if len(new_lengths) != context.batch_size:
            raise ValueError(f"Got inputs for {len(new_lengths)} sequences but the context holds {context.batch_size}.")
        plan = AttentionPlan.segments(new_lengths, [o + n for o, n in zip(context.lengths, new_lengths)], causal)
        if shard is None:
            step = CacheStep(context, new_lengths, store)
        else:
            embeds, position_ids, gen_index, step = shard.local(context, embeds, new_lengths, position_ids, gen_index)
        route = TokenRoute(embeds.shape[0], gen_index)
        hidden = self.model.language_model.model(embeds, position_ids, plan, route, cache=step, final_norm=final_norm)
        if shard is not None:
            hidden = shard.gather(hidden)
        if not store:
            return hidden, None
        lengths = tuple(o + n for o, n in zip(context.lengths, new_lengths))
        return hidden, BagelContext(tuple(step.keys), tuple(step.values), lengths, context.positions)

    def _embed_ids(self, ids: list[int]) -> torch.Tensor:
        embed = self.get_input_embeddings()
        return embed(torch.tensor(ids, dtype=torch.long, device=self._main_device()))

    def _image_blocks(
        self, payloads: list[torch.Tensor], special: SpecialTokenIds
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Wrap each sequence's image tokens (n_b, hidden) as [start] tokens [end], packed.
        Returns the embeddings (sum(n_b + 2), hidden) and the rows holding image tokens."""
        device = payloads[0].device
        marker_rows, payload_rows, start = [], [], 0
        for p in payloads:
            marker_rows += [start, start + p.shape[0] + 1]
            payload_rows.append(torch.arange(start + 1, start + 1 + p.shape[0], device=device))
            start += p.shape[0] + 2
        check_embedded_ids(special, self.get_input_embeddings().num_embeddings, "start_of_image", "end_of_image")
        markers = self._embed_ids([special.start_of_image, special.end_of_image] * len(payloads))
        payload_rows = torch.cat(payload_rows)
        embeds = markers.new_empty(start, markers.shape[1])
        embeds = embeds.index_copy(0, torch.tensor(marker_rows, device=device), markers)
        return embeds.index_copy(0, payload_rows, torch.cat(payloads).to(markers.dtype)), payload_rows

    @staticmethod
    def _block_positions(context: BagelContext, lengths: list[int], device) -> torch.Tensor:
        """Every token of a sequence's image block sits at that sequence's next rope position."""
        return torch.repeat_interleave(
            torch.tensor(context.positions, device=device), torch.tensor(lengths, device=device)
        )

    @torch.no_grad()
    def add_text_tokens(
        self, context: BagelContext, token_ids: list[list[int]], special: SpecialTokenIds
    ) -> BagelContext:
        """Append `[bos] + ids + [eos]` to each sequence (causal, UND weights)."""
        batch = _check_context(context, special)
        vocab = self.get_input_embeddings().num_embeddings
        check_token_ids(token_ids, batch, vocab)
        check_embedded_ids(special, vocab, "bos", "eos")
        sequences = [[special.bos, *ids, special.eos] for ids in token_ids]
        embeds = self._embed_ids([t for s in sequences for t in s])
        positions = torch.cat([torch.arange(p, p + len(s)) for p, s in zip(context.positions, sequences)]).to(
            embeds.device
        )
        lengths = [len(s) for s in sequences]
        _, new = self._forward_step(context, embeds, lengths, positions, causal=True)
        return advance(new, lengths)

    @torch.no_grad()
    def add_vit_images(
        self, context: BagelContext, images: list[torch.Tensor], special: SpecialTokenIds
    ) -> BagelContext:
        """Append one image per sequence through the ViT path. `images` are (3, H, W) tensors in
        [-1, 1] with H, W multiples of the patch size (see `BagelProcessor.vit_transform`)."""
        from .processing_bagel import patchify_vit

        check_image_tensors("images", images, _check_context(context, special), "Use processor.vit_transform(image).")
        device = self._main_device()
        patches = [
            patchify_vit(img, self.config.vit_patch_size, self.config.vit_max_num_patch_per_side) for img in images
        ]
        pixels = torch.cat([p for p, _ in patches]).to(device)
        pos_ids = torch.cat([i for _, i in patches]).to(device)
        seqlens = [p.shape[0] for p, _ in patches]
        vit = self.model.embed_vit_tokens(pixels, pos_ids, torch.tensor(seqlens)).split(seqlens)
        embeds, _ = self._image_blocks(list(vit), special)
        lengths = [n + 2 for n in seqlens]
        _, new = self._forward_step(
            context, embeds, lengths, self._block_positions(context, lengths, device), causal=False
        )
        return advance(new, [1] * len(lengths))

    @torch.no_grad()
    def add_vae_images(
        self, context: BagelContext, images: list[torch.Tensor], special: SpecialTokenIds
    ) -> BagelContext:
        """Append one image per sequence through the VAE path (clean latent, t = 0, GEN weights).
        `images` are (3, H, W) tensors in [-1, 1] with H, W multiples of 16."""
        check_image_tensors("images", images, _check_context(context, special), "Use processor.vae_transform(image).")
        self._require_generation()
        device, vae_device = self._main_device(), execution_device(self.vae.encoder.conv_in)
        tokens, pos_ids = [], []
        for img in images:
            h, w = self._latent_grid(img.shape[-2], img.shape[-1])
            latent = self.vae.encode(img[None].to(vae_device, self.vae.encoder.conv_in.weight.dtype))[0].to(device)
            tokens.append(patchify_latent(latent, self.config.latent_patch_size))
            pos_ids.append(latent_position_ids(h, w, self.config.max_latent_size, device))
        x0, pos = torch.cat(tokens), torch.cat(pos_ids)
        latent_embeds = self.model.embed_latent_tokens(x0, torch.zeros(x0.shape[0], device=device), pos)
        embeds, gen_rows = self._image_blocks(list(latent_embeds.split([t.shape[0] for t in tokens])), special)
        lengths = [t.shape[0] + 2 for t in tokens]
        positions = self._block_positions(context, lengths, device)
        _, new = self._forward_step(context, embeds, lengths, positions, causal=False, gen_index=gen_rows)
        return advance(new, [1] * len(lengths))

    # --- text ------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_text_ids(
        self,
        context: BagelContext,
        special: SpecialTokenIds,
        max_length: int = 500,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | list[torch.Generator | None] | None = None,
        return_logits: bool = False,
        streamer=None,
    ):
        """Decode every sequence from bos until eos or `max_length` ids (bos included, eos not,
        as the reference returns them). Returns a list of id lists, and with `return_logits` the
        list of per-step logits (steps, vocab) of each sequence. `generator` may be one per
        sequence, so that sampled text does not depend on what else is in the batch.
        `streamer` (one sequence only) is a transformers streamer (`TextStreamer`,
        `TextIteratorStreamer`): as `generate()` does, it gets the prompt first (here the bos
        that decoding starts from; `skip_prompt=True` skips it), then each id as the host reads
        it (eos not included), then `end()`.

        The decode cache and CUDA graph of each shape are kept for later calls (see
        `clear_generation_cache`). Calls from several threads on one model take turns: each
        gets what it would get alone."""
        batch = _check_context(context, special)
        max_length = check_int("max_length", max_length, minimum=1)
        check_sampling(do_sample, temperature, top_p)
        return_logits = check_bool("return_logits", return_logits)
        check_streamer(streamer, batch)
        generators = check_generators(generator, batch)
        check_fits_context(
            [n + max_length for n in context.lengths],
            self._context_limit(),
            "max_length",
            f"Lower max_length to at most {self._context_limit() - max(context.lengths)}.",
        )
        outputs = [[special.bos] for _ in range(batch)]
        step_logits: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        active = set(range(batch))
        if streamer is not None:
            streamer.put(torch.tensor([special.bos]))

        def take(ids: torch.Tensor, ready: torch.cuda.Event | None, logits: torch.Tensor | None) -> bool:
            """Record one step's tokens; False once every sequence has finished."""
            if ready is not None:
                ready.synchronize()
            # This step's tokens are on the host here, in decoding order (where a streamer gets them).
            for seq, token in enumerate(ids.tolist()):
                if seq not in active:  # finished sequences keep stepping (static shapes); ignore them
                    continue
                if return_logits:
                    step_logits[seq].append(logits[seq])
                if token == special.eos or len(outputs[seq]) == max_length:
                    active.discard(seq)
                else:
                    outputs[seq].append(token)
                    if streamer is not None:
                        streamer.put(torch.tensor([token]))
            return bool(active)

        pool = self._decode_pool()
        with pool.lock:
            runner = self._decode_runner(pool, context, max(context.lengths) + max_length)
            runner.start(context, special.bos)
            queued = deque()  # steps whose tokens the host has not read yet
            for _ in range(max_length):
                logits = runner.step()
                if do_sample:
                    runner.tokens.copy_(sample_tokens(logits, temperature, top_p, generators))
                queued.append((*runner.tokens_to_host(), logits.clone() if return_logits else None))
                if len(queued) > runner.lag and not take(*queued.popleft()):
                    break
            else:
                while queued and take(*queued.popleft()):
                    pass
            runner.finish()
            if runner not in pool.runners.values():  # served this call only: wait, then drop it
                runner.release()
        if streamer is not None:
            streamer.end()
        if return_logits:
            return outputs, [torch.stack(rows) for rows in step_logits]
        return outputs

    def clear_generation_cache(self) -> None:
        """Free the decode caches and CUDA graphs kept for reuse by `generate_text_ids` (and so by
        `chat` and `interleave`). Moving or casting the model (`.to`, `.half`, ...) does it too."""
        pool = self.__dict__.get("_generation_pool")
        if pool is not None:
            with pool.lock:
                pool.clear()

    def set_generation_cache_limits(self, max_entries: int = 16, max_bytes: int | None = None) -> None:
        """How much `generate_text_ids` keeps for reuse: at most `max_entries` decode shapes (batch
        size, cache length bucket) and `max_bytes` of KV cache (None: an eighth of the GPU's memory;
        1 GiB on the CPU). 0 entries keeps nothing."""
        max_entries = check_int("max_entries", max_entries, minimum=0)
        max_bytes = (
            None if max_bytes is None else check_int("max_bytes", max_bytes, minimum=0, fix="None: the default.")
        )
        pool = self._decode_pool()
        with pool.lock:
            pool.max_entries, pool.max_bytes = max_entries, max_bytes
            pool.clear()

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting the weights makes the captured graphs and the caches stale: free them.
        self.clear_generation_cache()
        return super()._apply(fn, *args, **kwargs)

    def _decode_pool(self) -> DecodePool:
        with _POOL_CREATION_LOCK:  # in __dict__, not a submodule or a buffer: nothing to save or move
            return self.__dict__.setdefault("_generation_pool", DecodePool())

    def _can_graph(self, device: torch.device) -> bool:
        """Whether the decode step may run as a CUDA graph (`ops_bagel.capturable`): models spread
        over devices, offloaded or in bitsandbytes 8-bit decode eagerly."""
        return capturable(self.model.language_model, device)

    def _decode_runner(self, pool: DecodePool, context: BagelContext, rows: int) -> DecodeRunner:
        """The pooled runner for this context's batch size and `rows` cache rows per sequence."""
        like, batch, layers = context.keys[0], context.batch_size, len(context.keys)
        graphed = self._can_graph(like.device)
        capacity = capacity_bucket(rows)
        nbytes = 2 * layers * batch * capacity * like.shape[1] * like.shape[2] * like.element_size()
        weights = tuple((p.data_ptr(), p.dtype) for p in self.model.language_model.parameters())

        def build() -> DecodeRunner:
            cache = DecodeCache(batch, capacity, layers, like)
            tokens = torch.zeros(batch, dtype=torch.long, device=like.device)
            streams = pool.graph_streams(like.device) if graphed else None
            return DecodeRunner(self._decode_step_fn(cache, tokens), cache, tokens, streams, pool.count_capture)

        attention = self.config._attn_implementation  # a captured step keeps the attention it was captured with
        return pool.get((batch, capacity, like.dtype, like.device, graphed, attention), nbytes, weights, build)

    def _decode_step_fn(self, cache: DecodeCache, tokens: torch.Tensor):
        """A step reading `tokens` (B,): advances the cache, writes the greedy next tokens back into
        `tokens` and returns the next-token logits (B, vocab) in float32. Embedding, decoder, lm
        head and argmax all run inside it (inside the graph on the GPU)."""
        decoder, embed, head = (
            self.model.language_model.model,
            self.get_input_embeddings(),
            self.get_output_embeddings(),
        )
        route = TokenRoute(tokens.shape[0])

        def step() -> torch.Tensor:
            cache.begin_step()
            hidden = decoder(embed(tokens), cache.positions, None, route, cache=cache)
            cache.end_step()
            logits = head(hidden).float()
            tokens.copy_(logits.argmax(dim=-1))
            return logits

        return step

    def _main_device(self) -> torch.device:
        """Where generation starts: the device the token embeddings compute on."""
        return execution_device(self.get_input_embeddings())

    # --- images ----------------------------------------------------------------------------------

    def _require_generation(self) -> None:
        if not self.config.visual_gen or self.vae is None:
            raise ValueError(
                "Image generation and VAE inputs need a stage-2 model with its VAE: load it with stage=2 "
                "from a checkpoint that has ae.safetensors."
            )

    def _largest_image_side(self, processor) -> int:
        """The largest image side this checkpoint generates: what its latent position table
        (`max_latent_size`) covers, at most the processor's VAE size (1024 for BAGEL-7B-MoT)."""
        stride = self.config.vae_token_stride
        return min(processor.vae_max_size // stride, self.config.max_latent_size) * stride

    def _latent_stride(self) -> tuple[int, int]:
        """Pixels per latent token side, and the most tokens a side (`max_latent_size`)."""
        return self.config.vae_token_stride, self.config.max_latent_size

    def _latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """Image size in pixels -> latent token grid, with clear errors."""
        return check_latent_grid(height, width, *self._latent_stride())

    def _latent_dim(self) -> int:
        """Values of one latent token: p * p * C."""
        return self.config.latent_patch_size**2 * self.model.latent_channel

    @torch.no_grad()
    def generate_latents(
        self,
        context: BagelContext,
        cfg_text_context: BagelContext,
        cfg_img_context: BagelContext,
        image_sizes: list[tuple[int, int]],
        special: SpecialTokenIds,
        params: GuidanceParams = GuidanceParams(),
        init_noise: list[torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        progress: bool = False,
        parallel=None,
        step_cache=None,
    ) -> list[torch.Tensor]:
        """Flow-matching sampling of one image per sequence. `image_sizes` are (height, width) in
        pixels; returns the final latent tokens (h*w, p*p*C) of each sequence. `parallel` spreads
        the guidance branches and the latent tokens over processes (see parallel_bagel.py); every
        process then returns the same latents. `step_cache` ("taylorseer", "adaptive" or a policy
        of step_cache_bagel.py) predicts some steps' decoder output instead of computing it; its
        state lives for this call only."""
        policy = resolve_step_cache(step_cache)
        self._require_generation()
        contexts = dict(context=context, cfg_text_context=cfg_text_context, cfg_img_context=cfg_img_context)
        batch = check_contexts(contexts, BagelContext)
        check_instance("params", params, GuidanceParams)
        grids = check_image_sizes("image_sizes", image_sizes, batch, *self._latent_stride())
        counts, dim = [h * w for h, w in grids], self._latent_dim()
        if init_noise is not None:
            check_tensor_shapes("init_noise", init_noise, [(n, dim) for n in counts])
        progress = check_bool("progress", progress)
        check_generators([generator], 1)
        device = self._main_device()
        if init_noise is None:
            init_noise = [
                torch.randn(n, dim, generator=generator, device=generator.device if generator else "cpu")
                for n in counts
            ]
        x = torch.cat([n.float() for n in init_noise]).to(device)
        pos = torch.cat([latent_position_ids(h, w, self.config.max_latent_size, device) for h, w in grids])
        seq_of_token = torch.repeat_interleave(
            torch.arange(len(counts), device=device), torch.tensor(counts, device=device)
        )

        guided = params.cfg_text_scale > 1.0
        branches = [context] + ([cfg_text_context] if guided else [])
        branches += [cfg_img_context] if guided and params.cfg_img_scale > 1.0 else []
        sampler = FlowMatchEulerSampler(params)
        timesteps = sampler.timesteps
        dtype = self.get_input_embeddings().weight.dtype
        run = policy.start(timesteps, lambda hidden: self._velocity_head(hidden.to(dtype))) if policy else None
        try:
            if parallel is None:
                velocity = self._guided_velocity(branches, pos, counts, special, params, seq_of_token, run)
            else:
                x, velocity = parallel_velocity(
                    self, parallel, x, branches, pos, counts, special, params, seq_of_token, run
                )
            steps = range(sampler.num_steps)
            if progress:
                from tqdm.auto import tqdm

                steps = tqdm(steps, desc="Denoising", total=len(steps))
            for i in steps:
                t = timesteps[i]
                x = sampler.step(velocity(x, t, guided and sampler.guides(t)), i, x)
        finally:
            if run is not None:  # its tensors go now, even if something still holds the run
                run.close()
        return list(x.split(counts))

    def _guided_velocity(self, branches: list[BagelContext], pos, counts, special, params, seq_of_token, run=None):
        """`velocity(x, t, use_cfg)` of one flow step: with `use_cfg` every guidance branch (one
        forward for all) combined by `guide`, else the full-context branch alone. `run`: a step
        cache's state (step_cache_bagel.py), consulted per step and branch."""
        if run is not None:
            cached = StepCacheBranches(self, run, dict(enumerate(branches)), pos, counts, special)

            def velocity(x: torch.Tensor, t: float, use_cfg: bool) -> torch.Tensor:
                if not use_cfg:
                    return cached([0], x, t)[0]
                return guide(cached(list(range(len(branches))), x, t), params, seq_of_token, counts)

            return velocity
        all_branches = BagelContext.concat(branches)

        def velocity(x: torch.Tensor, t: float, use_cfg: bool) -> torch.Tensor:
            if not use_cfg:
                return self._predict_velocity(branches[0], x, t, pos, counts, 1, special)
            n = len(branches)
            velocities = self._predict_velocity(all_branches, x, t, pos, counts, n, special).chunk(n)
            return guide(velocities, params, seq_of_token, counts)

        return velocity

    def _predict_velocity(self, context, x, t, pos, counts, n_branches, special, shard=None) -> torch.Tensor:
        """One flow step's velocity for every sequence of `context`: the latents x (N, p*p*C) of
        the B images, repeated for each of the `n_branches` guidance branches (B sequences each).
        `shard`: sequence parallelism (`_forward_step`)."""
        return self.model.llm2vae(self._latent_hidden(context, x, t, pos, counts, n_branches, special, shard)).float()

    def _velocity_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Latent tokens' decoder output before the final norm (N, hidden) -> velocity (N, p*p*C)."""
        return self.model.llm2vae(self.model.language_model.model.norm_moe_gen(hidden)).float()

    def _latent_hidden(self, context, x, t, pos, counts, n_branches, special, shard=None, final_norm=True):
        """The decoder's output (N * n_branches, hidden) for the latent tokens of `_predict_velocity`,
        after the final norm or, without `final_norm`, before it."""
        x_all, pos_all = x.repeat(n_branches, 1), pos.repeat(n_branches)
        timestep = torch.full((x_all.shape[0],), t, device=x.device)
        latents = self.model.embed_latent_tokens(x_all, timestep, pos_all)
        embeds, gen_rows = self._image_blocks(list(latents.split(counts * n_branches)), special)
        lengths = [n + 2 for n in counts * n_branches]
        positions = self._block_positions(context, lengths, x.device)
        hidden, _ = self._forward_step(
            context,
            embeds,
            lengths,
            positions,
            causal=False,
            gen_index=gen_rows,
            store=False,
            shard=shard,
            final_norm=final_norm,
        )
        return hidden[gen_rows]

    @torch.no_grad()
    def decode_latents(
        self, latent_tokens: list[torch.Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[torch.Tensor]:
        """Latent tokens -> (1, C, 2h, 2w) latents -> VAE decode -> (1, 3, H, W) images in ~[-1, 1]."""
        self._require_generation()
        grids = check_image_sizes("image_sizes", image_sizes, None, *self._latent_stride())
        shapes = [(h * w, self._latent_dim()) for h, w in grids]
        check_tensor_shapes("latent_tokens", latent_tokens, shapes, "One per (height, width) of image_sizes.")
        p = self.config.latent_patch_size
        images = []
        for tokens, (h, w) in zip(latent_tokens, grids):
            latent = unpatchify_latent(tokens, h, w, p)[None]
            conv_in = self.vae.decoder.conv_in
            images.append(self.vae.decode(latent.to(execution_device(conv_in), conv_in.weight.dtype)))
        return images

    # --- the high-level API -------------------------------------------------------------------

    def _processor(self, processor):
        """`processor`, else the model's own (loaded with it)."""
        return check_processor(processor if processor is not None else getattr(self, "processor", None))

    def _context_limit(self) -> int:
        """Tokens a sequence may hold: the language model's `max_position_embeddings`."""
        return int(self.config.text_config.max_position_embeddings)

    def _check_prompt_fits(
        self, batch, processor, think, understanding_output, max_new_tokens, vae_max_size, sizes
    ) -> int:
        """Count the tokens each request of `interleave` will hold (its text, its images at their
        resized sizes, the image it generates) from the text and image sizes alone, and refuse it
        before anything is computed when that outgrows the model's context. Returns how many
        tokens decoding may add: `max_new_tokens`, or what is left of the context (with a warning)."""
        generating = not understanding_output
        vae_min = min(processor.vae_min_size, vae_max_size)
        vae_rule = (vae_max_size, vae_min, processor.vae_stride, processor.max_pixels)
        vit_rule = (processor.vit_max_size, processor.vit_min_size, processor.vit_stride, processor.max_pixels)
        system = VLM_THINK_SYSTEM_PROMPT if understanding_output else GEN_THINK_SYSTEM_PROMPT
        prompt_tokens, image_tokens = [], []
        for request in batch:
            n = len(processor.encode_text(system)) + 2 if think else 0
            height, width = sizes[0]
            for item in request:
                if isinstance(item, str):
                    n += len(processor.encode_text(item)) + 2
                    continue
                check_image_size(item)
                w, h = get_resize_size(*item.size, *vae_rule)
                vit_w, vit_h = get_resize_size(w, h, *vit_rule)
                n += (vit_w // processor.vit_patch_size) * (vit_h // processor.vit_patch_size) + 2
                if generating:  # resized a second time for the VAE, as the reference does
                    w2, h2 = get_resize_size(w, h, *vae_rule)
                    n += (w2 // self.config.vae_token_stride) * (h2 // self.config.vae_token_stride) + 2
                    height, width = h, w
            prompt_tokens.append(n)
            if generating:
                grid_h, grid_w = self._latent_grid(height, width)
                image_tokens.append(grid_h * grid_w + 2)
        fixed = [n + (image_tokens[i] if generating else 0) for i, n in enumerate(prompt_tokens)]
        # Decoding adds up to max_new_tokens ids after a bos (then, before an image, [bos] ids [eos]);
        # the prompt must leave room for one of them at least.
        decodes = understanding_output or think
        overhead = 0 if not decodes else (1 if understanding_output else 2)
        check_fits_context(
            [n + overhead + (1 if decodes else 0) for n in fixed],
            self._context_limit(),
            "prompt",
            "Shorten the prompt or give fewer or smaller images.",
        )
        room = self._context_limit() - max(fixed) - overhead
        if decodes and max_new_tokens > room:
            logger.warning(
                "max_new_tokens=%d (max_think_tokens of generate_image / edit_image) does not fit the model's context "
                "of %d tokens after this prompt: decoding stops after %d tokens.",
                max_new_tokens,
                self._context_limit(),
                room,
            )
            return room
        return max_new_tokens

    @torch.no_grad()
    def interleave(
        self,
        inputs: list,
        understanding_output: bool = False,
        think: bool = False,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        height: int | None = None,
        width: int | None = None,
        params: GuidanceParams = GuidanceParams(),
        seed: int | list[int] | None = None,
        progress: bool = True,
        processor=None,
        parallel=None,
        streamer=None,
        step_cache=None,
    ) -> list:
        """The reference's interleaved inference: `inputs` is a list of strings and PIL images (or a
        list of such lists, all of the same shape, for a batch). Returns what the model produces:
        `[text]` with `understanding_output`, else `[image]` (`[thinking, image]` with `think`);
        a list of those for a batch. Images in the input are resized by the VAE rule first (at
        most the largest side the checkpoint generates); a generated image then has the size of
        the last input image, else `height` x `width` (default: the largest square the checkpoint
        generates, 1024 x 1024 for BAGEL-7B-MoT). `seed` (one per request, or one int: request i
        uses seed + i) makes sampling reproducible and independent of batching. `parallel`
        ("batch", "cfg", "sp" or a dict of sizes, in a torchrun launch) spreads the work over
        processes; see parallel_bagel.py. `streamer` (one request) gets the generated text as it
        is decoded (see `generate_text_ids`). `step_cache` ("taylorseer", "adaptive" or a policy of
        step_cache_bagel.py): predict some denoising steps instead of computing them (README,
        "Faster generation"). Every argument is checked first; a request that does not fit the
        context (`text_config.max_position_embeddings` tokens) is refused before any work, and
        decoding that would run past it stops at its end (with a warning). `max_new_tokens`,
        `do_sample`, `temperature`, `top_p` not given come from `model.generation_config`
        (`max_think_tokens`, ...: 1000, greedy, 0.3, 1.0 without a generation_config.json)."""
        max_new_tokens, do_sample, temperature, top_p = self._sampling(
            None, max_think_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p
        )
        resolve_step_cache(step_cache)  # its own check, before any work
        processor = self._processor(processor)
        batch, batched = check_interleave_inputs(
            inputs,
            understanding_output,
            think,
            max_new_tokens,
            do_sample,
            temperature,
            top_p,
            height,
            width,
            seed,
            progress,
            streamer,
        )
        check_instance("params", params, GuidanceParams)
        if parallel is not None:
            parallel = ParallelLayout.of(parallel, self.device)
            if parallel.spreads_requests(seed):  # each batch group runs its share, with seeds all agree on
                run = lambda requests, seeds, inner: self.interleave(  # noqa: E731
                    requests,
                    understanding_output=understanding_output,
                    think=think,
                    max_new_tokens=max_new_tokens,
                    do_sample=do_sample,
                    temperature=temperature,
                    top_p=top_p,
                    height=height,
                    width=width,
                    params=params,
                    seed=seeds,
                    progress=progress,
                    processor=processor,
                    parallel=inner,
                    streamer=streamer,
                    step_cache=step_cache,
                )
                outputs = parallel.run_requests(run, batch, seed)
                return outputs if batched else outputs[0]
        special = SpecialTokenIds(
            processor.bos_token_id, processor.eos_token_id, processor.start_of_image_id, processor.end_of_image_id
        )
        generators = request_generators(seed, len(batch))
        vae_max_size = processor.vae_max_size
        if not understanding_output:
            self._require_generation()
            vae_max_size = self._largest_image_side(processor)
            height = vae_max_size if height is None else height
            width = vae_max_size if width is None else width
        sizes = [(height, width)] * len(batch)
        max_new_tokens = self._check_prompt_fits(
            batch, processor, think, understanding_output, max_new_tokens, vae_max_size, sizes
        )
        gen = self.new_context(len(batch))
        cfg_text = cfg_img = gen
        if think:
            prompt = VLM_THINK_SYSTEM_PROMPT if understanding_output else GEN_THINK_SYSTEM_PROMPT
            gen = cfg_img = self.add_text_tokens(gen, [processor.encode_text(prompt)] * len(batch), special)
        for items in zip(*batch):
            if isinstance(items[0], str):
                ids = [processor.encode_text(text) for text in items]
                cfg_text, shared = gen, cfg_img is gen  # no text branch: the context before this text
                gen = self.add_text_tokens(gen, ids, special)
                cfg_img = gen if shared else self.add_text_tokens(cfg_img, ids, special)
            else:
                # the processor's VAE rule, within what this checkpoint generates
                images = [processor.vae_resize(img, vae_max_size) for img in items]
                if not understanding_output:  # resized twice, as the reference does (its vae_transform resizes)
                    gen = self.add_vae_images(
                        gen, [processor.vae_transform(img, vae_max_size) for img in images], special
                    )
                gen = self.add_vit_images(gen, [processor.vit_transform(img) for img in images], special)
                sizes = [(img.height, img.width) for img in images]
                cfg_text = gen
        if not understanding_output:
            for h, w in sizes:
                self._latent_grid(h, w)
        outputs: list[list] = [[] for _ in batch]
        if understanding_output or think:
            texts = self.generate_text_ids(
                gen,
                special,
                max_length=max_new_tokens + 1,
                do_sample=do_sample,
                temperature=temperature,
                top_p=top_p,
                generator=generators,
                streamer=streamer,
            )
            for out, ids in zip(outputs, texts):
                out.append(processor.decode(ids[1:]))
            if understanding_output:
                return outputs if batched else outputs[0]
            gen = self.add_text_tokens(gen, [ids[1:] for ids in texts], special)
        noise = None
        if generators[0] is not None:
            dim = self._latent_dim()
            grids = [self._latent_grid(h, w) for h, w in sizes]
            noise = [torch.randn(h * w, dim, generator=g) for (h, w), g in zip(grids, generators)]
        latents = self.generate_latents(
            gen,
            cfg_text,
            cfg_img,
            sizes,
            special,
            params,
            init_noise=noise,
            progress=progress,
            parallel=parallel,
            step_cache=step_cache,
        )
        from .processing_bagel import tensor_to_image

        for out, image in zip(outputs, self.decode_latents(latents, sizes)):
            out.append(tensor_to_image(image.float().cpu()))
        return outputs if batched else outputs[0]

    def chat(
        self,
        images,
        prompt,
        think: bool = False,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed=None,
        processor=None,
        parallel=None,
        streamer=None,
    ):
        """Answer `prompt` about `images` (None, one PIL image or a list). A list of prompts is a
        batch; `images` is then a list with one entry (None, image or list) per prompt.
        `streamer`: a transformers streamer that gets the answer as it is decoded, e.g.
        `TextIteratorStreamer(model.processor.tokenizer, skip_prompt=True)` (one request only).
        `max_new_tokens`, `do_sample`, `temperature`, `top_p` not given come from
        `model.generation_config` (512, greedy, 0.3, 1.0 without a generation_config.json)."""
        max_new_tokens = self._sampling(None, max_new_tokens=max_new_tokens)
        prompts, image_lists = check_prompts(prompt, images)
        batch = [imgs + [p] for imgs, p in zip(image_lists, prompts)]
        out = self.interleave(
            batch,
            understanding_output=True,
            think=think,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            processor=processor,
            parallel=parallel,
            streamer=streamer,
        )
        texts = [o[0] for o in out]
        return texts if isinstance(prompt, (list, tuple)) else texts[0]

    def generate_image(
        self,
        prompt,
        height: int | None = None,
        width: int | None = None,
        think: bool = False,
        num_steps: int | None = None,
        cfg_text_scale: float | None = None,
        cfg_img_scale: float | None = None,
        cfg_interval=None,
        cfg_renorm_type: str | None = None,
        cfg_renorm_min: float | None = None,
        timestep_shift: float | None = None,
        seed=None,
        progress: bool = True,
        max_think_tokens: int | None = None,
        processor=None,
        parallel=None,
        step_cache=None,
        streamer=None,
        do_sample: bool | None = None,
        temperature: float | None = None,
    ):
        """Text-to-image. A list of prompts is a batch. Returns a PIL image (a list for a batch);
        with `think`, (thinking text, image) pairs (at most `max_think_tokens` of thinking,
        greedy or sampled with `do_sample` at `temperature`), the thinking sent to `streamer` as
        it is decoded (one request; see `chat`).
        `height` x `width` default to the largest square the checkpoint generates (1024 x 1024 for
        BAGEL-7B-MoT); `num_steps` is the number of denoising steps (model evaluations).
        `parallel`: several GPUs (docs/serving.md, "Several GPUs"). `step_cache`: "taylorseer", "adaptive"
        or a policy object (README, "Faster generation"). The sampling arguments not given come
        from `model.generation_config` (its `image_generation` dict, `max_think_tokens`, ...), else
        the reference's defaults (guidance_bagel.IMAGE_GENERATION)."""
        return self._image_requests(
            "image_generation",
            prompt,
            None,
            dict(
                num_steps=num_steps,
                timestep_shift=timestep_shift,
                cfg_text_scale=cfg_text_scale,
                cfg_img_scale=cfg_img_scale,
                cfg_interval=cfg_interval,
                cfg_renorm_type=cfg_renorm_type,
                cfg_renorm_min=cfg_renorm_min,
            ),
            think,
            max_think_tokens,
            height=height,
            width=width,
            seed=seed,
            progress=progress,
            processor=processor,
            parallel=parallel,
            step_cache=step_cache,
            streamer=streamer,
            do_sample=do_sample,
            temperature=temperature,
        )

    def edit_image(
        self,
        image,
        prompt,
        think: bool = False,
        num_steps: int | None = None,
        cfg_text_scale: float | None = None,
        cfg_img_scale: float | None = None,
        cfg_interval=None,
        cfg_renorm_type: str | None = None,
        cfg_renorm_min: float | None = None,
        timestep_shift: float | None = None,
        seed=None,
        progress: bool = True,
        max_think_tokens: int | None = None,
        processor=None,
        parallel=None,
        step_cache=None,
        streamer=None,
        do_sample: bool | None = None,
        temperature: float | None = None,
    ):
        """Edit `image` as `prompt` says; the result has the size of the VAE-resized input (at most
        the largest side the checkpoint generates). Lists of images and prompts (same length) are
        a batch. `num_steps` is the number of denoising steps (model evaluations). With `think`:
        `streamer`, `do_sample` and `temperature` as `generate_image`'s. `parallel`: several GPUs
        (docs/serving.md, "Several GPUs"). `step_cache`: as in `generate_image`. The sampling
        arguments not given come from `model.generation_config` (its `image_editing` dict), else
        the reference's (guidance_bagel.IMAGE_EDITING)."""
        return self._image_requests(
            "image_editing",
            prompt,
            image,
            dict(
                num_steps=num_steps,
                timestep_shift=timestep_shift,
                cfg_text_scale=cfg_text_scale,
                cfg_img_scale=cfg_img_scale,
                cfg_interval=cfg_interval,
                cfg_renorm_type=cfg_renorm_type,
                cfg_renorm_min=cfg_renorm_min,
            ),
            think,
            max_think_tokens,
            seed=seed,
            progress=progress,
            processor=processor,
            parallel=parallel,
            step_cache=step_cache,
            streamer=streamer,
            do_sample=do_sample,
            temperature=temperature,
        )

    def _image_requests(self, task, prompt, images, guidance: dict, think, max_think_tokens, **interleave_args):
        """`generate_image` / `edit_image` past their signatures: the guidance arguments not given
        from `task`'s defaults, checked; one `interleave` request per prompt (its image, then the
        prompt); the results shaped as `prompt` (one, or a list for a batch)."""
        max_think_tokens = self._sampling(None, max_think_tokens=max_think_tokens)
        params = _guidance(**self._sampling_arguments(task, guidance), think=think, max_think_tokens=max_think_tokens)
        prompts, image_lists = check_prompts(prompt, images, one_image_each=task == "image_editing")
        out = self.interleave(
            [imgs + [p] for imgs, p in zip(image_lists, prompts)],
            think=think,
            params=params,
            max_new_tokens=max_think_tokens,
            **interleave_args,
        )
        results = [tuple(o) if think else o[0] for o in out]
        return results if isinstance(prompt, (list, tuple)) else results[0]


def _guidance(
    num_steps,
    timestep_shift,
    cfg_text_scale,
    cfg_img_scale,
    cfg_interval,
    cfg_renorm_type,
    cfg_renorm_min,
    think,
    max_think_tokens,
) -> GuidanceParams:
    """GuidanceParams of the high-level API (`GuidanceParams.from_steps`). `think` and
    `max_think_tokens` are checked here under their own names (interleave calls the latter
    `max_new_tokens`)."""
    check_bool("think", think)
    check_int("max_think_tokens", max_think_tokens, minimum=1, fix="1000 unless generation_config.json sets it.")
    return GuidanceParams.from_steps(
        num_steps, timestep_shift, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min
    )


def _check_context(context, special) -> int:
    """The context API's first two arguments; returns the batch size."""
    check_instance("special", special, SpecialTokenIds, "SpecialTokenIds(bos, eos, start_of_image, end_of_image).")
    return check_contexts({"context": context}, BagelContext)
