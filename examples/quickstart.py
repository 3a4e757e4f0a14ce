"""BAGEL quickstart: answer a question about an image, generate an image, edit it.

    python examples/quickstart.py                      # tiny random checkpoint, CPU, seconds
    python examples/quickstart.py --model ByteDance-Seed/BAGEL-7B-MoT   # the real model (a GPU)

With no --model it first writes a tiny random checkpoint (same layout as the released one) and
loads it through `AutoModel.from_pretrained(..., trust_remote_code=True)`, exactly as the real one
is loaded. Images are written to --out.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoModel

REPO_ROOT = Path(__file__).resolve().parent.parent


def demo_image() -> Image.Image:
    image = Image.new("RGB", (640, 480), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((180, 100, 460, 380), fill=(220, 40, 40))
    draw.rectangle((40, 380, 600, 440), fill=(40, 90, 200))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hub id or directory of a BAGEL checkpoint (default: a tiny random one)")
    parser.add_argument("--out", default="outputs", help="where to write the images")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50, 4 for the tiny model)")
    args = parser.parse_args()

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    tiny = args.model is None
    if tiny:
        from make_tiny_checkpoint import make_tiny_checkpoint

        args.model = str(make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "bagel-tiny"))
        print(f"tiny random checkpoint: {args.model}")
    cuda = torch.cuda.is_available()
    load = dict(dtype=torch.bfloat16 if cuda else torch.float32, device_map="cuda" if cuda else "cpu")
    if tiny:  # a checkpoint with our code in it loads like any Hub model
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True, **load)
    else:  # the released repository has weights but not this code: use the code of this checkout
        from repo_package import import_repo

        import_repo()
        from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal

        model = BagelForUnifiedMultimodal.from_pretrained(args.model, **load)
    steps = args.steps or (4 if tiny else 50)
    # The tiny model works at small sizes; the real one at the reference's.
    size = dict(height=256, width=256) if tiny else dict(height=1024, width=1024)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    image = demo_image()
    answer = model.chat(image, "What is in this picture?", max_new_tokens=16 if tiny else 256)
    print(f"chat: {answer!r}")

    generated = model.generate_image("A red balloon over a blue lake", num_steps=steps, seed=0,
                                     **size)
    generated.save(out / "generated.png")
    edited = model.edit_image(generated, "Make the balloon green", num_steps=steps, seed=0)
    edited.save(out / "edited.png")
    print(f"wrote {out / 'generated.png'} ({generated.size[0]}x{generated.size[1]}) and {out / 'edited.png'}")


if __name__ == "__main__":
    main()
