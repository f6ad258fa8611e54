"""Charts and heat-map overlays drawn with PIL alone (the project does not depend on matplotlib)."""
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Colour maps as anchor colours, interpolated linearly: inferno-like for maps, blue-white-red for signed ones.
SEQUENTIAL = [(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)]
DIVERGING = [(33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43)]
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def font(size=13):
    return ImageFont.load_default(size=size)


def colourize(values, cmap):
    """Values in [0, 1] (any shape) -> uint8 RGB of shape (..., 3)."""
    anchors = np.array(cmap, dtype=np.float32)
    pos = np.clip(values, 0, 1) * (len(anchors) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(anchors) - 2)
    frac = (pos - lo)[..., None]
    return (anchors[lo] * (1 - frac) + anchors[lo + 1] * frac).round().astype(np.uint8)


def overlay(photo, heat, vmin, vmax, cmap, alpha=0.55, size=160):
    """A photo (H, W, 3 uint8) with a patch-grid map (h, w) upsampled and blended over it."""
    base = Image.fromarray(photo).resize((size, size), Image.BICUBIC)
    norm = (np.asarray(heat, dtype=np.float32) - vmin) / max(vmax - vmin, 1e-12)
    heat_img = Image.fromarray(colourize(norm, cmap)).resize((size, size), Image.BILINEAR)
    return Image.blend(base, heat_img, alpha)


def colour_bar(height, vmin, vmax, cmap, label, width=70):
    """A vertical scale with its end values and a label."""
    bar = Image.new("RGB", (width, height), "white")
    ramp = colourize(np.linspace(1, 0, height - 30)[:, None].repeat(14, 1), cmap)
    bar.paste(Image.fromarray(ramp), (4, 15))
    d = ImageDraw.Draw(bar)
    d.text((20, 10), f"{vmax:+.3g}" if vmin < 0 else f"{vmax:.3g}", fill="black", font=font(11))
    d.text((20, height - 28), f"{vmin:+.3g}" if vmin < 0 else f"{vmin:.3g}", fill="black", font=font(11))
    d.text((20, height // 2 - 6), label, fill="black", font=font(11))
    return bar


def _ticks(lo, hi, log):
    if log:
        return [10.0 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                if lo <= 10.0 ** e <= hi]
    step = 10 ** math.floor(math.log10((hi - lo) / 4 or 1))
    step *= 2 if (hi - lo) / step > 10 else 1
    return list(np.arange(math.ceil(lo / step) * step, hi + 1e-9, step))


def line_chart(series, title, xlabel, ylabel, xlim, ylim, xlog=False, ylog=False, size=(420, 360)):
    """series: [(label, xs, ys)]; points outside the limits are clipped to the frame."""
    W, H = size
    left, right, top, bottom = 62, 12, 28, 48
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)

    def scale(v, lo, hi, log, a, b):
        v = np.clip(np.asarray(v, dtype=np.float64), lo, hi)
        if log:
            v, lo, hi = np.log10(v), math.log10(lo), math.log10(hi)
        return a + (v - lo) / (hi - lo) * (b - a)

    X = lambda v: scale(v, *xlim, xlog, left, W - right)  # noqa: E731
    Y = lambda v: scale(v, *ylim, ylog, H - bottom, top)  # noqa: E731
    for t in _ticks(*xlim, xlog):
        x = float(X(t))
        d.line([(x, top), (x, H - bottom)], fill=(230, 230, 230))
        d.text((x, H - bottom + 4), f"{t:g}", fill="black", font=font(11), anchor="ma")
    for t in _ticks(*ylim, ylog):
        y = float(Y(t))
        d.line([(left, y), (W - right, y)], fill=(230, 230, 230))
        d.text((left - 4, y), f"{t:g}", fill="black", font=font(11), anchor="rm")
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for i, (label, xs, ys) in enumerate(series):
        colour = COLOURS[i % len(COLOURS)]
        pts = list(zip(X(xs).tolist(), Y(ys).tolist()))
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        d.line([(left + 10, top + 10 + 16 * i), (left + 30, top + 10 + 16 * i)], fill=colour, width=3)
        d.text((left + 35, top + 4 + 16 * i), label, fill="black", font=font(12))
    d.text((W / 2, 6), title, fill="black", font=font(14), anchor="ma")
    d.text((W / 2 + left / 2, H - 18), xlabel, fill="black", font=font(12), anchor="ma")
    ylabel_img = Image.new("RGB", (H, 16), "white")
    ImageDraw.Draw(ylabel_img).text((H / 2, 0), ylabel, fill="black", font=font(12), anchor="ma")
    img.paste(ylabel_img.rotate(90, expand=True), (2, 0))
    return img


def row(images, gap=8):
    out = Image.new("RGB", (sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)),
                    "white")
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width + gap
    return out
