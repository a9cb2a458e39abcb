"""Training data for one concept: images from a folder and/or an IMAGE batch, captions, prompts.

Images arrive as ComfyUI IMAGE tensors [N, H, W, 3] in [0, 1] or as files. Files are normalised to RGB (EXIF
orientation applied; alpha composited on white; grayscale, palette and CMYK converted; 16-bit and float greyscale
scaled by their mode's white level, `FULL_SCALE`). Every image is
resized so its short side matches the training resolution and centre-cropped (or randomly cropped) to a square;
its original size and the crop are recorded (`ImageSize`) for families that condition on them (SDXL).
"""

from __future__ import annotations

import codecs
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CIDMInputError, require_finite
from .names import MARKER_PATTERN, name_key

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# Files an operating system writes into a folder of pictures (compared ignoring case): Windows Explorer's thumbnail
# caches and folder settings, macOS's custom folder icon. Its other files start with '.' (.DS_Store, AppleDouble
# `._*`, KDE's .directory) and are skipped as hidden files.
OS_METADATA_FILES = frozenset({"thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r"})
MIN_SIDE = 64
MAX_PIXELS = 64 * 1024 * 1024  # larger files are almost surely a mistake (and would exhaust memory)
# Pixels per latent cell, as ComfyUI's sampler derives an image size from a latent (comfy/samplers.py:695-698,
# v0.3.75).
LATENT_DOWNSCALE = 8

OBJECT_TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
                    "a photo of a clean {}", "a close-up photo of a {}", "a bright photo of the {}",
                    "a good photo of a {}")
STYLE_TEMPLATES = ("a painting in the style of {}", "a rendering in the style of {}", "an artwork in the style of {}",
                   "a picture in the style of {}", "a cropped painting in the style of {}")
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}
# Words that occur in captions as grammar: a concept with one of these names binds only through its <marker>.
FUNCTION_WORDS = frozenset("""
a an the this that these those my your his her its our their some any each every no another other such
i me you he him she it we us they them myself itself themselves who whom whose which what
of in on at to from by with without into onto over under above below near behind beside between among
around through across along against toward towards up down out off about before after during for as
and or but nor so yet if then than because while when where whether
is are was were be been being am has have had do does did will would can could shall should may might must
not very just also there here
""".split())


@dataclass
class ConceptExample:
    image: torch.Tensor  # [H, W, 3] float in [0, 1]
    caption: str | None
    source: str


@dataclass(frozen=True)
class ImageSize:
    """Where a training image came from: its size before resizing and the offset of its training crop, in pixels,
    as SDXL's size conditioning reads them (the crop offset is in the resized image, before cropping)."""

    original: tuple[int, int]  # (height, width)
    crop: tuple[int, int]  # (top, left)


@dataclass
class TrainingSet:
    images: torch.Tensor  # [N, R, R, 3]
    captions: list[str | None]
    sources: list[str]
    # Per image; None when the images were given at their training size (each then counts as uncropped).
    sizes: list[ImageSize] | None = None

    def digest(self) -> str:
        """sha256 of the pixels and captions (not the file names): the same data gives the same digest."""
        digest = hashlib.sha256(self.images.detach().cpu().float().contiguous().numpy().tobytes())
        digest.update(json.dumps(self.captions).encode("utf-8"))
        return digest.hexdigest()


# The white level of PIL's high-bit-depth greyscale modes, from the mode alone (never from the pixels, so a dark
# 16-bit image stays dark). 16-bit PNG and TIFF greyscale opens as I;16 (little- or big-endian, or native) or, in
# older Pillow and after some conversions, as 32-bit I: 65535 is white. 32-bit float TIFF opens as F, read as
# linear values where 1.0 is white (outside [0, 1] clipped, NaN black).
FULL_SCALE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode as upright 8-bit RGB: high-bit-depth greyscale scaled by its mode's white level (FULL_SCALE),
    transparency (an alpha band, premultiplied or not, or a palette's) composited on white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in FULL_SCALE:
        array = np.nan_to_num(np.asarray(image, dtype=np.float64) / FULL_SCALE[image.mode], nan=0.0)
        image = Image.fromarray(np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8), mode="L")
    if image.mode == "P" or {"A", "a"} & set(image.getbands()):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("RGB")


def check_image_size(width: int, height: int, source: str, input_name: str) -> None:
    """Refuses images too small to train on or too large to hold in memory (`source` names the image).

    Raises:
        CIDMInputError: `input_name`, when the short side is under MIN_SIDE pixels or the image has more than
            MAX_PIXELS pixels.
    """
    if min(width, height) < MIN_SIDE:
        raise CIDMInputError(input_name, f"{source} is {width}×{height}; images need at least {MIN_SIDE} pixels on "
                                         "the short side")
    if width * height > MAX_PIXELS:
        raise CIDMInputError(input_name, f"{source} is {width}×{height}, more than {MAX_PIXELS} pixels; "
                                         "downscale it first")


def _read_image(path: Path, input_name: str, name: str) -> torch.Tensor:
    try:
        with Image.open(path) as opened:
            check_image_size(*opened.size, name, input_name)
            rgb = to_rgb(opened)
    except Image.DecompressionBombError as error:  # Pillow refuses to open it at all, before our own size check
        raise CIDMInputError(input_name, f"{name} is too large to load ({error}); downscale it first") from error
    except (UnidentifiedImageError, OSError) as error:
        raise CIDMInputError(input_name, f"{name} is not a readable image ({error})") from error
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)


def read_caption(path: Path, input_name: str) -> str | None:
    """A caption file's text as the tools people use write it; None when it holds only whitespace.

    A byte-order mark picks the encoding (UTF-8, UTF-16 LE/BE as Windows Notepad writes them) and is dropped.
    Without one the text is UTF-8, or Windows-1252 when it is not valid UTF-8 (older Windows editors write
    e.g. a curly apostrophe as the single byte 0x92). Runs of whitespace, line breaks included, become one space.

    Raises:
        CIDMInputError: `input_name`, naming the file, when it cannot be read or decoded.
    """
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CIDMInputError(input_name, f"caption {path.name} cannot be read ({error})") from error
    for bom, encoding in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                          (codecs.BOM_UTF16_BE, "utf-16-be")):
        if raw.startswith(bom):
            candidates, raw = (encoding,), raw[len(bom):]
            break
    else:
        candidates = ("utf-8", "cp1252")
    for encoding in candidates:
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise CIDMInputError(input_name, f"caption {path.name} is neither UTF-8 nor Windows-1252 text; save it "
                                         "as UTF-8")
    if "\0" in text:
        raise CIDMInputError(input_name, f"caption {path.name} is not a text file (it holds NUL characters)")
    return " ".join(text.split()) or None


def contained_file(path: Path, root: Path, input_name: str) -> Path:
    """`path` with every symlink resolved; refuses a file that resolves outside `root` (itself resolved).

    Raises:
        CIDMInputError: `input_name`, naming the file and where it leads, when it lands outside `root`.
    """
    resolved = path.resolve()
    if root not in resolved.parents:
        raise CIDMInputError(input_name, f"{path.name} links to {resolved}, outside {root}; copy the file into "
                                         "the folder instead")
    return resolved


def load_concept_folder(folder: Path, input_name: str, root: Path | None = None) -> list[ConceptExample]:
    """Images in `folder` (sorted by name), each with the caption of a same-stem .txt file if there is one.

    Every image and caption must resolve (symlinks followed) inside `root`, by default `folder` itself; the
    nodes pass ComfyUI's input directory. Hidden files, subfolders and OS_METADATA_FILES are skipped.

    Raises:
        CIDMInputError: `input_name` when the folder does not exist or holds no images, a file is not an image
            of a supported type and size, a file links outside `root`, or a caption cannot be read.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CIDMInputError(input_name, f"folder {folder} does not exist")
    root = Path(root or folder).resolve()
    examples = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name.lower() in OS_METADATA_FILES or path.is_dir() \
                or path.suffix.lower() == ".txt":
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise CIDMInputError(input_name, f"{path.name} is not an image (supported: "
                                             f"{', '.join(IMAGE_SUFFIXES)}); remove it from {folder.name}")
        image = _read_image(contained_file(path, root, input_name), input_name, path.name)
        caption_file = path.with_suffix(".txt")
        caption = (read_caption(contained_file(caption_file, root, input_name), input_name)
                   if caption_file.exists() or caption_file.is_symlink() else None)
        examples.append(ConceptExample(image, caption, path.name))
    if not examples:
        raise CIDMInputError(input_name, f"folder {folder} holds no images")
    return examples


def examples_from_image_batch(images: torch.Tensor, input_name: str) -> list[ConceptExample]:
    """A ComfyUI IMAGE batch [N, H, W, C ≥ 3] in [0, 1] as examples without captions (extra channels dropped).

    Raises:
        CIDMInputError: `input_name`, when the batch is not [N, H, W, ≥3], its size is refused by
            `check_image_size`, or it holds NaN or ±inf.
    """
    if images.ndim != 4 or images.shape[-1] < 3:
        raise CIDMInputError(input_name, f"expected an IMAGE batch [N, H, W, 3], got shape {tuple(images.shape)}")
    check_image_size(images.shape[2], images.shape[1], "the IMAGE batch", input_name)
    require_finite(**{input_name: images})
    return [ConceptExample(image[..., :3].float().clamp(0, 1), None, f"{input_name}[{i}]")
            for i, image in enumerate(images)]


def resize_and_crop(image: torch.Tensor, resolution: int,
                    rng: random.Random | None = None) -> tuple[torch.Tensor, ImageSize]:
    """[H, W, 3] -> ([R, R, 3], its ImageSize): short side scaled to R (antialiased), then a centre (or random)
    square crop."""
    height, width = image.shape[:2]
    scale = resolution / min(height, width)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    resized = F.interpolate(image.permute(2, 0, 1)[None], size=size, mode="bilinear", antialias=True,
                            align_corners=False)[0].permute(1, 2, 0)
    top = (size[0] - resolution) // 2 if rng is None else rng.randint(0, size[0] - resolution)
    left = (size[1] - resolution) // 2 if rng is None else rng.randint(0, size[1] - resolution)
    return resized[top:top + resolution, left:left + resolution].clamp(0, 1), ImageSize((height, width), (top, left))


def size_conditioning(size: ImageSize | None, latent_shape: tuple[int, ...]) -> dict[str, int]:
    """SDXL's size conditioning of one training sample, keyed as ComfyUI's `CLIPTextEncodeSDXL` and
    `SDXL.encode_adm` name it (comfy_extras/nodes_clip_sdxl.py:28-58, comfy/model_base.py:469-492, v0.3.75), in
    pixels: the original size and crop offset from `size`, the target size from the latent's spatial axes
    ([..., h, w] -> h·8, w·8). Without a `size` the sample counts as an uncropped image of the target size, as
    ComfyUI's sampler assumes (comfy/samplers.py:689-700)."""
    height, width = latent_shape[-2] * LATENT_DOWNSCALE, latent_shape[-1] * LATENT_DOWNSCALE
    size = size or ImageSize((height, width), (0, 0))
    return {"height": size.original[0], "width": size.original[1], "crop_h": size.crop[0], "crop_w": size.crop[1],
            "target_height": height, "target_width": width}


def bind_concept_tokens(caption: str, concept_word: str, tokens: list[str]) -> str:
    """The caption with the concept's own mentions replaced by its tokens (joined by spaces).

    The concept's own mention is:
    - the marker `<concept_word>`, compared as prompt markers are (`cidm.names.name_key`: any case). A caption
      that holds a marker binds only its markers; the bare word elsewhere in it stays an ordinary word
      ("<the> on the table" binds the first one only);
    - without a marker, the bare concept word as a whole word (case-insensitive), as CIFC-style captions name the
      subject ("dog sticking its tongue out"), unless the word is an English function word (`FUNCTION_WORDS`:
      articles, pronouns, prepositions, conjunctions, auxiliaries). Those occur in captions as grammar, not as
      the concept, so a concept named `the` or `with` binds only through its marker.
    A caption with no own mention comes back unchanged (`make_prompt` then uses a template).
    """
    key, joined = name_key(f"<{concept_word}>"), " ".join(tokens)
    if any(name_key(marker) == key for marker in MARKER_PATTERN.findall(caption)):
        return MARKER_PATTERN.sub(lambda marker: joined if name_key(marker.group(0)) == key else marker.group(0),
                                  caption)
    if concept_word.lower() in FUNCTION_WORDS:
        return caption
    return re.sub(rf"(?<![\w<]){re.escape(concept_word)}(?![\w>])", joined, caption, flags=re.IGNORECASE)


def make_prompt(caption: str | None, concept_word: str, tokens: list[str], template_kind: str,
                rng: random.Random) -> str:
    """The training prompt of one example: the caption with the concept bound to its tokens
    (`bind_concept_tokens`), or a random `template_kind` template around the tokens when there is no caption or
    it has no mention of the concept.

    Raises:
        CIDMInputError: ("template") when a template is needed and `template_kind` is not in TEMPLATES.
    """
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
    """The examples as one [N, R, R, 3] batch at `resolution` R (`resize_and_crop`; random crops seeded by `seed`),
    with each image's original size and crop.

    Raises:
        CIDMInputError: ("resolution") when R is under MIN_SIDE or not a multiple of 8.
    """
    if resolution < MIN_SIDE or resolution % 8:
        raise CIDMInputError("resolution", f"must be a multiple of 8 and at least {MIN_SIDE}, got {resolution}")
    rng = random.Random(seed) if random_crop else None
    images, sizes = zip(*(resize_and_crop(example.image, resolution, rng) for example in examples))
    return TrainingSet(torch.stack(images), [e.caption for e in examples], [e.source for e in examples], list(sizes))
