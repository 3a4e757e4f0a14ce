"""Argument checks shared by BAGEL's public entry points (generation, processor, config, training
forward): one way to refuse a bad input where it enters, before any work or memory is spent on it.

Every error names the argument, shows the value it got, says what is allowed and, where there is
one, the fix: `TypeError` for a value of the wrong kind, `ValueError` for a value out of range.
Booleans are never taken for numbers (`True` is an `int` to Python, never a step count here), and
numbers must be finite (a NaN guidance scale compares False with every bound and would pass).
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch

# A check made on the device: (a boolean scalar tensor, its message or a function that makes it).
DeviceCheck = tuple[torch.Tensor, str | Callable[[], str]]

#: What `torch.Generator.manual_seed` accepts.
SEED_RANGE = (-(2**63), 2**64 - 1)


def _shown(value: Any) -> str:
    """The value as an error message shows it: its repr (shortened) and, for non-builtins, its type."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    if len(text) > 80:
        text = text[:60] + "..." + text[-12:]
    kind = type(value)
    return text if kind.__module__ == "builtins" else f"{text} ({kind.__module__}.{kind.__qualname__})"


def _fail(kind: type[Exception], name: str, value: Any, allowed: str, fix: str = "") -> Exception:
    message = f"{name} must be {allowed}, got {_shown(value)}."
    return kind(f"{message} {fix}" if fix else message)


def _bounds(minimum, maximum, open_min: bool = False, open_max: bool = False) -> str:
    low = None if minimum is None else f"{'>' if open_min else '>='} {minimum}"
    high = None if maximum is None else f"{'<' if open_max else '<='} {maximum}"
    return " and ".join(b for b in (low, high) if b)


def check_bool(name: str, value: Any, fix: str = "") -> bool:
    """`value` as a bool: True or False (numpy bools too), not 'no', 1 or None."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise _fail(TypeError, name, value, "True or False", fix)


def check_int(name: str, value: Any, minimum: int | None = None, maximum: int | None = None, fix: str = "") -> int:
    """`value` as an int within [minimum, maximum] (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(TypeError, name, value, "an integer", fix)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            allowed = f"at least {minimum}"
        elif minimum is None:
            allowed = f"at most {maximum}"
        else:
            allowed = f"between {minimum} and {maximum}"
        raise _fail(ValueError, name, value, allowed, fix)
    return value


def check_number(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    open_min: bool = False,
    open_max: bool = False,
    fix: str = "",
) -> float:
    """`value` as a finite float within the bounds (open or closed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _fail(TypeError, name, value, "a number", fix)
    value = float(value)
    bounds = _bounds(minimum, maximum, open_min, open_max)
    allowed = "a finite number" + (f" {bounds}" if bounds else "")
    if not math.isfinite(value):
        raise _fail(ValueError, name, value, allowed, fix)
    too_low = minimum is not None and (value <= minimum if open_min else value < minimum)
    too_high = maximum is not None and (value >= maximum if open_max else value > maximum)
    if too_low or too_high:
        raise _fail(ValueError, name, value, allowed, fix)
    return value


def check_choice(name: str, value: Any, choices: Iterable[str], fix: str = "") -> str:
    choices = tuple(choices)
    allowed = "one of " + ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise _fail(TypeError, name, value, allowed, fix)
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        raise _fail(ValueError, name, value, allowed, fix or (f"Did you mean {close[0]!r}?" if close else ""))
    return value


def check_interval(name: str, value: Any, lowest: float = 0.0, highest: float = 1.0) -> tuple[float, float]:
    """A pair (lo, hi) of finite numbers with lowest <= lo <= hi <= highest."""
    allowed = f"a pair (lo, hi) of numbers with {lowest} <= lo <= hi <= {highest}"
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(TypeError, name, value, allowed)
    try:
        lo, hi = (check_number(f"{name}[{i}]", v, lowest, highest) for i, v in enumerate(value))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{name} must be {allowed}, got {_shown(value)} ({err})") from None
    if lo > hi:
        raise _fail(ValueError, name, value, allowed, "Put the smaller bound first.")
    return lo, hi


def check_seeds(name: str, seed: Any, count: int) -> list[int] | None:
    """One seed per request: None, one int (request i then uses seed + i) or a list of `count` ints,
    each within what `torch.Generator.manual_seed` takes."""
    if seed is None:
        return None
    lo, hi = SEED_RANGE
    allowed = "an integer or a list of integers (one per request), each from -2**63 to 2**64 - 1"

    def one(label: str, value: Any, top: int = hi) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _fail(TypeError, label, value, allowed)
        if not lo <= int(value) <= top:
            raise _fail(ValueError, label, value, allowed, "Use a smaller seed, e.g. seed % 2**32.")
        return int(value)

    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"{name} has {len(seed)} seeds for {count} requests; give one per request.")
        return [one(f"{name}[{i}]", s) for i, s in enumerate(seed)]
    base = one(name, seed, hi - (count - 1))
    return [base + i for i in range(count)]


def check_keywords(where: str, given: Iterable[str], allowed: Iterable[str], fix: str = "") -> None:
    """Refuse keyword arguments `where` does not take, naming each with its closest valid name."""
    allowed = sorted(set(allowed))
    unknown = [key for key in given if key not in allowed]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, allowed, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(f"{where} got unexpected keyword argument(s) {', '.join(hints)}. {fix}".rstrip())


def check_tensor(
    name: str,
    value: Any,
    dims: int | None = None,
    integer: bool | None = None,
    rows: int | None = None,
    columns: int | None = None,
    fix: str = "",
) -> torch.Tensor:
    """A tensor with `dims` dimensions, an integer or floating dtype, and `rows` x `columns`."""
    shape = "" if dims is None else f" with {dims} dimension{'s' if dims != 1 else ''}"
    kind = {None: "", True: " of integers (e.g. torch.long)", False: " of floating point"}[integer]
    if not isinstance(value, torch.Tensor):
        raise _fail(TypeError, name, value, f"a torch.Tensor{shape}{kind}", fix)
    if dims is not None and value.dim() != dims:
        raise _fail(ValueError, name, value, f"a tensor{shape}", fix)
    not_integer = value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool
    if integer is not None and not_integer == integer:
        raise _fail(TypeError, name, value, f"a tensor{kind}", fix)
    if rows is not None and value.shape[0] != rows:
        raise _fail(ValueError, name, value, f"a tensor of {rows} {'entries' if value.dim() == 1 else 'rows'}", fix)
    if columns is not None and (value.dim() < 2 or value.shape[1] != columns):
        raise _fail(ValueError, name, value, f"a tensor of {columns} columns", fix)
    return value


def check_int_list(name: str, value: Any, minimum: int | None = None, fix: str = "") -> list[int]:
    """A list (or tuple, or 1-D integer tensor) of ints, each at least `minimum`."""
    if isinstance(value, torch.Tensor) and value.dim() == 1 and not value.dtype.is_floating_point:
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise _fail(TypeError, name, value, "a list of integers", fix)
    return [check_int(f"{name}[{i}]", v, minimum, fix=fix) for i, v in enumerate(value)]


def check_instance(name: str, value: Any, kind: type, fix: str = "") -> Any:
    """`value` as an instance of `kind` (a class of ours: the caller passes it, so that this
    module imports none of the modules that use it)."""
    if not isinstance(value, kind):
        raise _fail(TypeError, name, value, f"a {kind.__name__}", fix)
    return value


# ----------------------------------------------------------------------------------------------
# The generation API (generation_bagel.py): one checker per kind of argument, called at the top
# of each public method before any work
# ----------------------------------------------------------------------------------------------


def check_sampling(do_sample: Any, temperature: Any, top_p: Any) -> None:
    """Decoding arguments, checked whether or not sampling is on (a value of the wrong kind is a
    mistake either way); greedy decoding takes temperature 0 and top_p 0 too, as 'no sampling'."""
    do_sample = check_bool("do_sample", do_sample)
    fix = "Sampling needs it > 0; for greedy decoding use do_sample=False." if do_sample else ""
    check_number("temperature", temperature, minimum=0, open_min=do_sample, fix=fix)
    check_number("top_p", top_p, minimum=0, maximum=1, open_min=do_sample, fix="1.0 keeps every token.")


def check_generators(generator: Any, count: int) -> list:
    """`generator`: None, one `torch.Generator` for all `count` sequences or a list of one per
    sequence (each a generator or None) -> the list of one per sequence."""
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator] * count
    if len(generators) != count:
        raise ValueError(f"generator is a list of {len(generators)} for {count} sequences: give one per sequence.")
    for g in generators:
        if g is not None and not isinstance(g, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator (or None, or a list of them for generate_text_ids), "
                f"got {type(g).__name__}; for a seed use torch.Generator().manual_seed(seed)."
            )
    return generators


def check_streamer(streamer: Any, count: int) -> None:
    """A transformers streamer (anything with `put` and `end`) follows one request only."""
    if streamer is None:
        return
    if not all(callable(getattr(streamer, m, None)) for m in ("put", "end")):
        raise TypeError(
            f"streamer must be a transformers streamer (with put() and end(), e.g. TextIteratorStreamer), got "
            f"{type(streamer).__name__}."
        )
    if count != 1:
        raise ValueError(f"A streamer follows one request; this batch has {count}. Stream them one at a time.")


def check_processor(processor: Any) -> Any:
    """A `BagelProcessor` (or anything with its methods); None means the model has none."""
    if processor is None:
        raise ValueError(
            "No processor: load the model with from_pretrained from a directory that has tokenizer files, "
            "or pass processor=BagelProcessor.from_pretrained(...)."
        )
    if not all(hasattr(processor, a) for a in ("encode_text", "vae_resize", "vit_transform", "bos_token_id")):
        raise TypeError(
            f"processor must be a BagelProcessor, got {type(processor).__name__}; leave it out to use "
            "model.processor, or pass BagelProcessor.from_pretrained(...) (AutoProcessor with trust_remote_code)."
        )
    return processor


def check_fits_context(totals: list[int], limit: int, name: str, fix: str) -> None:
    """Refuse a call whose sequences (`totals` tokens each) would outgrow the model's context of
    `limit` tokens before anything is allocated for them: past it the rotary positions are
    untrained and memory grows with the square of the length."""
    worst = max(range(len(totals)), key=totals.__getitem__)
    if totals[worst] > limit:
        which = f"request {worst} " if len(totals) > 1 else ""
        raise ValueError(
            f"{name} is too long for the model: {which}needs {totals[worst]} tokens but the model's context holds "
            f"{limit} (text_config.max_position_embeddings). {fix}"
        )


def check_latent_grid(height: Any, width: Any, stride: int, limit: int) -> tuple[int, int]:
    """An image size in pixels -> its latent token grid (h, w): positive multiples of `stride`
    pixels (VAE downsampling x latent patch), at most `limit` tokens a side (`max_latent_size`)."""
    height = check_int("height", height, fix=f"Image sides are positive multiples of {stride} pixels.")
    width = check_int("width", width, fix=f"Image sides are positive multiples of {stride} pixels.")
    if height % stride or width % stride or height <= 0 or width <= 0:
        raise ValueError(f"Image height and width must be positive multiples of {stride}, got {height}x{width}.")
    h, w = height // stride, width // stride
    if h > limit or w > limit:
        raise ValueError(f"{height}x{width} is too large: at most {limit * stride} pixels per side.")
    return h, w


def check_image_sizes(name: str, sizes: Any, count: int | None, stride: int, limit: int) -> list[tuple[int, int]]:
    """(height, width) pairs in pixels, one per sequence (`count` of them, or any number with None)
    -> the latent grid of each (`check_latent_grid`)."""
    if not isinstance(sizes, (list, tuple)) or len(sizes) != (len(sizes) if count is None else count):
        per = "" if count is None else f" per sequence ({count})"
        raise _fail(ValueError, name, sizes, f"a list of one (height, width){per}")
    grids = []
    for i, size in enumerate(sizes):
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise TypeError(f"{name}[{i}] must be a (height, width) pair in pixels, got {_shown(size)}.")
        height, width = check_int_list(f"{name}[{i}]", size)
        grids.append(check_latent_grid(height, width, stride, limit))
    return grids


def check_tensor_shapes(name: str, tensors: Any, shapes: list[tuple[int, ...]], fix: str = "") -> None:
    """A list of tensors, one per entry of `shapes`, each of that shape."""
    if not isinstance(tensors, (list, tuple)):
        raise _fail(TypeError, name, tensors, f"a list of {len(shapes)} tensor(s) of shapes {shapes}", fix)
    if len(tensors) != len(shapes):
        raise ValueError(f"{name} holds {len(tensors)} tensor(s) for {len(shapes)} image(s). {fix}".rstrip())
    for i, tensor in enumerate(tensors):
        check_tensor(f"{name}[{i}]", tensor, fix=fix)
    got = [tuple(t.shape) for t in tensors]
    if got != [tuple(s) for s in shapes]:
        raise ValueError(f"{name} must be one tensor per image of shapes {shapes}, got {got}. {fix}".rstrip())


def check_contexts(contexts: dict[str, Any], kind: type) -> int:
    """Contexts of one batch (`kind`: `BagelContext`), by argument name: each of that kind and all
    of the same batch size, which this returns."""
    sizes = {}
    for name, context in contexts.items():
        check_instance(name, context, kind, "Make one with model.new_context() and the add_* methods.")
        sizes[name] = context.batch_size
    first, size = next(iter(sizes.items()))
    for name, n in sizes.items():
        if n != size:
            raise ValueError(
                f"{name} holds {n} sequences but {first} holds {size}: the guidance contexts are earlier states "
                "of the same batch."
            )
    return size


def check_token_ids(token_ids: Any, count: int, vocab: int) -> None:
    """One list of token ids per sequence, each id within the vocabulary."""
    if not isinstance(token_ids, (list, tuple)) or len(token_ids) != count:
        raise ValueError(f"token_ids must hold one list of ids per sequence ({count}), got {_shown(token_ids)}.")
    for i, ids in enumerate(token_ids):
        ids = check_int_list(f"token_ids[{i}]", ids, minimum=0)
        if ids and max(ids) >= vocab:
            raise ValueError(
                f"token_ids[{i}] holds id {max(ids)}, outside the vocabulary of {vocab} tokens: "
                "encode text with this model's processor (processor.encode_text)."
            )


def check_image_tensors(name: str, images: Any, count: int, fix: str) -> None:
    """One (3, H, W) floating point image tensor per sequence."""
    if not isinstance(images, (list, tuple)) or len(images) != count:
        raise _fail(ValueError, name, images, f"a list of one (3, H, W) image tensor per sequence ({count})", fix)
    for i, image in enumerate(images):
        check_tensor(f"{name}[{i}]", image, dims=3, integer=False, fix=fix)
        if image.shape[0] != 3:
            raise _fail(ValueError, f"{name}[{i}]", image, "a (3, H, W) RGB image tensor", fix)


def check_prompts(prompt: Any, images: Any, one_image_each: bool = False) -> tuple[list[str], list[list]]:
    """(prompt, images) of `chat`, `generate_image` or `edit_image` (`one_image_each`), for one
    request or a batch (a list of prompts) -> per-request lists of prompts and of PIL images."""
    from PIL import Image

    for p in prompt if isinstance(prompt, (list, tuple)) else [prompt]:
        if not isinstance(p, str):
            raise TypeError(f"prompt must be a str or a list of str, got {type(p).__name__}: {p!r}.")
    if isinstance(prompt, (list, tuple)):
        prompts = list(prompt)
        if images is not None and not isinstance(images, (list, tuple)):
            raise ValueError(
                f"Got a list of {len(prompts)} prompts and one {type(images).__name__}: a batch needs a list of "
                f"{len(prompts)} image entries, one per prompt (None, an image or a list of images); for the same "
                f"image in every request pass [image] * {len(prompts)}."
            )
        per_request = [None] * len(prompts) if images is None else list(images)
        if len(per_request) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts but {len(per_request)} image entries; give one per prompt.")
    else:
        prompts, per_request = [prompt], [images]

    image_lists = [[] if x is None else (list(x) if isinstance(x, (list, tuple)) else [x]) for x in per_request]
    for image in (img for images in image_lists for img in images):
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"images must be PIL.Image.Image (None, an image or a list of images), got {type(image).__name__}; "
                "open files with PIL.Image.open(path)."
            )
    if one_image_each and any(len(imgs) != 1 for imgs in image_lists):
        raise ValueError("edit_image takes exactly one image per prompt.")
    return prompts, image_lists


def check_interleave_inputs(
    inputs: Any,
    understanding_output: Any,
    think: Any,
    max_new_tokens: Any,
    do_sample: Any,
    temperature: Any,
    top_p: Any,
    height: Any,
    width: Any,
    seed: Any,
    progress: Any,
    streamer: Any,
) -> tuple[list[list], bool]:
    """`interleave`'s arguments (but `params`, `processor`, `parallel` and `step_cache`, which
    their own types check). Returns the requests (one list of strings and PIL images each) and
    whether `inputs` was a batch."""
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs must be a list of prompts and PIL images, got {type(inputs).__name__}.")
    batched = bool(inputs) and isinstance(inputs[0], (list, tuple))
    if batched:
        for i, request in enumerate(inputs):
            if not isinstance(request, (list, tuple)):
                raise TypeError(
                    f"inputs[{i}] must be a list of prompts and PIL images like inputs[0] (a batch is a list of "
                    f"requests), got {_shown(request)}."
                )
    batch = [list(x) for x in inputs] if batched else [list(inputs)]
    _check_requests(batch)
    check_bool("understanding_output", understanding_output)
    check_bool("think", think)
    check_bool("progress", progress)
    check_int("max_new_tokens", max_new_tokens, minimum=1)
    check_sampling(do_sample, temperature, top_p)
    for name, side in (("height", height), ("width", width)):
        if side is not None:
            check_int(name, side, fix="None: the largest square the checkpoint generates.")
    check_seeds("seed", seed, len(batch))
    check_streamer(streamer, len(batch))
    return batch, batched


def check_embedded_ids(special: Any, vocab: int, *names: str) -> None:
    """The special ids a context embeds (`names` of `special`, a SpecialTokenIds) must be tokens: an
    eos of -1 only means "never stop" to `generate_text_ids`, and on the GPU an id outside the table
    is a device-side assert."""
    for name in names:
        check_int(
            f"special.{name}",
            getattr(special, name),
            minimum=0,
            maximum=vocab - 1,
            fix="Use the processor's special ids; an eos of -1 (never stop) is for generate_text_ids only.",
        )


def _check_requests(batch: list[list]) -> None:
    """Non-empty strings and PIL images, in the same order in every request."""
    from PIL import Image

    if not batch or not batch[0]:
        raise ValueError("Nothing to run: give at least one prompt or image.")
    for request in batch:
        if len(request) != len(batch[0]):
            raise ValueError("All requests of a batch need the same sequence of inputs (e.g. [image, text]).")
        for item, first in zip(request, batch[0]):
            if isinstance(item, str):
                if not item.strip():
                    raise ValueError("Empty prompt: give some text to condition on.")
                if _looks_like_image_path(item):
                    raise TypeError(
                        f"{item!r} looks like an image file path, but inputs take images as PIL.Image.Image (as chat "
                        f"and edit_image do): pass PIL.Image.open({item!r}) instead."
                    )
            elif not isinstance(item, Image.Image):
                raise TypeError(f"Inputs must be str or PIL.Image.Image, got {type(item).__name__}.")
            if isinstance(item, str) != isinstance(first, str):
                raise ValueError("All requests of a batch need the same sequence of inputs (e.g. [image, text]).")


def _looks_like_image_path(text: str) -> bool:
    """One word ending in an image file extension PIL knows (.png, .jpg, ...)."""
    from PIL import Image

    if any(c.isspace() for c in text):
        return False
    suffix = "." + text.rsplit(".", 1)[-1].lower() if "." in text else ""
    return suffix in Image.registered_extensions()


# ----------------------------------------------------------------------------------------------
# The packed training forward (docs/training.md, "Training inputs")
# ----------------------------------------------------------------------------------------------

#: What a keyword of other models' forwards is called here.
TRAINING_KEYWORD_HINTS = {
    "labels": "packed_label_ids (with ce_loss_indexes: which packed tokens predict them)",
    "attention_mask": "sample_lens, split_lens and attn_modes (packs have no padding and no mask)",
    "input_ids": "packed_text_ids (with packed_text_indexes)",
    "position_ids": "packed_position_ids",
    "pixel_values": "packed_vit_tokens (processor(images=...) makes them)",
    "timesteps": "packed_timesteps",
}
ATTN_MODES = ("causal", "full", "noise")
_GROUPS = {
    "packed_vit_tokens": ("packed_vit_token_indexes", "packed_vit_position_ids", "vit_token_seqlens"),
    "padded_latent": (
        "patchified_vae_latent_shapes",
        "packed_latent_position_ids",
        "packed_vae_token_indexes",
        "packed_timesteps",
        "mse_loss_indexes",
        "packed_noise",
    ),
}


def check_training_inputs(model, inputs: dict[str, Any]) -> list[DeviceCheck]:
    """Check the training forward's arguments (`inputs`: its parameters by name, `unused` holding
    any other keyword) against docs/training.md's 'Training inputs' table, before any of them is
    used. The keywords, types, shapes and lengths are checked on the host and raise here. The
    values that index a table (ids within the vocabulary, positions within their tables) are
    returned as checks on their device, for the forward to read with the pack's conventions in its
    one host sync (`raise_failed`): a sync here would leave the GPU idle while the host queues the
    ViT's short kernels."""
    unused = dict(inputs.get("unused") or {})
    if unused.pop("nested_attention_masks", None) is not None:
        raise ValueError("nested_attention_masks is not supported: pass split_lens and attn_modes instead.")
    for key in unused:
        if key in TRAINING_KEYWORD_HINTS:
            raise TypeError(
                f"The BAGEL training forward takes no {key}=: use {TRAINING_KEYWORD_HINTS[key]}, as the "
                "'Training inputs' table of docs/training.md says."
            )
    check_keywords(
        "The BAGEL training forward",
        unused,
        [k for k in inputs if k != "unused"],
        "Its arguments are listed in the 'Training inputs' table of docs/training.md.",
    )
    config = model.config
    get = inputs.get
    length = check_int("sequence_length", get("sequence_length"), minimum=1)
    sample_lens = check_int_list("sample_lens", get("sample_lens"), minimum=1)
    if sum(sample_lens) != length:
        raise ValueError(f"sample_lens add up to {sum(sample_lens)} but sequence_length is {length}.")
    split_lens = get("split_lens")
    attn_modes = get("attn_modes")
    if split_lens is not None or attn_modes is not None:
        split_lens = check_int_list("split_lens", split_lens, minimum=1)
        if not isinstance(attn_modes, (list, tuple)) or len(attn_modes) != len(split_lens):
            raise ValueError(
                f"attn_modes must be a list of one mode per split ({len(split_lens)}), got {_shown(attn_modes)}."
            )
        for i, mode in enumerate(attn_modes):
            check_choice(f"attn_modes[{i}]", mode, ATTN_MODES)
        ends, total = set(), 0
        for n in split_lens:
            total += n
            ends.add(total)
        sample_ends = set(torch.tensor(sample_lens).cumsum(0).tolist())
        if total != length or not sample_ends <= ends:
            raise ValueError(
                f"split_lens ({split_lens}) must cut every sample of sample_lens ({sample_lens}) into "
                "splits exactly: no split may cross the end of a sample."
            )
    else:
        split_lens, attn_modes = list(sample_lens), ["causal"] * len(sample_lens)

    text_ids = check_tensor("packed_text_ids", get("packed_text_ids"), dims=1, integer=True)
    text_index = check_tensor(
        "packed_text_indexes",
        get("packed_text_indexes"),
        dims=1,
        integer=True,
        rows=text_ids.shape[0],
        fix="It gives the packed index of each text id.",
    )
    positions = check_tensor(
        "packed_position_ids",
        get("packed_position_ids"),
        dims=1,
        integer=True,
        rows=length,
        fix="One rope position per packed token.",
    )
    vocab = model.get_input_embeddings().num_embeddings
    ranges = [
        ("packed_text_ids", text_ids, 0, vocab, "Ids index the vocabulary: encode text with model.processor."),
        ("packed_text_indexes", text_index, 0, length, ""),
        (
            "packed_position_ids",
            positions,
            0,
            config.text_config.max_position_embeddings,
            "Rope positions start from 0 in each sample (docs/training.md, 'Training inputs').",
        ),
    ]

    for lead, members in _GROUPS.items():
        if get(lead) is None:
            given = [m for m in members if not _empty(get(m))]  # empty ones describe nothing
            if given:
                raise ValueError(
                    f"{', '.join(given)} given without {lead}: they describe its tokens; pass {lead} "
                    "too, or leave them out."
                )
    if get("packed_vit_tokens") is not None:
        if not config.visual_und or getattr(model.model, "vit_model", None) is None:
            raise ValueError("packed_vit_tokens was given to a model without the ViT (visual_und=False).")
        p = config.vit_patch_size
        vit = check_tensor(
            "packed_vit_tokens",
            get("packed_vit_tokens"),
            dims=2,
            integer=False,
            columns=3 * p * p,
            fix="Patches of the ViT: processor(images=...) or processor.vit_patches(image).",
        )
        for name in ("packed_vit_token_indexes", "packed_vit_position_ids"):
            if get(name) is None:
                raise ValueError(f"packed_vit_tokens needs {name} (docs/training.md, 'Training inputs').")
        vit_index = check_tensor(
            "packed_vit_token_indexes", get("packed_vit_token_indexes"), dims=1, integer=True, rows=vit.shape[0]
        )
        vit_pos = check_tensor(
            "packed_vit_position_ids", get("packed_vit_position_ids"), dims=1, integer=True, rows=vit.shape[0]
        )
        seqlens = get("vit_token_seqlens")
        if seqlens is None:
            raise ValueError("packed_vit_tokens needs vit_token_seqlens (the number of patches of each image).")
        if not torch.is_tensor(seqlens) or seqlens.device.type == "cpu":
            counts = check_int_list("vit_token_seqlens", seqlens, minimum=1)
            if sum(counts) != vit.shape[0]:
                raise ValueError(
                    f"vit_token_seqlens add up to {sum(counts)} but packed_vit_tokens has {vit.shape[0]} "
                    "patches: give the number of patches of each image."
                )
        side = config.vit_max_num_patch_per_side
        ranges += [
            ("packed_vit_token_indexes", vit_index, 0, length, ""),
            ("packed_vit_position_ids", vit_pos, 0, side * side, f"row * {side} + col of each patch."),
        ]

    if get("padded_latent") is not None:
        if not config.visual_gen:
            raise ValueError("padded_latent was given to a stage-1 (understanding-only) model; load it with stage=2.")
        latent = check_tensor(
            "padded_latent",
            get("padded_latent"),
            dims=4,
            integer=False,
            fix="(images, channels, h * 2, w * 2): model.vae.encode(images), zero-padded.",
        )
        channels = model.model.latent_channel
        if latent.shape[1] != channels:
            raise ValueError(f"padded_latent has {latent.shape[1]} channels; the VAE's latents have {channels}.")
        shapes = get("patchified_vae_latent_shapes")
        if not isinstance(shapes, (list, tuple)) or len(shapes) != latent.shape[0]:
            raise ValueError(
                f"patchified_vae_latent_shapes must list one (h, w) per image of padded_latent "
                f"({latent.shape[0]}), got {_shown(shapes)}."
            )
        p, limit = config.latent_patch_size, config.max_latent_size
        for i, shape in enumerate(shapes):
            if not isinstance(shape, (list, tuple)) or len(shape) != 2:
                raise TypeError(f"patchified_vae_latent_shapes[{i}] must be an (h, w) pair, got {_shown(shape)}.")
            h, w = check_int_list(f"patchified_vae_latent_shapes[{i}]", shape, minimum=1)
            if h > limit or w > limit or h * p > latent.shape[2] or w * p > latent.shape[3]:
                raise ValueError(
                    f"patchified_vae_latent_shapes[{i}] = {(h, w)} does not fit: at most {limit} tokens a side "
                    f"(max_latent_size) and within padded_latent's {tuple(latent.shape[2:])} latent pixels "
                    f"({p} a token)."
                )
        tokens = sum(h * w for h, w in shapes)
        names = ("packed_latent_position_ids", "packed_vae_token_indexes", "packed_timesteps")
        for name in names:
            if get(name) is None:
                raise ValueError(f"padded_latent needs {name} (docs/training.md, 'Training inputs').")
        vae_pos, vae_index = (
            check_tensor(
                n,
                get(n),
                dims=1,
                integer=True,
                rows=tokens,
                fix="One per latent token of patchified_vae_latent_shapes.",
            )
            for n in names[:2]
        )
        check_tensor(
            "packed_timesteps",
            get("packed_timesteps"),
            dims=1,
            integer=False,
            rows=tokens,
            fix="One raw timestep per latent token (-inf for a clean image).",
        )
        if get("mse_loss_indexes") is not None:
            check_tensor("mse_loss_indexes", get("mse_loss_indexes"), dims=1, integer=True)
        if get("packed_noise") is not None:
            check_tensor(
                "packed_noise", get("packed_noise"), dims=2, integer=False, rows=tokens, columns=p * p * channels
            )
        ranges += [
            ("packed_vae_token_indexes", vae_index, 0, length, ""),
            ("packed_latent_position_ids", vae_pos, 0, limit * limit, f"row * {limit} + col of each token."),
        ]

    if (get("ce_loss_indexes") is None) != (get("packed_label_ids") is None):
        given, missing = ("ce_loss_indexes", "packed_label_ids")[:: 1 if get("packed_label_ids") is None else -1]
        raise ValueError(f"{given} was given without {missing}: the CE loss needs both (one label per index).")
    if get("ce_loss_indexes") is not None:
        ce_index = check_tensor("ce_loss_indexes", get("ce_loss_indexes"), dims=1, integer=True)
        labels = check_tensor(
            "packed_label_ids",
            get("packed_label_ids"),
            dims=1,
            integer=True,
            rows=ce_index.shape[0],
            fix="One label per index of ce_loss_indexes.",
        )
        if get("ce_loss_weights") is not None:
            check_tensor("ce_loss_weights", get("ce_loss_weights"), dims=1, integer=False, rows=ce_index.shape[0])
        ranges += [
            ("ce_loss_indexes", ce_index, 0, length, ""),
            (
                "packed_label_ids",
                labels,
                0,
                model.get_output_embeddings().out_features,
                "Labels are token ids (no -100: leave such tokens out of ce_loss_indexes).",
            ),
        ]
    check_bool("output_hidden_states", get("output_hidden_states", False))
    return [_in_range(*r) for r in ranges]


def _empty(value: Any) -> bool:
    if torch.is_tensor(value):
        return value.numel() == 0
    return value is None or (isinstance(value, (list, tuple)) and not value)


def _in_range(name: str, t: torch.Tensor, lo: int, hi: int, fix: str) -> DeviceCheck:
    """Every value of `t` in [lo, hi), as a check whose message shows the offending values."""

    def message() -> str:
        bad = t[(t < lo) | (t >= hi)].unique()[:5].tolist()
        among = " among others" if len(bad) == 5 else ""
        return f"{name} must hold values in [{lo}, {hi - 1}]; it holds {bad}{among}. {fix}".rstrip()

    return ((t >= lo) & (t < hi)).all(), message


def raise_failed(checks: list[DeviceCheck]) -> None:
    """Read checks made on the device, (passed, message), with one host sync and raise the first
    that failed; a message is a string or a function that makes it (from the offending values)."""
    if not checks:
        return
    device = checks[0][0].device
    passed = torch.stack([ok.to(device) for ok, _ in checks]).tolist()
    for ok, (_, message) in zip(passed, checks):
        if not ok:
            raise ValueError(message if isinstance(message, str) else message())
