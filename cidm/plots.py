"""Small PIL plots returned to ComfyUI as IMAGE tensors [1, H, W, 3] (no plotting library needed)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND, INK, GRID = (255, 255, 255), (30, 30, 30), (220, 220, 220)


def _to_image_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)[None]


def line_plot(values: list[float], title: str, width: int = 512, height: int = 256) -> torch.Tensor:
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 48, 24, width - 12, height - 24
    draw.rectangle([left, top, right, bottom], outline=GRID)
    draw.text((left, 4), title, fill=INK)
    if values:
        low, high = min(values), max(values)
        span = (high - low) or 1.0
        count = max(1, len(values) - 1)
        points = [(left + (right - left) * i / count, bottom - (bottom - top) * (v - low) / span)
                  for i, v in enumerate(values)]
        draw.line(points if len(points) > 1 else points * 2, fill=(200, 40, 40), width=2)
        draw.text((2, top), f"{high:.3g}", fill=INK)
        draw.text((2, bottom - 10), f"{low:.3g}", fill=INK)
        draw.text((right - 60, bottom + 6), f"step {len(values)}", fill=INK)
    return _to_image_tensor(image)


def heatmap(matrix: torch.Tensor, row_labels: list[str], column_labels: list[str], title: str,
            font_size: int = 14, cell_height: int = 26) -> torch.Tensor:
    """Rows × columns of values in [0, 1], darker = larger, each cell labelled with its value (NaN: an empty cell
    labelled "–").

    Labels are drawn in full: every column is as wide as its label (at least 64 px), the row label margin as wide
    as the longest row label, in PIL's scalable default font at `font_size` px. Returns an IMAGE tensor
    [1, H, W, 3] in [0, 1]."""
    font = ImageFont.load_default(size=font_size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def text_width(text: str) -> int:
        return int(measure.textlength(text, font=font))

    rows, columns = matrix.shape
    pad = 8
    left = pad + max([text_width(label) for label in row_labels] + [0]) + pad
    widths = [max(64, text_width(label) + 2 * pad) for label in column_labels]
    starts = [left + sum(widths[:c]) for c in range(columns)]
    top = pad + 2 * (font_size + pad)
    width = max(left + sum(widths) + pad, text_width(title) + 2 * pad)
    image = Image.new("RGB", (width, top + rows * cell_height + pad), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), title, fill=INK, font=font)
    for c, label in enumerate(column_labels):
        draw.text((starts[c] + pad, top - font_size - pad), label, fill=INK, font=font)
    for r, label in enumerate(row_labels):
        y = top + r * cell_height
        draw.text((pad, y + (cell_height - font_size) // 2), label, fill=INK, font=font)
        for c in range(columns):
            value = float(matrix[r, c])
            box = [starts[c], y, starts[c] + widths[c] - 2, y + cell_height - 2]
            if value != value:  # NaN: no value here (a concept not learned yet); an empty cell with a dash
                draw.rectangle(box, outline=GRID)
                draw.text((box[0] + pad, y + (cell_height - font_size) // 2), "–", fill=INK, font=font)
                continue
            shade = int(255 * (1 - max(0.0, min(1.0, value))))
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text((box[0] + pad, y + (cell_height - font_size) // 2), f"{value:.2f}",
                      fill=INK if shade > 120 else BACKGROUND, font=font)
    return _to_image_tensor(image)


REGION_COLOURS = ((230, 80, 60), (60, 140, 230), (70, 180, 90), (230, 170, 40), (170, 90, 210), (40, 190, 190))


def region_layout(masks: list[torch.Tensor], labels: list[str], width: int, height: int,
                  longest_side: int = 512) -> torch.Tensor:
    """The regions over a blank canvas of the image's aspect ratio: each [H, W] mask as a translucent colour (its
    opacity follows the mask's value), its box outlined and labelled. IMAGE [1, h, w, 3] with the longer side
    `longest_side` pixels."""
    scale = longest_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = np.full((size[1], size[0], 3), 245.0, dtype=np.float32)
    boxes = []
    for index, mask in enumerate(masks):
        colour = np.asarray(REGION_COLOURS[index % len(REGION_COLOURS)], dtype=np.float32)
        resized = Image.fromarray((mask.clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)).resize(size, Image.BILINEAR)
        opacity = np.asarray(resized, dtype=np.float32)[..., None] / 255.0 * 0.55
        canvas = canvas * (1 - opacity) + colour * opacity
        rows, columns = np.nonzero(np.asarray(resized) > 0)
        if rows.size:
            boxes.append((index, colour, (columns.min(), rows.min(), columns.max(), rows.max())))
    image = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, size[0] - 1, size[1] - 1], outline=GRID)
    for index, colour, box in boxes:
        rgb = tuple(int(c * 0.7) for c in colour)
        draw.rectangle(box, outline=rgb, width=2)
        text = f"{index + 1}: {labels[index]}" if labels[index] else f"region {index + 1}"
        draw.rectangle([box[0] + 2, box[1] + 2, box[0] + 8 + 6 * len(text), box[1] + 16], fill=BACKGROUND)
        draw.text((box[0] + 5, box[1] + 4), text, fill=rgb)
    return _to_image_tensor(image)
