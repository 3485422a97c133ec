"""The README's figures for controlled generation and editing, made by the commands themselves.

    python infra/tools/readme_figures.py [--work /tmp/blipdiff-figures] [--size 160]

Builds a small random BLIP-Diffusion with a ControlNet (the layout of Salesforce/blipdiffusion-controlnet)
and a second random ControlNet, runs `blipdiff generate --control`, `blipdiff edit`, `blipdiff interpolate`
and the style-transfer form of `generate` on DreamBench photos from ../shared, and lays each command's
inputs and outputs side by side into docs/img/{controlnet,edit,interpolate,style-transfer}.png. Every
weight is random, so the generated pictures are noise, and each figure says so; the README gives the
same commands for the released weights.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from blipdiff.infra.tools.screenshots import IMAGES
from blipdiff.models.blip_diffusion.controlnet import canny_edges
from blipdiff.infra.demo.random_models import save_tiny_blip_diffusion, save_tiny_controlnet

BLIPDIFF = Path(sys.executable).parent / "blipdiff"
DREAMBENCH = Path(__file__).resolve().parents[3] / "shared" / "data" / "dreambench" / "dataset"
LABEL = 22
WARNING = "random weights: the generated pictures are noise (the commands are the real ones)"


def blipdiff(*args: str | Path) -> None:
    print("$ blipdiff " + " ".join(str(arg) for arg in args), flush=True)
    subprocess.run([str(BLIPDIFF), *map(str, args)], check=True)


def figure(panels: list[tuple[str, Image.Image]], title: str, target: Path, size: int, columns: int | None = None) -> None:
    """Panels in a row (or rows of ``columns``), each with its caption; the title and the warning above."""
    font = ImageFont.load_default(size=14)
    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    gap = 8
    width = columns * (size + gap) + gap
    height = 2 * LABEL + rows * (size + LABEL + gap) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 4), title, fill="black", font=font)
    draw.text((gap, 4 + LABEL), WARNING, fill=(180, 0, 0), font=font)
    for index, (caption, image) in enumerate(panels):
        left = gap + (index % columns) * (size + gap)
        top = 2 * LABEL + gap + (index // columns) * (size + LABEL + gap)
        canvas.paste(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), (left, top))
        draw.text((left, top + size + 3), caption, fill="black", font=font)
    target.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(target)
    print(f"wrote {target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/blipdiff-figures"))
    parser.add_argument("--size", type=int, default=160, help="picture side in pixels (a multiple of 8)")
    args = parser.parse_args()
    work, size = args.work, str(args.size)
    if not DREAMBENCH.is_dir():
        sys.exit(f"DreamBench photos not found at {DREAMBENCH} (see ../shared/README.md)")
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "model_index.json").is_file():
        save_tiny_blip_diffusion(model, controlnet=True)
    second = work / "controlnet-2"
    if not (second / "config.json").is_file():
        save_tiny_controlnet(second, seed=11)
    dog, cat, teapot = DREAMBENCH / "dog" / "00.jpg", DREAMBENCH / "cat" / "00.jpg", DREAMBENCH / "teapot" / "00.jpg"
    common = ["--height", size, "--width", size, "--steps", "20"]

    blipdiff("generate", "--model", model, "--image", dog, "--subject", "dog", "--prompt", "on the beach",
             "--control", cat, "--control-type", "canny", "--out", work / "controlnet", *common)
    blipdiff("generate", "--model", model, "--image", dog, "--subject", "dog", "--prompt", "on the beach",
             "--control", cat, "--control-type", "canny", "--controlnet", model, "--control", teapot,
             "--control-type", "image", "--controlnet", second, "--control-scale", "1.0", "--control-scale", "0.5",
             "--out", work / "two-controlnets", *common)
    figure([("subject: dog", Image.open(dog)), ("control: cat photo", Image.open(cat)),
            ("Canny edges (30/70)", Image.open(work / "controlnet" / "control-0.png")),
            ("dog + the edges", Image.open(work / "controlnet" / "p000_i00.png")),
            ("+ 2nd net x0.5", Image.open(work / "two-controlnets" / "p000_i00.png"))],
           "blipdiff generate --control (ControlNet)", IMAGES / "controlnet.png", args.size)

    blipdiff("edit", "--model", model, "--source-prompt", "a cat sitting on a sofa", "--edit-token", "cat",
             "--image", dog, "--subject", "dog", "--prompt", "sitting on a sofa", "--mask-threshold", "0.9",
             "--out", work / "edit", *common)
    blipdiff("edit", "--model", model, "--source-image", cat, "--edit-token", "cat", "--image", dog, "--subject",
             "dog", "--prompt", "on a sofa", "--mask-threshold", "0.9", "--out", work / "edit-photo", *common)
    figure([("subject: dog", Image.open(dog)), ("source (generated)", Image.open(work / "edit" / "source.png")),
            ("mask of 'cat'", Image.open(work / "edit" / "mask.png")),
            ("edited", Image.open(work / "edit" / "edited.png")),
            ("source (a photo)", Image.open(work / "edit-photo" / "source.png")),
            ("mask of 'cat'", Image.open(work / "edit-photo" / "mask.png")),
            ("edited", Image.open(work / "edit-photo" / "edited.png"))],
           "blipdiff edit (attention control; below: a real photo, DDIM-inverted)",
           IMAGES / "edit.png", args.size, columns=4)

    blipdiff("interpolate", "--model", model, "--image", dog, "--subject", "dog", "--image", cat, "--subject", "cat",
             "--prompt", "on the beach", "--steps", "5", "--out", work / "interpolate", "--height", size, "--width",
             size, "--denoising-steps", "20")
    cells = sorted((work / "interpolate").glob("cell-*.png"))
    figure([("dog", Image.open(dog)), *((f"{1 - i / (len(cells) - 1):.2f} dog", Image.open(cell))
                                        for i, cell in enumerate(cells)),
            ("cat", Image.open(cat))], "blipdiff interpolate (one seed, weights 1 to 0)", IMAGES / "interpolate.png",
           args.size)

    blipdiff("generate", "--model", model, "--image", cat, "--subject", "cat", "--target-subject", "teapot",
             "--prompt", "on a marble table", "--control", teapot, "--control-type", "canny",
             "--out", work / "style", *common)
    figure([("style: the cat", Image.open(cat)), ("structure: a teapot", Image.open(teapot)),
            ("its Canny edges", canny_edges(teapot)), ("cat-styled teapot", Image.open(work / "style" / "p000_i00.png"))],
           "style transfer: blipdiff generate --control ... --target-subject", IMAGES / "style-transfer.png", args.size)


if __name__ == "__main__":
    main()
