"""Small PIL plots returned to ComfyUI as IMAGE tensors [1, H, W, 3] (no plotting library needed)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

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
            cell: int = 28) -> torch.Tensor:
    """Rows × columns of values in [0, 1], darker = larger, each cell labelled with its value."""
    rows, columns = matrix.shape
    left, top = 90, 40
    image = Image.new("RGB", (left + columns * cell + 10, top + rows * cell + 10), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title, fill=INK)
    for c, label in enumerate(column_labels):
        draw.text((left + c * cell + 2, top - 14), label[:4], fill=INK)
    for r, label in enumerate(row_labels):
        draw.text((4, top + r * cell + 8), label[:12], fill=INK)
        for c in range(columns):
            value = float(matrix[r, c])
            shade = int(255 * (1 - max(0.0, min(1.0, value))))
            box = [left + c * cell, top + r * cell, left + (c + 1) * cell - 1, top + (r + 1) * cell - 1]
            draw.rectangle(box, fill=(shade, shade, 255))
            draw.text((box[0] + 2, box[1] + 8), f"{value:.2f}"[1:] if value < 1 else "1.0",
                      fill=INK if shade > 120 else BACKGROUND)
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
