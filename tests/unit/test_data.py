"""Concept folders, image normalisation, captions and prompts."""

import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cidm.data import (ImageSize, bind_concept_tokens, build_training_set, examples_from_image_batch,
                       load_concept_folder, make_prompt, resize_and_crop, size_conditioning, to_rgb)
from cidm.errors import CIDMInputError

CIFC = Path(os.environ.get("CIDM_CIFC", Path(__file__).resolve().parents[3] / "shared" / "datasets" / "cifc"))


def _png_header_only(path, width, height):
    """A PNG that declares its size and holds no pixels: Pillow reads the size without decoding anything."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))


def _save(path, mode="RGB", size=(80, 64), color=(200, 10, 10)):
    Image.new(mode, size, color).save(path)


def test_folder_with_captions(tmp_path):
    _save(tmp_path / "b.png")
    _save(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("a dog on the grass\n")
    examples = load_concept_folder(tmp_path, "folder")
    assert [e.source for e in examples] == ["a.jpg", "b.png"]
    assert examples[0].caption == "a dog on the grass" and examples[1].caption is None
    assert examples[0].image.shape == (64, 80, 3)


def test_files_the_os_writes_into_a_folder_are_skipped(tmp_path):
    """Windows Explorer, macOS Finder and KDE leave these in any folder of pictures (issue 29, kind 5)."""
    _save(tmp_path / "dog.png")
    for name in ("Thumbs.db", "desktop.ini", "Desktop.ini", "ehthumbs.db", "Icon\r", ".DS_Store", "._dog.png",
                 ".directory"):
        (tmp_path / name).write_bytes(b"\0\1metadata")
    assert [e.source for e in load_concept_folder(tmp_path, "folder")] == ["dog.png"]


def test_captions_bind_the_marker_as_prompts_name_it():
    """A caption's marker compares as a prompt's does: any case, spaces between the words (issue 29, kind 5)."""
    assert bind_concept_tokens("<My  Dog> on the grass", "my dog", ["<t1>"]) == "<t1> on the grass"
    assert bind_concept_tokens("a <CAFÉ> sign", "café", ["<t1>"]) == "a <t1> sign"


@pytest.mark.skipif(not CIFC.exists(), reason="CIFC dataset not present")
def test_cifc_concept_folder_loads():
    folder = next(p for p in sorted(CIFC.rglob("*")) if p.is_dir() and any(
        f.suffix.lower() in (".jpg", ".png", ".jpeg") for f in p.iterdir()))
    examples = load_concept_folder(folder, "folder")
    assert examples and all(e.image.ndim == 3 and e.image.shape[-1] == 3 for e in examples)
    training = build_training_set(examples, 64, seed=0)
    assert training.images.shape == (len(examples), 64, 64, 3)


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "no images"),
    (lambda d: (d / "notes.pdf").write_bytes(b"%PDF"), "notes.pdf is not an image"),
    (lambda d: (d / "broken.png").write_bytes(b"not a png"), "broken.png is not a readable image"),
    (lambda d: _save(d / "tiny.png", size=(32, 32)), "tiny.png is 32×32"),
    (lambda d: _png_header_only(d / "huge.png", 9000, 8000), "huge.png is 9000×8000, more than"),
    (lambda d: _png_header_only(d / "bomb.png", 20000, 20000), "bomb.png is too large to load"),
])
def test_bad_folders_name_the_input_and_file(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(CIDMInputError, match=message) as error:
        load_concept_folder(tmp_path, "folder")
    assert error.value.input_name == "folder"


def test_missing_folder(tmp_path):
    with pytest.raises(CIDMInputError, match="does not exist"):
        load_concept_folder(tmp_path / "nope", "folder")


def test_modes_become_rgb():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent -> white
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]
    gray16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_rgb(gray16))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("P", (4, 4), 0)
    assert to_rgb(palette).mode == "RGB"
    assert to_rgb(Image.new("LA", (4, 4), (10, 255))).getpixel((0, 0)) == (10, 10, 10)


@pytest.mark.parametrize("name, make, expected", [
    # 16-bit greyscale whose values all sit at or under 255 is a dark image, not a bright one (was 257× too bright).
    ("dark16.png", lambda: Image.fromarray(np.full((64, 64), 200, np.uint16)), 200 / 65535),
    ("mid16.png", lambda: Image.fromarray(np.full((64, 64), 32896, np.uint16)), 32896 / 65535),
    ("big_endian16.tif", lambda: Image.fromarray(np.full((64, 64), 65535, ">u2")), 1.0),
    ("int32.tif", lambda: Image.fromarray(np.full((64, 64), 13107, np.int32)), 0.2),
    # 32-bit float TIFF in [0, 1] (was black); values outside are clipped.
    ("float.tif", lambda: Image.fromarray(np.full((64, 64), 0.6, np.float32)), 0.6),
    ("float_over.tif", lambda: Image.fromarray(np.full((64, 64), 3.0, np.float32)), 1.0),
])
def test_high_bit_depth_files_read_by_their_mode_range(tmp_path, name, make, expected):
    image = make()
    assert image.mode in ("I;16", "I;16B", "I", "F")
    image.save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == image.mode
    (example,) = load_concept_folder(tmp_path, "folder")
    assert example.image.shape == (64, 64, 3)
    assert float(example.image.mean()) == pytest.approx(expected, abs=0.5 / 255)


def test_transparency_of_every_alpha_mode_is_composited_on_white():
    for mode, colour in (("PA", (0, 0)), ("RGBa", (0, 0, 0, 0)), ("LA", (0, 0)), ("RGBA", (0, 0, 0, 0))):
        assert to_rgb(Image.new(mode, (4, 4), colour)).getpixel((0, 0)) == (255, 255, 255), mode


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (80, 64))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90°
    image.save(tmp_path / "rotated.jpg", exif=exif)
    (example,) = load_concept_folder(tmp_path, "folder")
    assert example.image.shape[:2] == (80, 64)


def test_resize_and_crop_is_aspect_aware():
    image = torch.zeros(100, 200, 3)
    image[:, 90:110] = 1.0  # a bar in the centre survives the centre crop
    out, size = resize_and_crop(image, 64)
    assert out.shape == (64, 64, 3)
    assert out[:, 32].mean() > 0.9 and out[:, 0].mean() < 0.1
    assert size == ImageSize(original=(100, 200), crop=(0, 32))  # resized to 64×128, the centre crop starts at 32
    out, size = resize_and_crop(image, 64, random.Random(0))
    assert out.shape == (64, 64, 3) and size.original == (100, 200) and size.crop[0] == 0 <= size.crop[1] <= 64


def test_training_set_records_each_original_size_and_crop():
    examples = examples_from_image_batch(torch.rand(1, 300, 100, 3), "images") \
        + examples_from_image_batch(torch.rand(1, 64, 64, 3), "images")
    training_set = build_training_set(examples, 64, seed=0)
    assert training_set.images.shape == (2, 64, 64, 3)
    assert training_set.sizes == [ImageSize((300, 100), (64, 0)), ImageSize((64, 64), (0, 0))]


def test_size_conditioning_reads_the_spatial_axes_of_the_latent():
    """SDXL's six size values, as CLIPTextEncodeSDXL names them; the target from the latent's H and W (never its
    channel axis, Concept-Conductor's bug), the original and crop from the image."""
    latent_shape = (2, 4, 9, 13)  # 72×104 px
    assert size_conditioning(ImageSize((300, 100), (64, 0)), latent_shape) == dict(
        height=300, width=100, crop_h=64, crop_w=0, target_height=72, target_width=104)
    assert size_conditioning(None, latent_shape) == dict(
        height=72, width=104, crop_h=0, crop_w=0, target_height=72, target_width=104)


def test_image_batch_and_resolution_errors():
    examples = examples_from_image_batch(torch.rand(2, 72, 72, 3), "images")
    assert [e.source for e in examples] == ["images[0]", "images[1]"]
    with pytest.raises(CIDMInputError, match="at least 64"):
        examples_from_image_batch(torch.rand(1, 16, 16, 3), "images")
    with pytest.raises(CIDMInputError) as error:
        build_training_set(examples, 60, seed=0)
    assert error.value.input_name == "resolution"


def test_prompts_bind_tokens():
    rng = random.Random(0)
    tokens = ["<dog1>", "<dog2>"]
    assert make_prompt("a Dog on a hotdog stand", "dog", tokens, "object", rng) == "a <dog1> <dog2> on a hotdog stand"
    templated = make_prompt(None, "dog", tokens, "object", rng)
    assert "<dog1> <dog2>" in templated and templated.startswith("a") or templated.startswith("the")
    styled = make_prompt("a picture of a house", "dog", tokens, "style", rng)
    assert "in the style of <dog1> <dog2>" in styled
    with pytest.raises(CIDMInputError, match="template"):
        make_prompt(None, "dog", tokens, "poem", rng)


def test_concept_binds_only_its_own_mention():
    tokens = ["<t1>", "<t2>"]
    rng = random.Random(0)
    # A concept named like a function word never rewrites the caption's grammar; without a marker: a template.
    assert bind_concept_tokens("the dog on the grass", "the", tokens) == "the dog on the grass"
    prompt = make_prompt("the dog on the grass", "the", tokens, "object", rng)
    assert prompt.endswith("<t1> <t2>") and prompt.count("<t1>") == 1 and "grass" not in prompt
    # The marker is the concept's own mention; the bare word elsewhere stays an ordinary word.
    assert bind_concept_tokens("<The> on the table", "the", tokens) == "<t1> <t2> on the table"
    assert bind_concept_tokens("a <dog> looking at a dog toy", "dog", tokens) == "a <t1> <t2> looking at a dog toy"
    # A content word binds as a whole word in any case, every time the caption names it.
    assert bind_concept_tokens("Dog and another dog, not a hotdog", "dog", tokens) == \
        "<t1> <t2> and another <t1> <t2>, not a hotdog"
    assert bind_concept_tokens("teddy bear on a bench", "teddy bear", tokens) == "<t1> <t2> on a bench"


def _one_image_folder(folder, caption_bytes):
    folder.mkdir(parents=True, exist_ok=True)
    _save(folder / "a.png")
    (folder / "a.txt").write_bytes(caption_bytes)
    return folder


@pytest.mark.parametrize("raw,expected", [
    (b"the dog\x92s ball", "the dog’s ball"),  # Windows-1252 curly apostrophe
    (b"\xef\xbb\xbfa dog on grass\r\n", "a dog on grass"),  # UTF-8 with a byte-order mark (Notepad)
    ("a dog’s ball\n".encode("utf-16"), "a dog’s ball"),  # UTF-16 with its BOM (Notepad "Unicode")
    ("caf\u00e9 dog\n\n second line".encode(), "café dog second line"),
    (b"  \n", None),
])
def test_captions_as_tools_write_them(tmp_path, raw, expected):
    (example,) = load_concept_folder(_one_image_folder(tmp_path, raw), "folder")
    assert example.caption == expected


@pytest.mark.parametrize("raw", [b"a \x81 byte that no Windows code page maps", b"text\x00with NUL"])
def test_undecodable_caption_names_the_file(tmp_path, raw):
    with pytest.raises(CIDMInputError, match=r"folder: caption a\.txt"):
        load_concept_folder(_one_image_folder(tmp_path, raw), "folder")


def test_file_symlinks_must_stay_inside_the_root(tmp_path):
    outside = tmp_path / "outside"
    _one_image_folder(outside, b"secret caption")
    root = tmp_path / "input"
    concept = root / "dog"
    concept.mkdir(parents=True)
    _save(concept / "b.png")
    (concept / "c.png").symlink_to(outside / "a.png")
    with pytest.raises(CIDMInputError, match=r"folder: c\.png links to .*outside"):
        load_concept_folder(concept, "folder", root=root)
    (concept / "c.png").unlink()
    (concept / "b.txt").symlink_to(outside / "a.txt")
    with pytest.raises(CIDMInputError, match=r"folder: b\.txt links to .*outside"):
        load_concept_folder(concept, "folder", root=root)
    (concept / "b.txt").unlink()
    # A link to another folder inside the root is fine; the default root is the folder itself.
    _one_image_folder(root / "shared", b"a dog")
    (concept / "c.png").symlink_to(root / "shared" / "a.png")
    (concept / "c.txt").symlink_to(root / "shared" / "a.txt")
    assert [e.caption for e in load_concept_folder(concept, "folder", root=root)] == [None, "a dog"]
    with pytest.raises(CIDMInputError, match=r"c\.png links to"):
        load_concept_folder(concept, "folder")
