"""BAGEL in the browser: text-to-image, image editing and image understanding (Gradio).

    pip install -r demo/requirements.txt
    python demo/app.py                                     # a tiny random checkpoint: any CPU, seconds
    python demo/app.py --model ByteDance-Seed/BAGEL-7B-MoT [--quantization nf4|int8|float8] [--stage 1]

The knobs and defaults are those of the reference's app (ByteDance-Seed/Bagel, app.py), plus:
streamed text, a progress bar over the denoising steps, several images a prompt (one batch), the
step cache where the model has one, a gallery of the results with their parameters, and the
`generate_image(...)` call that reproduces each picture. It calls the model's public API only.

From a clone, the model classes come from the clone (as examples/quickstart.py loads them). As a
Hugging Face Space this file is the Space's `app.py` and demo/requirements.txt its requirements;
the model (`--model`, or the BAGEL_MODEL variable) is then a Hub repository holding this code
(`trust_remote_code`). README, "Demo".
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import inspect
import logging
import os
import random
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch

logger = logging.getLogger("bagel.demo")

REPO_ROOT = Path(__file__).resolve().parent.parent
IN_CLONE = (REPO_ROOT / "modeling_bagel.py").is_file()
TINY = "tiny"  # --model's default: a tiny random checkpoint written at start (clone only)

# The reference's aspect ratios, width:height, at the largest side the checkpoint generates.
ASPECT_RATIOS = {"1:1": (1, 1), "4:3": (4, 3), "3:4": (3, 4), "16:9": (16, 9), "9:16": (9, 16)}
RENORM_TYPES = ["global", "channel", "text_channel"]
MAX_IMAGES = 4  # images a prompt: one batch
MAX_SEED = 1_000_000
STEP_CACHES = ["taylorseer", "adaptive"]  # generate_image's step_cache names (README, "Faster generation")


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


# --quantization: the configs of the README's "Which GPU do I need", as the "as code" box writes them.
QUANTIZATION = {
    "nf4": 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)',
    "int8": "TorchAoConfig(Int8WeightOnlyConfig())",
    "float8": "TorchAoConfig(Float8DynamicActivationFloat8WeightConfig())",
}


def quantization_config(name: str):
    """The transformers config of `--quantization NAME` (QUANTIZATION[name])."""
    if name == "nf4":
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    from transformers import TorchAoConfig

    if name == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if name == "float8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig

        return TorchAoConfig(Float8DynamicActivationFloat8WeightConfig())
    raise ValueError(f"Unknown --quantization {name!r}: use {', '.join(QUANTIZATION)}.")


def load_model(
    model: str = TINY, quantization: str | None = None, stage: int | None = None, device_map: str | None = None
):
    """The BAGEL model to serve, and the line of Python that loads it so (for the "as code" box)."""
    cuda = torch.cuda.is_available()
    dtype = "bfloat16" if cuda else "float32"
    kwargs = dict(dtype=getattr(torch, dtype), device_map=device_map or ("cuda" if cuda else "cpu"))
    shown = dict(dtype=f"torch.{dtype}", device_map=repr(kwargs["device_map"]))
    if stage is not None:
        kwargs["stage"] = shown["stage"] = stage
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization)
        shown["quantization_config"] = QUANTIZATION[quantization]
    name = model
    if model == TINY:
        if not IN_CLONE:
            raise SystemExit("The tiny checkpoint is made by the clone's scripts/: pass --model (or BAGEL_MODEL).")
        sys.path.insert(0, str(REPO_ROOT / "scripts"))
        from make_tiny_checkpoint import make_tiny_checkpoint

        # Kept for the life of the process (removed at exit with the TemporaryDirectory object).
        load_model.tmp = tempfile.TemporaryDirectory(prefix="bagel-demo-tiny-")
        model = str(make_tiny_checkpoint(Path(load_model.tmp.name) / "bagel-tiny"))
        name = "bagel-tiny"  # python scripts/make_tiny_checkpoint.py --out bagel-tiny
    line = (
        f"AutoModel.from_pretrained({name!r}, trust_remote_code=True, "
        + ", ".join(f"{k}={v}" for k, v in shown.items())
        + ")"
    )
    if IN_CLONE:  # the clone's code, also for checkpoints without it (the released repository)
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        cls = get_class_from_dynamic_module("modeling_bagel.BagelForUnifiedMultimodal", str(REPO_ROOT))
        return cls.from_pretrained(model, **kwargs).eval(), line
    from transformers import AutoModel

    return AutoModel.from_pretrained(model, trust_remote_code=True, **kwargs).eval(), line


# ----------------------------------------------------------------------------------------------
# Requests
# ----------------------------------------------------------------------------------------------


def user_errors(fn):
    """Errors a user can act on (the model's ValueError / TypeError name the argument) as a
    visible message; anything else as a short one, the traceback in the server's log."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, TypeError) as e:
            raise gr.Error(str(e), title="Invalid input") from None
        except torch.OutOfMemoryError:
            logger.exception("out of memory")
            raise gr.Error(
                "Out of memory: try fewer images, a smaller aspect ratio or fewer thinking tokens.",
                title="Out of memory",
            ) from None
        except Exception as e:
            logger.exception("request failed")
            raise gr.Error(f"The model failed ({type(e).__name__}: {e}). Details are in the server log.") from None

    return wrapper


def resolve_seed(seed) -> int:
    """The reference's rule: 0 draws a random seed (shown with the result, so it can be reused)."""
    seed = int(seed or 0)
    return seed if seed > 0 else random.randint(1, MAX_SEED)


def check_prompt(prompt: str | None) -> str:
    if prompt is None or not prompt.strip():
        raise gr.Error("Enter a prompt first.", title="Empty prompt")
    return prompt


def streamed(call, tokenizer, stream: bool):
    """Run `call(streamer)`, yielding (text so far, None) while the model decodes, then (text,
    result). The call runs in a thread that keeps this request's context (Gradio's progress
    tracking follows the tqdm bar of the denoising loop through it)."""
    if not stream:
        yield "", call(None)
        return
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)  # the text the call returns, as it grows
    outcome = {}

    def work():
        try:
            outcome["result"] = call(streamer)
        except BaseException as e:  # handed to the request below
            outcome["error"] = e
            streamer.end()  # the reader stops waiting (a second end after the model's own is harmless)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True)
    thread.start()
    text = ""
    try:
        for piece in streamer:
            text += piece
            yield text, None
    finally:  # also when the page went away mid-stream: the next request starts after this call ends
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    yield text, outcome["result"]


def as_code(method: str, args: list[str], kwargs: dict, target: str, load: str) -> str:
    """The Python call that reproduces a result, one keyword a line."""
    lines = [f"# model = {load}", f"{target} = model.{method}("]
    lines += [f"    {a}," for a in args] + [f"    {k}={v!r}," for k, v in kwargs.items()] + [")"]
    return "\n".join(lines)


@dataclass
class Result:
    image: object
    caption: str
    code: str


class BagelDemo:
    """The Gradio Blocks around one loaded model."""

    def __init__(self, model, load_line: str = "AutoModel.from_pretrained(REPO, trust_remote_code=True)"):
        self.model = model
        self.tokenizer = model.processor.tokenizer
        self.can_generate = bool(model.config.visual_gen)
        # The step cache where this version of the model has one (generate_image's `step_cache`).
        self.step_cache = can_generate_with(model, "step_cache")
        self.load_line = load_line
        if self.can_generate:
            # generate_image's default size: the largest the checkpoint generates (1024 for BAGEL-7B-MoT).
            self.stride = model.vae.downsample * model.config.latent_patch_size
            side = min(model.processor.vae_max_size // self.stride, model.config.max_latent_size)
            self.long_side = side * self.stride

    def image_size(self, ratio: str) -> tuple[int, int]:
        """(height, width) of an aspect ratio, the long side the largest the checkpoint generates."""
        if ratio not in ASPECT_RATIOS:
            raise gr.Error(f"Unknown aspect ratio {ratio!r}: pick one of {', '.join(ASPECT_RATIOS)}.")
        w, h = ASPECT_RATIOS[ratio]
        short = max(self.stride, round(self.long_side * min(w, h) / max(w, h) / self.stride) * self.stride)
        return (self.long_side, short) if h > w else (short, self.long_side) if w > h else (self.long_side,) * 2

    # --- handlers: generators of output updates ----------------------------------------------

    @user_errors
    def text_to_image(
        self,
        prompt,
        count,
        think,
        seed,
        ratio,
        cfg_text_scale,
        cfg_interval_start,
        cfg_renorm_type,
        cfg_renorm_min,
        num_steps,
        timestep_shift,
        step_cache,
        do_sample,
        max_think_tokens,
        temperature,
        history,
        progress=gr.Progress(track_tqdm=True),
    ):
        prompt = check_prompt(prompt)
        height, width = self.image_size(ratio)
        kwargs = dict(
            height=height,
            width=width,
            num_steps=int(num_steps),
            cfg_text_scale=float(cfg_text_scale),
            cfg_interval=(float(cfg_interval_start), 1.0),
            cfg_renorm_type=cfg_renorm_type,
            cfg_renorm_min=float(cfg_renorm_min),
            timestep_shift=float(timestep_shift),
        )
        yield from self._generate(
            "generate_image",
            [],
            prompt,
            count,
            think,
            seed,
            kwargs,
            step_cache,
            do_sample,
            max_think_tokens,
            temperature,
            history,
        )

    @user_errors
    def edit(
        self,
        image,
        prompt,
        count,
        think,
        seed,
        cfg_text_scale,
        cfg_img_scale,
        cfg_interval_start,
        cfg_renorm_type,
        cfg_renorm_min,
        num_steps,
        timestep_shift,
        step_cache,
        do_sample,
        max_think_tokens,
        temperature,
        history,
        progress=gr.Progress(track_tqdm=True),
    ):
        if image is None:
            raise gr.Error("Upload an image to edit first.", title="No image")
        prompt = check_prompt(prompt)
        kwargs = dict(
            num_steps=int(num_steps),
            cfg_text_scale=float(cfg_text_scale),
            cfg_img_scale=float(cfg_img_scale),
            cfg_interval=(float(cfg_interval_start), 1.0),
            cfg_renorm_type=cfg_renorm_type,
            cfg_renorm_min=float(cfg_renorm_min),
            timestep_shift=float(timestep_shift),
        )
        yield from self._generate(
            "edit_image",
            [image],
            prompt,
            count,
            think,
            seed,
            kwargs,
            step_cache,
            do_sample,
            max_think_tokens,
            temperature,
            history,
        )

    def _generate(
        self,
        method,
        images,
        prompt,
        count,
        think,
        seed,
        kwargs,
        step_cache,
        do_sample,
        max_think_tokens,
        temperature,
        history,
    ):
        count, seed = int(count), resolve_seed(seed)
        if think:
            kwargs.update(think=True, max_think_tokens=int(max_think_tokens), do_sample=bool(do_sample))
            if do_sample:
                kwargs["temperature"] = float(temperature)
        if self.step_cache and step_cache not in (None, "", "off"):
            kwargs["step_cache"] = step_cache
        batch = count > 1
        call = functools.partial(
            getattr(self.model, method),
            *([images * count] if batch and images else images),
            [prompt] * count if batch else prompt,
            seed=seed,
            **kwargs,
        )
        # One request streams its thinking; a batch's thinking comes with its images.
        for thinking, result in streamed(lambda streamer: call(streamer=streamer), self.tokenizer, think and not batch):
            if result is None:
                yield thinking, gr.skip(), gr.skip(), gr.skip()
        results = result if batch else [result]
        thoughts = [r[0] for r in results] if think else []
        pictures = [r[1] for r in results] if think else results
        args = ["image"] if images else []  # the input image of an edit, under that name
        target = "thought, image" if think else "image"
        new = []
        for i, picture in enumerate(pictures):  # request i of a batch is seed + i (alone: the same up to rounding)
            code = as_code(method, args + [repr(prompt)], dict(kwargs, seed=seed + i), target, self.load_line)
            caption = (
                f"{'edit' if images else 'text'} · seed {seed + i} · {kwargs['num_steps']} steps · "
                f"{picture.width}x{picture.height}"
            )  # all of them in its code
            new.append(Result(picture, caption, code))
        history = history + new
        if batch:  # the batch's call; each picture's own (seed + i) is in the gallery
            batch_args = ([f"[image] * {count}"] if images else []) + [f"[{prompt!r}] * {count}"]
            code = as_code(method, batch_args, dict(kwargs, seed=seed), "results", self.load_line)
            code += f"\n# request i uses seed {seed} + i: as alone, up to float rounding"
        else:
            code = new[0].code
        thinking = "\n\n".join(thoughts)
        yield thinking, [(r.image, r.caption) for r in new], code, history

    @user_errors
    def understand(self, image, prompt, think, do_sample, temperature, max_new_tokens, seed):
        if image is None:
            raise gr.Error("Upload an image to ask about first.", title="No image")
        prompt = check_prompt(prompt)
        kwargs = dict(think=bool(think), max_new_tokens=int(max_new_tokens), do_sample=bool(do_sample))
        if do_sample:
            kwargs.update(temperature=float(temperature), seed=resolve_seed(seed))
        code = as_code("chat", ["image", repr(prompt)], kwargs, "answer", self.load_line)

        def call(streamer):
            return self.model.chat(image, prompt, streamer=streamer, **kwargs)

        for text, answer in streamed(call, self.tokenizer, True):
            yield (text if answer is None else answer), code

    @staticmethod
    def _gallery(history: list[Result]):
        return [(r.image, r.caption) for r in reversed(history)]  # newest first

    @staticmethod
    def show_code(history: list[Result], evt: gr.SelectData):
        return history[len(history) - 1 - evt.index].code

    # --- layout --------------------------------------------------------------------------------

    def _image_knobs(self, tab: str, img_scale: bool, shift_max: float):
        """The reference's "Inference Hyperparameters" of an image tab, in its order, each at the
        model's own default (`model_defaults`)."""
        names = ["cfg_text_scale", "cfg_img_scale", "cfg_interval", "cfg_renorm_type", "cfg_renorm_min"]
        names += ["num_steps", "timestep_shift", "max_think_tokens", "do_sample", "temperature"]
        d = model_defaults(self.model, "image_editing" if tab == "edit" else "image_generation", names)
        k = {}
        with gr.Accordion("Inference hyperparameters", open=False, elem_id=f"{tab}-knobs"):
            with gr.Row():
                k["seed"] = gr.Slider(
                    0,
                    MAX_SEED,
                    value=0,
                    step=1,
                    label="Seed",
                    elem_id=f"{tab}-seed",
                    info="0 for a random seed (shown with the result), positive to reproduce",
                )
                if tab == "t2i":
                    k["ratio"] = gr.Dropdown(
                        list(ASPECT_RATIOS),
                        value="1:1",
                        label="Aspect ratio",
                        elem_id="t2i-ratio",
                        info=f"width:height, the longer side {self.long_side}",
                    )
                k["count"] = gr.Slider(
                    1,
                    MAX_IMAGES,
                    value=1,
                    step=1,
                    label="Images",
                    elem_id=f"{tab}-count",
                    info="images a prompt, generated as one batch (seeds seed, seed + 1, ...)",
                )
            with gr.Row():
                k["cfg_text_scale"] = gr.Slider(
                    1.0,
                    8.0,
                    value=d["cfg_text_scale"],
                    step=0.1,
                    label="Text guidance",
                    elem_id=f"{tab}-cfg-text",
                    info="how strongly the image follows the prompt",
                )
                if img_scale:
                    k["cfg_img_scale"] = gr.Slider(
                        1.0,
                        4.0,
                        value=d["cfg_img_scale"],
                        step=0.1,
                        label="Image guidance",
                        elem_id=f"{tab}-cfg-img",
                        info="how much of the input image's detail is kept",
                    )
                k["cfg_interval_start"] = gr.Slider(
                    0.0,
                    1.0,
                    value=d["cfg_interval"][0],
                    step=0.1,
                    label="Guidance interval start",
                    elem_id=f"{tab}-cfg-interval",
                    info="guidance applies for t in (start, 1]",
                )
            with gr.Row():
                k["cfg_renorm_type"] = gr.Dropdown(
                    RENORM_TYPES,
                    value=d["cfg_renorm_type"],
                    label="Renorm type",
                    elem_id=f"{tab}-renorm",
                    info="if the image is blurry, use 'global'",
                )
                k["cfg_renorm_min"] = gr.Slider(
                    0.0,
                    1.0,
                    value=d["cfg_renorm_min"],
                    step=0.1,
                    label="Renorm min",
                    elem_id=f"{tab}-renorm-min",
                    info="1.0 disables renormalisation",
                )
            with gr.Row():
                k["num_steps"] = gr.Slider(
                    10,
                    100,
                    value=d["num_steps"],
                    step=1,
                    label="Denoising steps",
                    elem_id=f"{tab}-steps",
                    info="model evaluations (the reference's timesteps count one more)",
                )
                k["timestep_shift"] = gr.Slider(
                    1.0,
                    shift_max,
                    value=d["timestep_shift"],
                    step=0.5,
                    label="Timestep shift",
                    elem_id=f"{tab}-shift",
                    info="higher for layout, lower for detail",
                )
            with gr.Row(visible=self.step_cache):
                k["step_cache"] = gr.Dropdown(
                    ["off", *STEP_CACHES],
                    value="off",
                    label="Step cache",
                    visible=self.step_cache,
                    elem_id=f"{tab}-step-cache",
                    info="predict the decoder on some steps: faster, approximate",
                )
            with gr.Group(visible=False) as thinking_knobs:
                with gr.Row():
                    k["do_sample"] = gr.Checkbox(
                        label="Sampling",
                        value=d["do_sample"],
                        elem_id=f"{tab}-sample",
                        info="sample the thinking text (else greedy)",
                    )
                    k["max_think_tokens"] = gr.Slider(
                        8,
                        4096,
                        value=d["max_think_tokens"],
                        step=8,
                        label="Max thinking tokens",
                        elem_id=f"{tab}-think-tokens",
                    )
                    k["temperature"] = gr.Slider(
                        0.1, 1.0, value=d["temperature"], step=0.1, label="Temperature", elem_id=f"{tab}-temperature"
                    )
        return k, thinking_knobs

    def _image_tab(self, tab: str, history, history_gallery):
        edit = tab == "edit"
        with gr.Row():
            with gr.Column():
                image = (
                    gr.Image(
                        label="Input image",
                        type="pil",
                        image_mode=None,
                        format="png",
                        sources=["upload", "clipboard"],
                        elem_id="edit-input",
                    )
                    if edit
                    else None
                )
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=2,
                    elem_id=f"{tab}-prompt",
                    placeholder="What to change" if edit else "What to draw",
                )
                think = gr.Checkbox(
                    label="Thinking", value=False, elem_id=f"{tab}-think", info="the model writes a plan first"
                )
                button = gr.Button("Edit" if edit else "Generate", variant="primary", elem_id=f"{tab}-run")
                knobs, thinking_knobs = self._image_knobs(tab, img_scale=edit, shift_max=10.0 if edit else 5.0)
            with gr.Column():
                thinking = gr.Textbox(label="Thinking", lines=4, visible=False, elem_id=f"{tab}-thinking")
                gallery = gr.Gallery(
                    label="Result", format="png", columns=2, height=360, preview=False, elem_id=f"{tab}-gallery"
                )
                code = gr.Code(label="As code", language="python", elem_id=f"{tab}-code")
        think.change(
            lambda on: (gr.update(visible=on), gr.update(visible=on)), think, [thinking, thinking_knobs], queue=False
        )
        names = (["cfg_text_scale", "cfg_img_scale"] if edit else ["ratio", "cfg_text_scale"]) + [
            "cfg_interval_start",
            "cfg_renorm_type",
            "cfg_renorm_min",
            "num_steps",
            "timestep_shift",
            "step_cache",
            "do_sample",
            "max_think_tokens",
            "temperature",
        ]  # the handler's arguments after the seed
        order = ([image] if edit else []) + [prompt, knobs["count"], think, knobs["seed"]]
        order += [knobs[n] for n in names] + [history]
        # The shared gallery follows the history only after a success (an error marks only this tab's outputs).
        gr.on(
            [button.click, prompt.submit],
            self.edit if edit else self.text_to_image,
            order,
            [thinking, gallery, code, history],
            concurrency_id="model",
            api_name=tab,
        ).success(self._gallery, history, history_gallery, queue=False)

    def _understanding_tab(self):
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    label="Input image",
                    type="pil",
                    image_mode=None,
                    format="png",
                    sources=["upload", "clipboard"],
                    elem_id="und-input",
                )
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="Ask about the image", elem_id="und-prompt")
                think = gr.Checkbox(
                    label="Thinking", value=False, elem_id="und-think", info="the model reasons before it answers"
                )
                button = gr.Button("Ask", variant="primary", elem_id="und-run")
                d = model_defaults(self.model, None, ["do_sample", "temperature", "max_new_tokens"])
                with gr.Accordion("Inference hyperparameters", open=False, elem_id="und-knobs"):
                    with gr.Row():
                        do_sample = gr.Checkbox(
                            label="Sampling",
                            value=d["do_sample"],
                            elem_id="und-sample",
                            info="sample the answer (else greedy)",
                        )
                        temperature = gr.Slider(
                            0.05, 1.0, value=d["temperature"], step=0.05, label="Temperature", elem_id="und-temperature"
                        )
                    with gr.Row():
                        max_new_tokens = gr.Slider(
                            8,
                            4096,
                            value=d["max_new_tokens"],
                            step=8,
                            label="Max new tokens",
                            elem_id="und-tokens",
                            info="thinking included",
                        )
                        seed = gr.Slider(
                            0,
                            MAX_SEED,
                            value=0,
                            step=1,
                            label="Seed",
                            elem_id="und-seed",
                            info="with sampling: 0 for a random seed",
                        )
            with gr.Column():
                answer = gr.Textbox(label="Answer", lines=12, elem_id="und-answer")
                code = gr.Code(label="As code", language="python", elem_id="und-code")
        gr.on(
            [button.click, prompt.submit],
            self.understand,
            [image, prompt, think, do_sample, temperature, max_new_tokens, seed],
            [answer, code],
            concurrency_id="model",
            api_name="understand",
        )

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="BAGEL") as demo:
            gr.Markdown("# BAGEL\nText-to-image, image editing and image understanding with one model.")
            history = gr.State([])
            # The results of both image tabs, shown below the tabs (rendered there).
            history_gallery = gr.Gallery(
                label="Results so far (newest first; select one for its code)",
                format="png",
                columns=6,
                height=300,
                preview=False,
                fit_columns=False,
                elem_id="history",
                render=False,
            )
            history_code = gr.Code(
                label="As code (selected result)", language="python", elem_id="history-code", render=False
            )
            with gr.Tabs():
                if self.can_generate:
                    with gr.Tab("Text to image", id="t2i", elem_id="tab-t2i"):
                        self._image_tab("t2i", history, history_gallery)
                    with gr.Tab("Image edit", id="edit", elem_id="tab-edit"):
                        self._image_tab("edit", history, history_gallery)
                with gr.Tab("Image understanding", id="und", elem_id="tab-und"):
                    self._understanding_tab()
            if self.can_generate:
                with gr.Row():
                    history_gallery.render()
                    history_code.render()
                history_gallery.select(self.show_code, history, history_code, queue=False)
            else:
                gr.Markdown("This model was loaded for understanding only (stage 1): no image generation.")
        return demo


def model_defaults(model, task: str | None, names: list[str]) -> dict:
    """The model's own defaults for the arguments `names` (`task`: "image_generation" or
    "image_editing" for generate_image / edit_image, None for text decoding): what a call that leaves
    them out uses (the checkpoint's generation_config.json, else BAGEL's). Model versions from before
    generation_config.json typed them as their methods' default values."""
    if hasattr(model, "default_sampling_arguments"):
        defaults = model.default_sampling_arguments(task)
        return {name: defaults[name] for name in names}
    method = {"image_editing": model.edit_image, "image_generation": model.generate_image}.get(task, model.chat)
    parameters = inspect.signature(method).parameters
    return {name: parameters[name].default for name in names}


def can_generate_with(model, argument: str) -> bool:
    return argument in inspect.signature(model.generate_image).parameters


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    env = os.environ.get
    parser.add_argument(
        "--model",
        default=env("BAGEL_MODEL", TINY),
        help="Hub id or directory of a BAGEL checkpoint (default: a tiny random one, to try the app)",
    )
    parser.add_argument(
        "--quantization",
        choices=list(QUANTIZATION),
        default=env("BAGEL_QUANTIZATION") or None,
        help="load quantized: nf4 (bitsandbytes), int8 (torchao weight-only), float8 (torchao)",
    )
    parser.add_argument(
        "--stage",
        type=int,
        choices=[1, 2],
        default=int(env("BAGEL_STAGE", 0)) or None,
        help="1: understanding only (about half the memory)",
    )
    parser.add_argument(
        "--device-map",
        default=env("BAGEL_DEVICE_MAP") or None,
        help='"auto" spreads the model over all GPUs (default: one GPU, else the CPU)',
    )
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1, 0.0.0.0 on a Space)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="a temporary public link through Gradio")
    parser.add_argument("--max-queue", type=int, default=16, help="requests waiting at most; more are refused")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model, load_line = load_model(args.model, args.quantization, args.stage, args.device_map)
    demo = BagelDemo(model, load_line).build()
    # One model call at a time (concurrency_id "model"); further requests wait in the queue, shown in the page.
    demo.queue(default_concurrency_limit=1, max_size=args.max_queue)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True, max_file_size="50mb")


if __name__ == "__main__":
    main()
