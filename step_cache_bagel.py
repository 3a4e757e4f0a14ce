"""Step caches for image generation: skip some denoising steps' decoder passes and predict their
output from the steps that ran.

A policy (`TaylorSeer`, `AdaptiveTaylor`) is a small frozen description; `start` makes the state of
one `generate_latents` call (a `StepCacheRun`), which the sampler consults at every step for the
guidance branches that step needs (0 the full context, 1 without the text, 2 without the images):
`plan` says which branches run the decoder, `update` gives the cache what a branch's run produced,
`predict` stands in for the others. What is cached is the decoder's output before its final norm,
for the latent tokens (N, hidden): the final norm and `llm2vae` then run on it as on a computed one.
The run lives for one call and holds nothing of the model; `close` drops its tensors.

The reference's TaylorSeer (its `modeling/cache_utils/taylorseer.py`) caches every decoder layer's
output, but on a predicted step each layer's prediction ignores its input, so only the last layer's
reaches the output: caching that one alone gives the same result with 1/L of the memory.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .validation_bagel import check_int, check_number


class StepCacheRun:
    """One call's cache state, made by a policy's `start(timesteps, head)`: `timesteps` the
    schedule's points, `head` maps a decoder output (N, hidden) to the velocity it gives.
    Each step, `plan(branches, t, agree)` returns the branches (a sub-list) that run the decoder;
    `update(branch, t, hidden)` follows each run, `predict(branch, t)` stands in for the others.
    `agree(x)` (parallel generation) returns the largest float `x` over the ranks that hold the
    other branches, so that a decision taken on values is the same everywhere: a policy calls it
    once in every `plan` (even with no branches) or never. Counts `runs` (branch passes of the
    decoder) and `predictions`."""

    def __init__(self, timesteps: list[float]):
        self.timesteps = timesteps
        self.runs = self.predictions = 0
        self.peak_bytes = 0

    def plan(self, branches: list[int], t: float, agree: Callable[[float], float] | None = None) -> list[int]:
        raise NotImplementedError

    def update(self, branch: int, t: float, hidden: torch.Tensor) -> None:
        raise NotImplementedError

    def predict(self, branch: int, t: float) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Memory the cached tensors hold now."""
        return 0

    def close(self) -> None:
        """Drop every cached tensor."""

    def _count(self, ran: int, predicted: int) -> None:
        self.runs += ran
        self.predictions += predicted
        self.peak_bytes = max(self.peak_bytes, self.nbytes)


# ----------------------------------------------------------------------------------------------
# TaylorSeer, as the reference has it
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaylorSeer:
    """The reference's TaylorSeer (`generate_image(enable_taylorseer=True)`, its PR #232), with its
    defaults. Each branch counts its own calls: the first `warmup` run the decoder, then one in
    `interval`; the others take a Taylor expansion of order up to `max_order` in the call index
    around the last run, its derivatives the finite differences between runs (one order more at
    each run after call `warmup - 2`)."""

    warmup: int = 5
    interval: int = 3
    max_order: int = 6

    def __post_init__(self):
        for name, least in (("warmup", 1), ("interval", 1), ("max_order", 0)):
            object.__setattr__(self, name, check_int(f"TaylorSeer.{name}", getattr(self, name), minimum=least))

    def start(self, timesteps: list[float], head=None) -> StepCacheRun:
        return _TaylorSeerRun(self, timesteps)


class _TaylorBranch:
    __slots__ = ("calls", "since_run", "last_run", "factors")

    def __init__(self):
        self.calls = 0  # this branch's calls so far (the reference's `current['step']`)
        self.since_run = 0  # predicted calls since the last run (its `cache_counter`)
        self.last_run = 0  # call index of the last run
        self.factors: list[torch.Tensor] = []  # value, then derivatives (float32)


class _TaylorSeerRun(StepCacheRun):
    def __init__(self, policy: TaylorSeer, timesteps: list[float]):
        super().__init__(timesteps)
        self.policy = policy
        self.branches: dict[int, _TaylorBranch] = {}

    def _branch(self, b: int) -> _TaylorBranch:
        return self.branches.setdefault(b, _TaylorBranch())

    def plan(self, branches, t, agree=None):
        p = self.policy
        run = []
        for b in branches:
            state = self._branch(b)
            if state.calls < p.warmup or state.since_run == p.interval - 1:
                run.append(b)
        self._count(len(run), len(branches) - len(run))
        return run

    def update(self, branch, t, hidden):
        state = self._branch(branch)
        distance = state.calls - state.last_run
        factors = [hidden.to(torch.float32, copy=True)]  # its own storage: not a view of all branches' output
        # Derivatives only from call warmup - 1 on, as the reference's `first_enhance - 2` test does.
        if state.calls > self.policy.warmup - 2:
            for old in state.factors[: self.policy.max_order]:
                factors.append((factors[-1] - old) / distance)
        state.factors, state.last_run, state.since_run = factors, state.calls, 0
        state.calls += 1

    def predict(self, branch, t):
        state = self.branches[branch]
        x = state.calls - state.last_run
        out = state.factors[0].clone()
        for i, factor in enumerate(state.factors[1:], start=1):
            out += factor * (x**i / math.factorial(i))
        state.calls += 1
        state.since_run += 1
        return out

    @property
    def nbytes(self):
        return sum(f.numel() * f.element_size() for s in self.branches.values() for f in s.factors)

    def close(self):
        self.branches.clear()


# ----------------------------------------------------------------------------------------------
# Adaptive: polynomial extrapolation in t, run when its own error estimate says so
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptiveTaylor:
    """Extrapolates the cached output as a quadratic in the timestep t (Newton form through the
    last three runs, so it follows the shifted schedule's uneven spacing), and runs the decoder
    only when the extrapolation's own error estimate — how much the velocity it gives moves when
    the order drops by one, relative to its size, as an embedded Runge-Kutta pair estimates a
    step — exceeds `tolerance`. All branches of a step run or are predicted together (over every rank), so the
    guidance combines predictions made from the same steps. `tolerance` is the one trade-off:
    larger is faster and further from the uncached result (0 runs every step)."""

    tolerance: float = 0.01
    order = 2  # not a field: quadratic did best for its decoder passes on the tiny checkpoint

    def __post_init__(self):
        tolerance = check_number("AdaptiveTaylor.tolerance", self.tolerance, minimum=0, fix="0 runs every step.")
        object.__setattr__(self, "tolerance", tolerance)

    def start(self, timesteps: list[float], head=None) -> StepCacheRun:
        return _AdaptiveRun(self, timesteps, head)


class _NewtonBranch:
    __slots__ = ("nodes", "coefficients")

    def __init__(self):
        self.nodes: list[float] = []  # t of the kept runs, newest last
        self.coefficients: list[torch.Tensor] = []  # divided differences f[t_n], f[t_n, t_n-1], ...


class _AdaptiveRun(StepCacheRun):
    def __init__(self, policy: AdaptiveTaylor, timesteps: list[float], head=None):
        super().__init__(timesteps)
        self.policy, self.head = policy, head or (lambda hidden: hidden)
        self.branches: dict[int, _NewtonBranch] = {}
        self._guess: dict[int, torch.Tensor] = {}  # this step's prediction, made while planning

    def plan(self, branches, t, agree=None):
        self._guess.clear()
        error = 0.0
        for b in branches:
            state = self.branches.setdefault(b, _NewtonBranch())
            if len(state.nodes) <= self.policy.order:
                error = math.inf
                break
            high, low = self._extrapolate(state, t)
            # measured on the velocities they give: the residual stream's few huge channels,
            # nearly constant over steps, would make any change look small
            v_high, v_low = self.head(high).float(), self.head(low).float()
            error = max(error, ((v_high - v_low).norm() / v_high.norm().clamp_min(1e-12)).item())
            self._guess[b] = high
        if agree is not None:
            error = agree(error)
        if error > self.policy.tolerance:
            self._guess.clear()
            self._count(len(branches), 0)
            return list(branches)
        self._count(0, len(branches))
        return []

    @staticmethod
    def _extrapolate(state: _NewtonBranch, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The Newton polynomial at t with all coefficients, and with the last one dropped."""
        out, basis, low = state.coefficients[0].clone(), 1.0, None
        for k in range(1, len(state.coefficients)):
            basis *= t - state.nodes[-k]
            low = out.clone() if k == len(state.coefficients) - 1 else low
            out += state.coefficients[k] * basis
        return out, low

    def update(self, branch, t, hidden):
        state = self.branches.setdefault(branch, _NewtonBranch())
        coefficients = [hidden.to(torch.float32, copy=True)]
        for k, old in enumerate(state.coefficients[: self.policy.order], start=1):
            coefficients.append((coefficients[-1] - old) / (t - state.nodes[-k]))
        state.nodes = (state.nodes + [t])[-(self.policy.order + 1) :]
        state.coefficients = coefficients

    def predict(self, branch, t):
        return self._guess.pop(branch)

    @property
    def nbytes(self):
        cached = sum(c.numel() * c.element_size() for s in self.branches.values() for c in s.coefficients)
        return cached + sum(g.numel() * g.element_size() for g in self._guess.values())

    def close(self):
        self.branches.clear()
        self._guess.clear()


# ----------------------------------------------------------------------------------------------
# The argument
# ----------------------------------------------------------------------------------------------

STEP_CACHES = {"taylorseer": TaylorSeer, "adaptive": AdaptiveTaylor}


def resolve_step_cache(step_cache):
    """`step_cache` of the public API -> a policy or None: None, a name of `STEP_CACHES` (its
    defaults) or a policy object."""
    if step_cache is None or isinstance(step_cache, tuple(STEP_CACHES.values())):
        return step_cache
    if isinstance(step_cache, str):
        if step_cache not in STEP_CACHES:
            raise ValueError(
                f"step_cache={step_cache!r} is not a step cache: use None (every step exact), "
                f"{' or '.join(repr(n) for n in STEP_CACHES)}, "
                "or a policy object such as AdaptiveTaylor(tolerance=0.02)."
            )
        return STEP_CACHES[step_cache]()
    if callable(getattr(step_cache, "start", None)):  # a policy of the caller's own
        return step_cache
    raise TypeError(
        f"step_cache must be None, a name ({', '.join(repr(n) for n in STEP_CACHES)}) or a policy object, "
        f"got {type(step_cache).__name__}."
    )
