"""The Gradio demo (demo/app.py) on the tiny checkpoint: started as a user starts it and driven in
headless Chromium (Debian's `chromium`, through Playwright), plus its handlers called directly.

The browser tests compare what the page shows with the tiny model loaded here: the "as code" box,
run in this process, must give the picture the page shows, pixel for pixel, which checks that
every parameter reached the model. Screenshots of each tab go to $DEMO_SCREENSHOTS (else a
temporary directory). Without gradio, playwright or chromium these tests skip, except under
CI=true, where they fail (.ci/run installs them).
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from PIL import Image

CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
TIMEOUT_MS = 60_000
TIMINGS: dict[str, float] = {}


def _missing(reason: str):
    if CI:
        pytest.fail(f"{reason} (CI installs it: .ci/run)")
    pytest.skip(reason)


def _load_app():
    if importlib.util.find_spec("gradio") is None:
        _missing("gradio is not installed: pip install -r demo/requirements.txt")
    if "bagel_demo_app" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bagel_demo_app", REPO_ROOT / "demo" / "app.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bagel_demo_app"] = module
        spec.loader.exec_module(module)
    return sys.modules["bagel_demo_app"]


@pytest.fixture(scope="module")
def app():
    return _load_app()


@pytest.fixture(scope="module")
def tiny(app):
    """The tiny checkpoint loaded here as the app loads it: the same random weights as the server's."""
    model, load_line = app.load_model()
    return model, load_line


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> Path:
    path = Path(os.environ.get("DEMO_SCREENSHOTS") or tmp_path_factory.mktemp("demo-screenshots"))
    path.mkdir(parents=True, exist_ok=True)
    yield path
    (path / "timings.json").write_text(json.dumps(TIMINGS, indent=1))
    print(f"\ndemo screenshots and timings (seconds) in {path}: {json.dumps(TIMINGS)}")


@pytest.fixture(scope="module")
def server(app, artefacts, request):
    """`python demo/app.py` (the tiny checkpoint) on a free local port; its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    log = open(artefacts / "server.log", "w")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO_ROOT / "demo" / "app.py"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-queue",
            "8",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=REPO_ROOT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        request.getfixturevalue("tiny")  # loaded here while the server starts
        while True:
            if proc.poll() is not None:
                log_tail = (artefacts / "server.log").read_text()[-3000:]
                pytest.fail(f"demo/app.py exited with {proc.returncode}: {log_tail}")
            if time.perf_counter() - start > 120:
                pytest.fail("demo/app.py did not answer within 120 s")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.3)
        TIMINGS["start (process to first page; this process loaded the model meanwhile)"] = round(
            time.perf_counter() - start, 2
        )
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed: pip install -r requirements-test.txt")
    if not Path(CHROMIUM).exists():
        _missing(f"no chromium at {CHROMIUM}: apt-get install chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server, artefacts, request):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server)
    page.wait_for_selector("#t2i-prompt")
    yield page
    snapshot(page, artefacts / f"end-of-{request.node.name}.png")  # what the page showed, for a failure
    context.close()


# --- page helpers -----------------------------------------------------------------------------


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def set_number(page, elem_id: str, value) -> None:
    """A slider's number box; its "Inference hyperparameters" accordion opened first (by its header)."""
    box = page.locator(f"#{elem_id} input[type=number]")
    knobs = page.locator(f"#{elem_id.split('-')[0]}-knobs")
    if not knobs.locator("input[type=number]").first.is_visible():
        knobs.get_by_text("Inference hyperparameters").click()
    box.wait_for(state="visible")
    for _ in range(10):  # a box filled while the accordion's contents mount can be reset: fill until it holds
        box.fill(str(value))
        box.press("Enter")
        page.wait_for_timeout(200)
        if float(box.input_value() or "nan") == float(value):
            return
    raise AssertionError(f"#{elem_id} does not keep the value {value}")


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def upload(page, elem_id: str, path: Path) -> None:
    remove = page.locator(f"#{elem_id} button[aria-label='Remove Image']")
    if remove.count():
        remove.click()
    page.locator(f"#{elem_id} input[type=file]").set_input_files(str(path))
    page.wait_for_selector(f"#{elem_id} img")


def history_count(page) -> int:
    return page.locator("#history img").count()


def run_image_tab(page, tab: str, new_images: int) -> float:
    """Click the tab's button and wait for `new_images` more results in the shared gallery."""
    before = history_count(page)
    start = time.perf_counter()
    page.click(f"#{tab}-run")
    page.wait_for_function(
        f"document.querySelectorAll('#history img').length >= {before + new_images}", timeout=TIMEOUT_MS
    )
    return time.perf_counter() - start


def shown_images(page, elem_id: str) -> list[Image.Image]:
    """The pictures of a gallery, as the browser fetched them (PNG: exact pixels)."""
    sources = [img.get_attribute("src") for img in page.locator(f"#{elem_id} img").all()]
    return [Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB") for src in sources]


def code_of(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} .cm-content").inner_text()


def run_code(code: str, model, **names):
    """Execute an "as code" box's text with `model` (and e.g. `image`) defined; its result."""
    scope = dict(model=model, **names)
    exec(code, scope)  # noqa: S102 - the text the page shows a user to paste
    return scope


def expect_error(page, text: str) -> str:
    toast = page.locator(".toast-body", has_text=text)
    toast.first.wait_for(timeout=TIMEOUT_MS)
    message = toast.first.inner_text()
    assert "Traceback" not in message and 'File "' not in message
    for close in page.locator(".toast-close").all():
        close.click()
    return message


def snapshot(page, path: Path) -> None:
    """A full-page screenshot once every picture has loaded (and menus have faded)."""
    page.wait_for_function("[...document.images].every(i => i.complete)", timeout=10_000)
    page.wait_for_timeout(300)
    page.screenshot(path=str(path), full_page=True)


WATCH = """(selectors) => { window.__seen = []; clearInterval(window.__watch);
  window.__watch = setInterval(() => { for (const s of selectors) { const e = document.querySelector(s);
    const v = e ? (e.value !== undefined ? e.value : e.innerText) : '';
    if (v && !window.__seen.includes(s + '|' + v)) window.__seen.push(s + '|' + v); } }, 5); }"""


def watch(page, *selectors: str) -> None:
    """Record every distinct text the elements show from now on (streaming, progress)."""
    page.evaluate(WATCH, list(selectors))


def seen(page, selector: str) -> list[str]:
    return [v.split("|", 1)[1] for v in page.evaluate("window.__seen") if v.startswith(selector + "|")]


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def as_shown(text: str) -> str:
    """A text as a textarea holds it (line breaks normalised to \\n; the tiny model writes any byte)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def close(a: Image.Image, b: Image.Image) -> bool:
    """Equal up to float rounding: a request in a batch against the same request alone (the
    batched matmuls sum in another order; a few pixels move by one level)."""
    if a.size != b.size:
        return False
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    return diff.max() <= 2 and (diff > 0).mean() < 0.01


def picture(result) -> Image.Image:
    return result.convert("RGB")


# --- the browser tests -----------------------------------------------------------------------


def test_text_to_image_tab(page, tiny, artefacts):
    """Prompt, seed, aspect ratio and batch size reach the model; the same seed gives the same
    picture, another seed another; the code box reproduces the pictures; the gallery keeps them."""
    model, _ = tiny
    page.fill("#t2i-prompt textarea", "a red fox in the snow")
    set_number(page, "t2i-seed", 7)
    set_number(page, "t2i-count", 2)
    choose(page, "t2i-ratio", "16:9")
    watch(page, "#t2i-gallery .progress-text")
    TIMINGS["text-to-image, 2 images, 50 steps"] = round(run_image_tab(page, "t2i", 2), 2)
    progress = seen(page, "#t2i-gallery .progress-text")
    assert any("/50" in p for p in progress), progress  # the bar counts the denoising steps
    pair = shown_images(page, "t2i-gallery")
    assert [im.size for im in pair] == [(256, 144)] * 2 and not same(*pair)  # 16:9 at the long side 256
    code = code_of(page, "t2i-code")
    assert "['a red fox in the snow'] * 2" in code and "seed=7" in code and "height=144" in code
    expected = run_code(code, model)["results"]
    assert all(same(shown, picture(e)) for shown, e in zip(pair, expected))

    set_number(page, "t2i-count", 1)  # alone, seed 8 is the batch's second picture (within rounding)
    set_number(page, "t2i-seed", 8)
    TIMINGS["text-to-image, 1 image, 50 steps"] = round(run_image_tab(page, "t2i", 1), 2)
    (alone,) = shown_images(page, "t2i-gallery")
    assert close(alone, pair[1])
    run_image_tab(page, "t2i", 1)  # the same seed again: the same picture, exactly
    (again,) = shown_images(page, "t2i-gallery")
    assert same(again, alone)
    set_number(page, "t2i-seed", 9)
    run_image_tab(page, "t2i", 1)
    (other,) = shown_images(page, "t2i-gallery")
    assert not close(other, alone) and "seed=9" in code_of(page, "t2i-code")

    history = shown_images(page, "history")  # newest first: seeds 9, 8, 8, 7 + 1, 7
    assert len(history) == 5 and same(history[0], other) and same(history[1], alone) and same(history[4], pair[0])
    page.locator("#history img").nth(4).click()
    page.wait_for_function("document.querySelector('#history-code .cm-content')?.innerText.includes('seed=7')")
    reproduced = run_code(code_of(page, "history-code"), model)["image"]  # the batch's first picture, alone
    assert close(picture(reproduced), pair[0])
    page.keyboard.press("Escape")

    has_cache = "step_cache" in inspect.signature(model.generate_image).parameters
    assert page.locator("#t2i-seed").is_visible() and page.locator("#t2i-step-cache").is_visible() == has_cache
    if has_cache:  # the control is shown where the model has a step cache
        choose(page, "t2i-step-cache", "taylorseer")
        run_image_tab(page, "t2i", 1)
        code = code_of(page, "t2i-code")
        assert "step_cache='taylorseer'" in code and "seed=9" in code
        (cached,) = shown_images(page, "t2i-gallery")
        assert same(cached, picture(run_code(code, model)["image"])) and not same(cached, other)
    snapshot(page, artefacts / "text-to-image.png")


def test_text_to_image_thinking_streams(page, tiny, artefacts):
    model, _ = tiny
    page.check("#t2i-think input[type=checkbox]")
    page.wait_for_selector("#t2i-thinking textarea")
    page.fill("#t2i-prompt textarea", "a castle made of books")
    set_number(page, "t2i-seed", 3)
    set_number(page, "t2i-think-tokens", 256)
    page.check("#t2i-sample input[type=checkbox]")  # sampled: the tiny model's text then has spaces (words stream)
    set_number(page, "t2i-temperature", 1.0)
    watch(page, "#t2i-thinking textarea")
    TIMINGS["text-to-image with thinking (256 tokens), 50 steps"] = round(run_image_tab(page, "t2i", 1), 2)
    thought = page.locator("#t2i-thinking textarea").input_value()
    texts = seen(page, "#t2i-thinking textarea")
    assert len(thought) > 0 and texts[-1] == thought
    assert len(texts) >= 2 and all(thought.startswith(t) for t in texts)  # shown in pieces as it was decoded
    code = code_of(page, "t2i-code")
    assert "think=True" in code and "max_think_tokens=256" in code and "temperature=1.0" in code and "seed=3," in code
    scope = run_code(code, model)
    assert as_shown(scope["thought"]) == thought and same(picture(scope["image"]), shown_images(page, "t2i-gallery")[0])
    snapshot(page, artefacts / "text-to-image-thinking.png")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Input files of the modes and sizes a user may upload."""
    root = tmp_path_factory.mktemp("demo-inputs")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    made = {
        "RGBA": Image.fromarray(np.dstack([rgb, np.full((96, 128), 128, np.uint8)]), "RGBA"),
        "P": Image.fromarray(rgb).convert("P"),
        "I;16": Image.fromarray((np.arange(96 * 128).reshape(96, 128) * 5).astype(np.uint16)),
        "L": Image.fromarray(rgb[..., 0]),
        "1x1": Image.new("RGB", (1, 1), "red"),
        "huge": Image.new("L", (8200, 8200), 200),  # 67 megapixels, past the processor's 64
    }
    paths = {}
    for name, image in made.items():
        paths[name] = root / f"{name.replace(';', '')}.png"
        image.save(paths[name])
    assert Image.open(paths["I;16"]).mode.startswith("I")
    return paths


def test_edit_tab(page, tiny, images, artefacts):
    """No image, an empty prompt and a bad size show their messages; RGBA, palette, 16-bit and
    grayscale uploads are edited, reproducibly from the code box."""
    model, _ = tiny
    open_tab(page, "Image edit")
    page.fill("#edit-prompt textarea", "make the sky green")
    page.click("#edit-run")
    expect_error(page, "Upload an image")
    upload(page, "edit-input", images["RGBA"])
    page.fill("#edit-prompt textarea", "   ")
    page.click("#edit-run")
    expect_error(page, "Enter a prompt")

    page.fill("#edit-prompt textarea", "make the sky green")
    set_number(page, "edit-seed", 5)
    set_number(page, "edit-steps", 20)
    set_number(page, "edit-cfg-img", 1.5)
    TIMINGS["image edit, 20 steps"] = round(run_image_tab(page, "edit", 1), 2)
    (edited,) = shown_images(page, "edit-gallery")
    code = code_of(page, "edit-code")
    assert "num_steps=20" in code and "cfg_img_scale=1.5" in code and "seed=5" in code
    assert same(edited, picture(run_code(code, model, image=Image.open(images["RGBA"]))["image"]))
    snapshot(page, artefacts / "image-edit.png")

    for mode in ("P", "I;16", "L"):
        upload(page, "edit-input", images[mode])
        run_image_tab(page, "edit", 1)
        (result,) = shown_images(page, "edit-gallery")
        expected = run_code(code_of(page, "edit-code"), model, image=Image.open(images[mode]))["image"]
        assert same(result, picture(expected))
    for bad in ("1x1", "huge"):
        upload(page, "edit-input", images[bad])
        page.click("#edit-run")
        assert "out of range" in expect_error(page, "out of range")
    # the page still works after the errors
    upload(page, "edit-input", images["RGBA"])
    run_image_tab(page, "edit", 1)


def test_understanding_tab(page, tiny, images, artefacts):
    """The answer streams into the page and equals chat's with the same arguments."""
    model, _ = tiny
    open_tab(page, "Image understanding")
    page.fill("#und-prompt textarea", "What is in this picture?")
    page.click("#und-run")
    expect_error(page, "Upload an image")
    upload(page, "und-input", images["RGBA"])
    set_number(page, "und-tokens", 128)
    # Sampled at temperature 1, the tiny model's text has spaces: a streamer sends whole words.
    page.check("#und-sample input[type=checkbox]")
    set_number(page, "und-temperature", 1.0)
    set_number(page, "und-seed", 21)
    watch(page, "#und-answer textarea")
    start = time.perf_counter()
    page.click("#und-run")
    page.wait_for_function("document.querySelector('#und-code .cm-content')?.innerText.includes('max_new_tokens=128')")
    expected = model.chat(
        Image.open(images["RGBA"]),
        "What is in this picture?",
        max_new_tokens=128,
        do_sample=True,
        temperature=1.0,
        seed=21,
    )
    page.wait_for_function("(t) => document.querySelector('#und-answer textarea').value === t", arg=as_shown(expected))
    TIMINGS["image understanding, 128 tokens"] = round(time.perf_counter() - start, 2)
    texts = seen(page, "#und-answer textarea")
    assert len(expected) > 0 and len(texts) >= 2 and all(as_shown(expected).startswith(t) for t in texts)
    assert run_code(code_of(page, "und-code"), model, image=Image.open(images["RGBA"]))["answer"] == expected
    snapshot(page, artefacts / "image-understanding.png")


def test_two_requests_at_once_both_answer(browser, server):
    """Two users click at the same moment: one waits in the queue, both get their picture."""
    pages = []
    for seed in (11, 12):
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server)
        page.fill("#t2i-prompt textarea", "two requests")
        set_number(page, "t2i-seed", seed)
        pages.append(page)
    for page in pages:
        page.click("#t2i-run")
    for page in pages:
        page.wait_for_function("document.querySelectorAll('#history img').length >= 1", timeout=TIMEOUT_MS)
        assert page.locator(".toast-body").count() == 0
    first, second = (shown_images(p, "t2i-gallery")[0] for p in pages)
    assert not same(first, second)  # each got its own seed's picture
    for page in pages:
        page.context.close()


# --- the handlers, called directly -----------------------------------------------------------


def test_step_cache_control_follows_the_model(app, tiny):
    """The step-cache control is there only where generate_image takes `step_cache`, and its value
    reaches the call: the picture is the cached call's."""
    model, _ = tiny
    has_cache = "step_cache" in inspect.signature(model.generate_image).parameters
    assert app.BagelDemo(model).step_cache == has_cache

    class WithoutCache:  # a model version whose generate_image has no step cache
        def __getattr__(self, name):
            return getattr(model, name)

        def generate_image(self, prompt, **kwargs):
            return model.generate_image(prompt, **kwargs)

    assert not app.BagelDemo(WithoutCache()).step_cache
    if not has_cache:
        return
    demo = app.BagelDemo(model)
    knobs = dict(
        count=1,
        think=False,
        seed=1,
        ratio="1:1",
        cfg_text_scale=4.0,
        cfg_interval_start=0.4,
        cfg_renorm_type="global",
        cfg_renorm_min=0.0,
        num_steps=12,
        timestep_shift=3.0,
        do_sample=False,
        max_think_tokens=64,
        temperature=0.3,
        history=[],
    )
    for name in app.STEP_CACHES:
        *_, (_, [(image, _)], code, _) = demo.text_to_image("a cat", step_cache=name, **knobs)
        assert f"step_cache={name!r}" in code and same(image, run_code(code, model)["image"])
    *_, (_, [(plain, _)], plain_code, _) = demo.text_to_image("a cat", step_cache="off", **knobs)
    assert "step_cache" not in plain_code and not same(plain, image)  # the cache changed the picture


def test_handlers_refuse_bad_input_by_message(app, tiny):
    import gradio as gr

    demo = app.BagelDemo(tiny[0])
    with pytest.raises(gr.Error, match="Upload an image"):
        list(demo.understand(None, "what?", False, False, 0.3, 16, 0))
    with pytest.raises(gr.Error, match="Enter a prompt"):
        list(demo.understand(Image.new("RGB", (64, 64)), "", False, False, 0.3, 16, 0))
    with pytest.raises(gr.Error, match="aspect ratio"):
        demo.image_size("2:1")
    # a model error (ValueError naming the argument) becomes a message, not a traceback, also when it
    # is raised in the thread that streams the text
    with pytest.raises(gr.Error, match="out of range"):
        list(demo.understand(Image.new("RGB", (1, 1)), "what?", False, False, 0.3, 16, 0))
    with pytest.raises(gr.Error, match="temperature must be"):
        list(demo.understand(Image.new("RGB", (64, 64)), "what?", False, True, 0.0, 16, 0))
    assert [demo.image_size(r) for r in app.ASPECT_RATIOS] == [
        (256, 256),
        (192, 256),
        (256, 192),
        (144, 256),
        (256, 144),
    ]


def test_app_file_alone_loads_a_hub_style_checkpoint(app, tiny, tmp_path):
    """As a Space: demo/app.py copied on its own (no clone beside it) loads a checkpoint that holds
    the code through AutoModel + trust_remote_code and builds all three tabs."""
    import gradio as gr

    shutil.copy(REPO_ROOT / "demo" / "app.py", tmp_path / "app.py")
    spec = importlib.util.spec_from_file_location("space_app", tmp_path / "app.py")
    space = importlib.util.module_from_spec(spec)
    sys.modules["space_app"] = space
    try:
        spec.loader.exec_module(space)
        assert not space.IN_CLONE
        with pytest.raises(SystemExit, match="pass --model"):
            space.load_model()
        checkpoint = tmp_path / "checkpoint"
        tiny[0].save_pretrained(checkpoint)
        model, line = space.load_model(str(checkpoint))
        assert type(model).__module__.startswith("transformers_modules") and "trust_remote_code=True" in line
        blocks = space.BagelDemo(model, line).build()
        assert isinstance(blocks, gr.Blocks)
        ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
        assert {"t2i-prompt", "edit-input", "und-input", "history"} <= ids
    finally:
        del sys.modules["space_app"]


def test_int8_understanding_only_app(app):
    """`--quantization int8 --stage 1` (torchao runs on the CPU): quantized weights, no generation
    tabs, and the understanding tab answers."""
    pytest.importorskip("torchao")
    model, line = app.load_model(quantization="int8", stage=1)
    assert model.config.stage == 1 and any(type(p).__module__.startswith("torchao") for p in model.parameters())
    assert "stage=1" in line and "TorchAoConfig(Int8WeightOnlyConfig())" in line
    demo = app.BagelDemo(model, line)
    ids = {getattr(b, "elem_id", None) for b in demo.build().blocks.values()}
    assert "und-input" in ids and not {"t2i-prompt", "edit-input", "history"} & ids
    *_, (answer, code) = demo.understand(Image.new("RGB", (64, 64), "red"), "what?", False, False, 0.3, 8, 0)
    assert answer == model.chat(Image.new("RGB", (64, 64), "red"), "what?", max_new_tokens=8) and "stage=1" in code


def test_knobs_start_at_the_models_own_defaults(app, tiny):
    """Every knob starts where a call that leaves the argument out starts: the reference's values
    without a generation_config.json, the file's where it sets them (one home for the defaults)."""
    model, line = tiny

    def knobs() -> dict:
        blocks = app.BagelDemo(model, line).build().blocks.values()
        return {b.elem_id: b.value for b in blocks if getattr(b, "elem_id", None) and hasattr(b, "value")}

    v = knobs()
    assert (v["t2i-cfg-text"], v["t2i-cfg-interval"], v["t2i-renorm"]) == (4.0, 0.4, "global")
    assert (v["t2i-steps"], v["t2i-shift"], v["t2i-renorm-min"]) == (50, 3.0, 0.0)
    assert (v["edit-cfg-img"], v["edit-cfg-interval"], v["edit-renorm"]) == (2.0, 0.0, "text_channel")
    assert (v["t2i-think-tokens"], v["t2i-temperature"], v["t2i-sample"]) == (1000, 0.3, False)
    assert (v["und-tokens"], v["und-temperature"], v["und-sample"]) == (512, 0.3, False)
    config = model.generation_config
    saved = (config.image_generation, config.max_new_tokens)
    try:
        config.image_generation = dict(config.image_generation, cfg_text_scale=5.5, num_steps=30)
        config.max_new_tokens = 256
        v = knobs()
        assert (v["t2i-cfg-text"], v["t2i-steps"], v["und-tokens"]) == (5.5, 30, 256)
        assert v["edit-cfg-text"] == 4.0 and v["edit-steps"] == 50  # editing's own dict is unchanged
    finally:
        config.image_generation, config.max_new_tokens = saved
