"""BAGEL's sampling defaults and the transformers `GenerationConfig` that carries them
(`generation_config.json`, written by `save_pretrained`, read by `from_pretrained` into
`model.generation_config`).

`chat`, `generate_image`, `edit_image` and `interleave` take every sampling argument the call does
not give from `model.generation_config`: the standard text keys (`max_new_tokens`, `do_sample`,
`temperature`, `top_p`), `max_think_tokens`, and one dict per image task (`image_generation`,
`image_editing`) under `generate_image` / `edit_image`'s argument names. What the config does not
set is the reference's default (`TEXT` below; the image ones are guidance_bagel's `IMAGE_GENERATION`
and `IMAGE_EDITING`): a checkpoint without generation_config.json samples as before there was one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .guidance_bagel import IMAGE_EDITING, IMAGE_GENERATION, GuidanceParams
from .imports_bagel import quiet_third_party_imports

with quiet_third_party_imports():  # transformers imports torchao where installed
    from transformers import GenerationConfig

IMAGE_TASKS = {"image_generation": IMAGE_GENERATION, "image_editing": IMAGE_EDITING}
#: Text decoding: chat's answer length, the thinking length of generate_image / edit_image (and
#: interleave's output), greedy; sampled decoding (do_sample=True) at temperature 0.3, top_p 1.
TEXT = dict(max_new_tokens=512, max_think_tokens=1000, do_sample=False, temperature=0.3, top_p=1.0)
# Written into the config object; temperature / top_p are not: transformers refuses to save them
# beside do_sample=False, so they apply from TEXT unless a config that samples sets its own.
_WRITTEN_TEXT = ("max_new_tokens", "max_think_tokens", "do_sample")
_LIBRARY_DEFAULTS = GenerationConfig()


class BagelGenerationConfig(GenerationConfig):
    """A `GenerationConfig` with BAGEL's defaults (`IMAGE_GENERATION`, `IMAGE_EDITING`, `TEXT`) for
    every key it is not given; the image dicts are merged key by key, so a file may set just
    `{"image_generation": {"cfg_text_scale": 5.0}}`. Unknown image keys and bad values raise."""

    def __init__(self, **kwargs: Any) -> None:
        # Set after transformers' init, which drops keys it does not know when built from a model config.
        own = {task: _image_settings(task, kwargs.pop(task, None), defaults) for task, defaults in IMAGE_TASKS.items()}
        own["max_think_tokens"] = kwargs.pop("max_think_tokens", None)
        for name in _WRITTEN_TEXT:
            if kwargs.get(name, own.get(name)) is None:
                (own if name in own else kwargs)[name] = TEXT[name]
        super().__init__(**kwargs)
        for name, value in own.items():
            setattr(self, name, value)

    @classmethod
    def from_model_config(cls, model_config: Any) -> BagelGenerationConfig:
        """transformers' (token ids from the model config) with BAGEL's defaults; its own version
        compares every attribute with a plain GenerationConfig's, which has none of BAGEL's."""
        return cls(**GenerationConfig.from_model_config(model_config).to_diff_dict())


def _image_settings(task: str, given: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    given = {} if given is None else given
    if not isinstance(given, Mapping):
        raise TypeError(f"generation config {task!r} must be a dict of {sorted(defaults)}, got {type(given).__name__}.")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(
            f"generation config {task!r} has unknown key(s) {unknown}; it takes {sorted(defaults)} "
            "(generate_image / edit_image's argument names)."
        )
    values = {**defaults, **given}
    try:
        GuidanceParams.from_steps(**values)
    except (TypeError, ValueError) as err:
        raise type(err)(f"generation config {task!r}: {err}") from None
    return values


def sampling_defaults(generation_config: GenerationConfig | None, task: str | None, given: dict) -> dict[str, Any]:
    """`given` (argument name -> value, None where the call gave none) with every None replaced: by
    the model's `generation_config` where it sets that name (for image arguments in its `task`
    dict), else by BAGEL's default."""
    image = getattr(generation_config, task, None) if task else None
    out = {}
    for name, value in given.items():
        if value is None:
            if task and name in IMAGE_TASKS[task]:
                value = (image if isinstance(image, Mapping) else {}).get(name, IMAGE_TASKS[task][name])
            else:
                value = _text_setting(generation_config, name)
        out[name] = value
    return out


def _text_setting(generation_config: GenerationConfig | None, name: str) -> Any:
    value = getattr(generation_config, name, None)
    # A value transformers' own GenerationConfig() also has was not set for this model.
    if value is None or (name != "max_think_tokens" and value == getattr(_LIBRARY_DEFAULTS, name, None)):
        return TEXT[name]
    return value


__all__ = ["IMAGE_TASKS", "TEXT", "BagelGenerationConfig", "sampling_defaults"]
