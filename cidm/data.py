"""Training data for one concept: images from a folder and/or an IMAGE batch, captions, prompts.

Images arrive as ComfyUI IMAGE tensors [N, H, W, 3] in [0, 1] or as files. Files are normalised to RGB (EXIF
orientation applied; alpha composited on white; grayscale, palette, CMYK and 16-bit converted). Every image is
resized so its short side matches the training resolution and centre-cropped (or randomly cropped) to a square.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CIDMInputError, require_finite

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
MIN_SIDE = 64
MAX_PIXELS = 64 * 1024 * 1024  # larger files are almost surely a mistake (and would exhaust memory)

OBJECT_TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
                    "a photo of a clean {}", "a close-up photo of a {}", "a bright photo of the {}",
                    "a good photo of a {}")
STYLE_TEMPLATES = ("a painting in the style of {}", "a rendering in the style of {}", "an artwork in the style of {}",
                   "a picture in the style of {}", "a cropped painting in the style of {}")
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


@dataclass
class ConceptExample:
    image: torch.Tensor  # [H, W, 3] float in [0, 1]
    caption: str | None
    source: str


@dataclass
class TrainingSet:
    images: torch.Tensor  # [N, R, R, 3]
    captions: list[str | None]
    sources: list[str]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as upright 8-bit RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def check_image_size(width: int, height: int, source: str, input_name: str) -> None:
    if min(width, height) < MIN_SIDE:
        raise CIDMInputError(input_name, f"{source} is {width}×{height}; images need at least {MIN_SIDE} pixels on "
                                         "the short side")
    if width * height > MAX_PIXELS:
        raise CIDMInputError(input_name, f"{source} is {width}×{height}, more than {MAX_PIXELS} pixels; "
                                         "downscale it first")


def _read_image(path: Path, input_name: str) -> torch.Tensor:
    try:
        with Image.open(path) as opened:
            check_image_size(*opened.size, path.name, input_name)
            rgb = to_rgb(opened)
    except Image.DecompressionBombError as error:  # Pillow refuses to open it at all, before our own size check
        raise CIDMInputError(input_name, f"{path.name} is too large to load ({error}); downscale it first") from error
    except (UnidentifiedImageError, OSError) as error:
        raise CIDMInputError(input_name, f"{path.name} is not a readable image ({error})") from error
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)


def load_concept_folder(folder: Path, input_name: str) -> list[ConceptExample]:
    """Images in `folder` (sorted), each with the caption in a same-stem .txt file if there is one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CIDMInputError(input_name, f"folder {folder} does not exist")
    examples = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir() or path.suffix.lower() == ".txt":
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise CIDMInputError(input_name, f"{path.name} is not an image (supported: "
                                             f"{', '.join(IMAGE_SUFFIXES)}); remove it from {folder.name}")
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.exists() else None
        examples.append(ConceptExample(_read_image(path, input_name), caption or None, path.name))
    if not examples:
        raise CIDMInputError(input_name, f"folder {folder} holds no images")
    return examples


def examples_from_image_batch(images: torch.Tensor, input_name: str) -> list[ConceptExample]:
    if images.ndim != 4 or images.shape[-1] < 3:
        raise CIDMInputError(input_name, f"expected an IMAGE batch [N, H, W, 3], got shape {tuple(images.shape)}")
    check_image_size(images.shape[2], images.shape[1], "the IMAGE batch", input_name)
    require_finite(**{input_name: images})
    return [ConceptExample(image[..., :3].float().clamp(0, 1), None, f"{input_name}[{i}]")
            for i, image in enumerate(images)]


def resize_and_crop(image: torch.Tensor, resolution: int, rng: random.Random | None = None) -> torch.Tensor:
    """[H, W, 3] -> [R, R, 3]: short side scaled to R (antialiased), then a centre (or random) square crop."""
    height, width = image.shape[:2]
    scale = resolution / min(height, width)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    resized = F.interpolate(image.permute(2, 0, 1)[None], size=size, mode="bilinear", antialias=True,
                            align_corners=False)[0].permute(1, 2, 0)
    top = (size[0] - resolution) // 2 if rng is None else rng.randint(0, size[0] - resolution)
    left = (size[1] - resolution) // 2 if rng is None else rng.randint(0, size[1] - resolution)
    return resized[top:top + resolution, left:left + resolution].clamp(0, 1)


def bind_concept_tokens(caption: str, concept_word: str, tokens: list[str]) -> str:
    """Replaces the concept word (or <word>) in a caption with the concept's tokens; whole words only."""
    pattern = re.compile(rf"<{re.escape(concept_word)}>|\b{re.escape(concept_word)}\b", re.IGNORECASE)
    return pattern.sub(" ".join(tokens), caption)


def make_prompt(caption: str | None, concept_word: str, tokens: list[str], template_kind: str,
                rng: random.Random) -> str:
    """The caption with the concept bound to its tokens; a template when there is no caption or no mention."""
    joined = " ".join(tokens)
    if caption:
        bound = bind_concept_tokens(caption, concept_word, tokens)
        if joined in bound:
            return bound
    if template_kind not in TEMPLATES:
        raise CIDMInputError("template", f"unknown template {template_kind!r}; supported: {', '.join(TEMPLATES)}")
    return rng.choice(TEMPLATES[template_kind]).format(joined)


def build_training_set(examples: list[ConceptExample], resolution: int, seed: int,
                       random_crop: bool = False) -> TrainingSet:
    if resolution < MIN_SIDE or resolution % 8:
        raise CIDMInputError("resolution", f"must be a multiple of 8 and at least {MIN_SIDE}, got {resolution}")
    rng = random.Random(seed) if random_crop else None
    images = torch.stack([resize_and_crop(example.image, resolution, rng) for example in examples])
    return TrainingSet(images, [e.caption for e in examples], [e.source for e in examples])
