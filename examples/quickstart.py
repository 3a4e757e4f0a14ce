"""BAGEL quickstart: answer a question about an image, generate an image, edit it.

    python examples/quickstart.py                                    # tiny random checkpoint (CPU: under 2 min)
    python examples/quickstart.py --model ByteDance-Seed/BAGEL-7B-MoT  # the released weights (a GPU)

With no --model it writes a tiny random checkpoint (the released layout plus this code) to a
temporary directory, removed at exit, and loads it with `AutoModel.from_pretrained(...,
trust_remote_code=True)`, as a Hub repository of this code is loaded. `--model` takes any BAGEL
checkpoint, such as the released repository, which holds the weights but not this code: the
classes then come from this checkout through transformers' `get_class_from_dynamic_module` (the
supported way to use this code from a clone). Images are written to --out.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoModel
from transformers.dynamic_module_utils import get_class_from_dynamic_module

REPO_ROOT = Path(__file__).resolve().parent.parent


def demo_image() -> Image.Image:
    image = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((180, 100, 460, 380), fill=(220, 40, 40))
    draw.rectangle((40, 380, 600, 440), fill=(40, 90, 200))
    return image


def bagel_class():
    """BagelForUnifiedMultimodal from this checkout, loaded as transformers loads remote code."""
    return get_class_from_dynamic_module("modeling_bagel.BagelForUnifiedMultimodal", str(REPO_ROOT))


def run(model_path: str, out: Path, steps: int | None, load: dict, tiny: bool) -> None:
    if tiny:  # a checkpoint with this code in it loads like any Hub model
        model = AutoModel.from_pretrained(model_path, trust_remote_code=True, **load)
    else:
        model = bagel_class().from_pretrained(model_path, **load)
    out.mkdir(parents=True, exist_ok=True)
    steps = {} if steps is None else dict(num_steps=steps)

    answer = model.chat(demo_image(), "What is in this picture?", max_new_tokens=16 if tiny else 256)
    print(f"chat: {answer!r}")
    # Default size: the largest the checkpoint generates (1024 x 1024 for BAGEL-7B-MoT, 256 for the tiny one).
    generated = model.generate_image("A red balloon over a blue lake", seed=0, **steps)
    generated.save(out / "generated.png")
    edited = model.edit_image(generated, "Make the balloon green", seed=0, **steps)
    edited.save(out / "edited.png")
    print(f"wrote {out / 'generated.png'} ({generated.size[0]}x{generated.size[1]}) and {out / 'edited.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hub id or directory of a BAGEL checkpoint (default: a tiny random one)")
    parser.add_argument("--out", default="outputs", help="where to write the images")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    load = dict(dtype=torch.bfloat16 if cuda else torch.float32, device_map="cuda" if cuda else "cpu")
    if args.model is not None:
        run(args.model, Path(args.out), args.steps, load, tiny=False)
        return
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from make_tiny_checkpoint import make_tiny_checkpoint

    with tempfile.TemporaryDirectory(prefix="bagel-tiny-") as tmp:
        print("tiny random checkpoint (a temporary directory)")
        run(str(make_tiny_checkpoint(Path(tmp) / "bagel-tiny")), Path(args.out), args.steps, load, tiny=True)


if __name__ == "__main__":
    main()
