"""Image generation's sampling: the flow-matching schedule and its Euler steps
(`FlowMatchEulerSampler`), classifier-free guidance (`GuidanceParams`, `guide` and its renorm), the
guidance branches' velocities under a step cache (`StepCacheBranches`), and per-request seeds.
`IMAGE_GENERATION` / `IMAGE_EDITING` are the reference's sampling defaults, the values a model's
generation config starts from (generation_config_bagel.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .contexts_bagel import BagelContext
from .validation_bagel import check_choice, check_int, check_interval, check_number, check_seeds


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The reference's timestep shift: s*t / (1 + (s-1)*t)."""
    return shift * t / (1 + (shift - 1) * t)


#: Text-to-image sampling (the reference's), under generate_image's argument names: 50 denoising
#: steps, timestep shift 3, text guidance 4 inside (0.4, 1] with global renorm.
IMAGE_GENERATION = dict(
    num_steps=50,
    timestep_shift=3.0,
    cfg_text_scale=4.0,
    cfg_img_scale=1.0,
    cfg_interval=(0.4, 1.0),
    cfg_renorm_type="global",
    cfg_renorm_min=0.0,
)
#: Editing: image guidance 2 as well, over the whole schedule, with per-token renorm of the text guidance.
IMAGE_EDITING = dict(IMAGE_GENERATION, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel")
_T2I, _EDIT = IMAGE_GENERATION, IMAGE_EDITING


@dataclass(frozen=True)
class GuidanceParams:
    """Flow-matching sampling and classifier-free guidance, with the reference's meaning; the
    defaults are text-to-image's (`IMAGE_GENERATION`), but `num_timesteps` counts the schedule's
    points: the reference's default 50 is 49 denoising steps."""

    num_timesteps: int = 50
    timestep_shift: float = _T2I["timestep_shift"]
    cfg_text_scale: float = _T2I["cfg_text_scale"]
    cfg_img_scale: float = _T2I["cfg_img_scale"]
    cfg_interval: tuple[float, float] = _T2I["cfg_interval"]
    cfg_renorm_type: str = _T2I["cfg_renorm_type"]
    cfg_renorm_min: float = _T2I["cfg_renorm_min"]

    def __post_init__(self) -> None:
        check_int("num_timesteps", self.num_timesteps, minimum=2, fix="The reference's default is 50.")
        check_number(
            "timestep_shift",
            self.timestep_shift,
            minimum=0,
            open_min=True,
            fix=f"The reference uses {_T2I['timestep_shift']}.",
        )
        for name in ("cfg_text_scale", "cfg_img_scale"):
            check_number(
                name,
                getattr(self, name),
                minimum=0,
                fix=f"1.0 turns that guidance off; the default is {_T2I['cfg_text_scale']} for text and "
                f"{_T2I['cfg_img_scale']} (text-to-image) or {_EDIT['cfg_img_scale']} (editing) for images.",
            )
        check_choice("cfg_renorm_type", self.cfg_renorm_type, ("global", "channel", "text_channel"))
        check_number(
            "cfg_renorm_min",
            self.cfg_renorm_min,
            minimum=0,
            maximum=1,
            fix=f"The reference uses {_T2I['cfg_renorm_min']}.",
        )
        object.__setattr__(self, "cfg_interval", check_interval("cfg_interval", self.cfg_interval))

    @classmethod
    def from_steps(
        cls,
        num_steps: int,
        timestep_shift: float,
        cfg_text_scale: float,
        cfg_img_scale: float,
        cfg_interval: tuple[float, float],
        cfg_renorm_type: str,
        cfg_renorm_min: float,
    ) -> GuidanceParams:
        """From the high-level API's names (`IMAGE_GENERATION`'s keys), whose `num_steps` counts
        denoising steps: the schedule has one point more."""
        num_steps = check_int("num_steps", num_steps, minimum=1, fix=f"The default is {_T2I['num_steps']}.")
        return cls(
            num_steps + 1, timestep_shift, cfg_text_scale, cfg_img_scale, cfg_interval, cfg_renorm_type, cfg_renorm_min
        )


class FlowMatchEulerSampler:
    """The reference's sampler: Euler steps of the flow from noise (t = 1) to the image (t = 0) over
    `params.num_timesteps` shifted points; `step` moves the latents from point i to point i + 1."""

    def __init__(self, params: GuidanceParams):
        self.params = params
        self.timesteps = shift_timesteps(torch.linspace(1, 0, params.num_timesteps), params.timestep_shift).tolist()

    @property
    def num_steps(self) -> int:
        """One step from each point of the schedule to the next: num_timesteps - 1."""
        return len(self.timesteps) - 1

    def guides(self, t: float) -> bool:
        """Whether guidance applies at time t (`cfg_interval`, open below)."""
        return self.params.cfg_interval[0] < t <= self.params.cfg_interval[1]

    def step(self, velocity: torch.Tensor, i: int, x: torch.Tensor) -> torch.Tensor:
        """x (N, p*p*C) at point i -> at point i + 1, given the velocity there."""
        return x - velocity * (self.timesteps[i] - self.timesteps[i + 1])


def _segment_norm(v: torch.Tensor, seq_of_token: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-sequence L2 norm over all elements, broadcast back to tokens: (N, 1). One reduction per
    sequence (its `counts` tokens are contiguous), not index_add_: on the GPU that sums with
    atomics, in an order that changes from call to call, and a last-bit change of the norm can
    flip a bf16 rounding in the next step and grow from there (the same seed, another image)."""
    squares = v.pow(2).sum(-1)
    sums = torch.stack([part.sum() for part in squares.split(counts)])
    return sums.sqrt()[seq_of_token][:, None]


def _renorm(reference: torch.Tensor, guided: torch.Tensor, per_token: bool, params, seq_of_token, counts):
    """Scale `guided` so its norm does not exceed the unguided one (clamped to [renorm_min, 1])."""
    if per_token:
        norm_ref, norm_guided = reference.norm(dim=-1, keepdim=True), guided.norm(dim=-1, keepdim=True)
    else:
        norm_ref, norm_guided = (
            _segment_norm(reference, seq_of_token, counts),
            _segment_norm(guided, seq_of_token, counts),
        )
    return guided * (norm_ref / (norm_guided + 1e-8)).clamp(min=params.cfg_renorm_min, max=1.0)


def guide(velocities, params: GuidanceParams, seq_of_token: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Combine the branch velocities as the reference does (text, then image guidance, renorm).
    `counts`: latent tokens of each sequence, `seq_of_token` (N,) the sequence of each token."""
    v, v_text = velocities[0], velocities[1]
    v_img = velocities[2] if len(velocities) > 2 else None
    guided_text = v_text + params.cfg_text_scale * (v - v_text)
    if params.cfg_renorm_type == "text_channel":
        guided_text = _renorm(v, guided_text, True, params, seq_of_token, counts)
        return guided_text if v_img is None else v_img + params.cfg_img_scale * (guided_text - v_img)
    guided = guided_text if v_img is None else v_img + params.cfg_img_scale * (guided_text - v_img)
    return _renorm(v, guided, params.cfg_renorm_type == "channel", params, seq_of_token, counts)


def request_seeds(seed, batch: int) -> list[int] | None:
    """One seed per request: a list as given, or one int: request i uses seed + i."""
    return check_seeds("seed", seed, batch)


def request_generators(seed, batch: int) -> list:
    seeds = request_seeds(seed, batch)
    return [None] * batch if seeds is None else [torch.Generator().manual_seed(s) for s in seeds]


class StepCacheBranches:
    """Velocities of guidance branches with a step cache (step_cache_bagel.py): the branches the
    cache's `plan` picks run the decoder in one forward (their contexts concatenated once per
    subset, for this call), the others are its predictions; the final norm and `llm2vae` then
    run on all of them at once. `contexts`: branch index -> its context; `shard`, `agree`:
    parallel generation's sequence shard and agreement over ranks."""

    def __init__(self, model, run, contexts: dict, pos, counts, special, shard=None, agree=None):
        self.model, self.run, self.contexts = model, run, contexts
        self.pos, self.counts, self.special, self.shard, self.agree = pos, counts, special, shard, agree
        self._joined: dict[tuple[int, ...], BagelContext] = {}

    def __call__(self, ids: list[int], x: torch.Tensor, t: float) -> list[torch.Tensor]:
        """(N, p*p*C) velocities of branches `ids` at latents x and time t, in that order."""
        ran = self.run.plan(ids, t, self.agree)
        hidden = {}
        if ran:
            key = tuple(ran)
            if key not in self._joined:
                self._joined[key] = BagelContext.concat([self.contexts[b] for b in ran])
            out = self.model._latent_hidden(
                self._joined[key], x, t, self.pos, self.counts, len(ran), self.special, self.shard, final_norm=False
            )
            for b, part in zip(ran, out.chunk(len(ran))):
                self.run.update(b, t, part)
                hidden[b] = part
        dtype = self.model.get_input_embeddings().weight.dtype  # the decoder's, as computed rows have it
        rows = [hidden[b] if b in hidden else self.run.predict(b, t).to(dtype) for b in ids]
        return list(self.model._velocity_head(torch.cat(rows)).chunk(len(ids)))
