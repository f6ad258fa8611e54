"""Synthetic identical twins in the user's exact format: a family shares one face; each member has marks of their
own, what alone tells twins apart; every mark's position is written out, so explanations can be checked.

    python synth.py --out data/synth --shape real [--traits sites|random] [--size 112] [--seed 0]
"""
import argparse
import json
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

import data
from errors import run_cli

DEMO_SHAPE = {"train": (100, 1, 8), "test": (16, 0, 6)}  # (twin pairs, triplets, images per person)


REAL_STRUCTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "fixtures",
                              "nd_twin_split_structure.json")  # the real split's ids, image names and twin pairs


def synth_structure(shape, structure_file):
    """{split: (images {id: [file names]}, pairs)} for the demo, or the real split's shape."""
    if shape == "real":
        with open(structure_file) as f:
            real = json.load(f)
        return {s: (real[s]["images"], real[s]["twin_pairs"]) for s in ("train", "test")}
    out, next_id = {}, 10000
    for split, (n_pairs, n_triplets, n_images) in DEMO_SHAPE.items():
        images, pairs = {}, []
        for size in [2] * n_pairs + [3] * n_triplets:
            family = [str(next_id + i) for i in range(size)]
            next_id += size
            pairs += [[a, b] for i, a in enumerate(family) for b in family[i + 1:]]
            for pid in family:
                images[pid] = [f"{pid}d{k}.jpg" for k in range(n_images)]
        out[split] = (images, pairs)
    return out


def _family_look(rng):
    return {"skin": tuple(int(c) for c in rng.integers([150, 100, 70], [240, 190, 160])),
            "hair": tuple(int(c) for c in rng.integers(20, 120, 3)),
            "face_w": rng.uniform(0.28, 0.36), "face_h": rng.uniform(0.36, 0.44),
            "eye_y": rng.uniform(0.40, 0.46), "eye_dx": rng.uniform(0.11, 0.15), "eye_r": rng.uniform(0.025, 0.04),
            "nose": rng.uniform(0.08, 0.13), "mouth_y": rng.uniform(0.66, 0.72), "mouth_w": rng.uniform(0.08, 0.14)}


# Where moles may sit, face-relative: forehead, cheeks, chin; clear of the eyes, brows, nose and mouth.
MARK_SITES = [(0.41, 0.27), (0.50, 0.25), (0.59, 0.27), (0.30, 0.55), (0.70, 0.55),
              (0.31, 0.66), (0.69, 0.66), (0.42, 0.80), (0.58, 0.80)]


def _family_traits(rng, n_members, n=3):
    """Site style: each member's three moles at fixed face sites, what alone tells identical twins apart.
    Members share at most one site, so every twin differs from the other in at least two marks."""
    while True:
        sites = [set(rng.choice(len(MARK_SITES), n, replace=False).tolist()) for _ in range(n_members)]
        if all(len(a & b) <= 1 for i, a in enumerate(sites) for b in sites[i + 1:]):
            break
    return [[{"kind": "mole", "x": MARK_SITES[k][0] + rng.uniform(-0.012, 0.012),
              "y": MARK_SITES[k][1] + rng.uniform(-0.012, 0.012), "r": rng.uniform(0.06, 0.07)}
             for k in sorted(member)] for member in sites]


MARK_KINDS = ("mole", "scar", "freckles", "brow_notch")


def _random_traits(rng, look, n_members, n=3):
    """Random style: each member's own n small marks of several kinds at random places on the face, 3-8 px
    across at 112 px; twins share nothing of them. r is the radius a mark covers, face-relative. (Marks half
    this size, 1-2 px at the demo's 84 px, were learned by no method, the ArcFace yardstick included.)"""
    out = []
    for _ in range(n_members):
        marks = []
        for kind in rng.choice(MARK_KINDS, n):
            if kind == "brow_notch":  # a gap across one eyebrow, somewhere along it
                side, t = rng.choice([-1, 1]), rng.uniform(0.2, 0.8)
                ex, ey, er = 0.5 + side * look["eye_dx"], look["eye_y"], look["eye_r"]
                marks.append({"kind": "brow_notch", "x": ex - 2 * er + 4 * er * t, "y": ey - er * (2.2 + 0.2 * t),
                              "r": 0.03})
                continue
            # a uniform point on the skin, clear of its edge
            radius, angle = 0.8 * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
            x = 0.5 + radius * look["face_w"] * 0.92 * math.cos(angle)
            y = 0.56 + radius * look["face_h"] * 0.9 * math.sin(angle)
            if kind == "mole":
                marks.append({"kind": "mole", "x": x, "y": y, "r": rng.uniform(0.022, 0.036)})
            elif kind == "scar":
                marks.append({"kind": "scar", "x": x, "y": y, "r": rng.uniform(0.045, 0.065),
                              "angle": rng.uniform(0, math.pi)})
            else:
                dots = [(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04), rng.uniform(0.011, 0.016))
                        for _ in range(int(rng.integers(4, 7)))]
                marks.append({"kind": "freckles", "x": x, "y": y, "r": 0.04 * math.sqrt(2) + 0.016, "dots": dots})
        out.append(marks)
    return out


def _draw_mark(d, mark, look, P, S):
    x, y, r = mark["x"], mark["y"], mark["r"]
    if mark["kind"] == "mole":
        d.ellipse([*P(x - r, y - r), *P(x + r, y + r)], fill=(60, 35, 25))
    elif mark["kind"] == "scar":
        dx, dy = r * math.cos(mark["angle"]), r * math.sin(mark["angle"])
        d.line([*P(x - dx, y - dy), *P(x + dx, y + dy)], fill=(120, 50, 45), width=max(4, S // 56))
    elif mark["kind"] == "freckles":
        for ox, oy, dr in mark["dots"]:
            d.ellipse([*P(x + ox - dr, y + oy - dr), *P(x + ox + dr, y + oy + dr)], fill=(110, 70, 45))
    else:  # brow_notch: skin drawn across the brow
        d.line([*P(x, y - 0.02), *P(x, y + 0.02)], fill=look["skin"], width=max(6, S // 30))


def _photo_conditions(rng, size, style):
    """What changes from one photo of a person to the next: background, expression, pose, focus, light and
    sensor noise. The site style keeps ND TWIN's controlled setting (a similar grey background and light);
    the random style varies them: any background colour, more pose, light falling from one side."""
    if style == "sites":
        grey = int(rng.integers(120, 150))
        bg = tuple(grey + int(c) for c in rng.integers(-8, 9, 3))
        smile = rng.uniform(-0.02, 0.03)
        angle, tx, ty = rng.uniform(-2, 2), rng.uniform(-0.015, 0.015), rng.uniform(-0.015, 0.015)
        blur, gain, light = rng.uniform(0, 1.2), rng.uniform(0.92, 1.08), (0.0, 0.0)
    else:
        bg = tuple(int(c) for c in rng.integers(40, 220, 3))
        smile = rng.uniform(-0.02, 0.03)
        angle, tx, ty = rng.uniform(-6, 6), rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)
        blur, gain, light = rng.uniform(0, 0.6), rng.uniform(0.85, 1.15), (rng.uniform(0, 2 * math.pi),
                                                                         rng.uniform(0, 0.3))
    return {"bg": bg, "smile": smile, "angle": angle, "tx": tx, "ty": ty, "blur": blur, "gain": gain,
            "light": light, "noise": rng.normal(0, 3, (size, size, 3))}


def _draw_face(look, marks, cond, size):
    """One photo: the family's look, the person's marks, and the photo's conditions; returns the image and
    each mark's [x, y, radius] in its pixels."""
    S = 2 * size  # draw at 2x and downsample, for smooth edges
    bg = cond["bg"]
    im = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(im)
    P = lambda x, y: (x * S, y * S)  # noqa: E731
    fw, fh = look["face_w"], look["face_h"]
    d.ellipse([*P(0.5 - fw, 0.52 - fh), *P(0.5 + fw, 0.52 + fh)], fill=look["hair"])
    d.ellipse([*P(0.5 - fw * 0.92, 0.56 - fh * 0.9), *P(0.5 + fw * 0.92, 0.56 + fh * 0.92)], fill=look["skin"])
    for side in (-1, 1):
        ex, ey, er = 0.5 + side * look["eye_dx"], look["eye_y"], look["eye_r"]
        d.ellipse([*P(ex - er * 1.6, ey - er), *P(ex + er * 1.6, ey + er)], fill=(245, 245, 245))
        d.ellipse([*P(ex - er * 0.7, ey - er * 0.7), *P(ex + er * 0.7, ey + er * 0.7)], fill=(50, 40, 30))
        d.line([*P(ex - er * 2, ey - er * 2.2), *P(ex + er * 2, ey - er * 2.4)], fill=look["hair"], width=S // 60)
    d.line([*P(0.5, look["eye_y"] + 0.03), *P(0.5, look["eye_y"] + 0.03 + look["nose"])],
           fill=tuple(c - 40 for c in look["skin"]), width=S // 70)
    mw, my = look["mouth_w"], look["mouth_y"]
    d.line([*P(0.5 - mw, my), *P(0.5, my + cond["smile"]), *P(0.5 + mw, my)], fill=(150, 50, 50), width=S // 50,
           joint="curve")
    for mark in marks:
        _draw_mark(d, mark, look, P, S)
    # aligned crops: a residual pose, as after face alignment
    angle, tx, ty = cond["angle"], cond["tx"] * S, cond["ty"] * S
    im = im.rotate(angle, resample=Image.BICUBIC, translate=(tx, ty), fillcolor=bg)
    im = im.filter(ImageFilter.GaussianBlur(cond["blur"])).resize((size, size), Image.LANCZOS)
    arr = np.asarray(im).astype(np.float32) * cond["gain"]
    direction, strength = cond["light"]
    if strength:  # brighter on one side, darker on the other
        t = (np.arange(size) + 0.5) / size - 0.5
        arr = arr * (1 + strength * (math.cos(direction) * t[None, :, None] + math.sin(direction) * t[:, None, None]))
    im = Image.fromarray((arr + cond["noise"]).clip(0, 255).astype(np.uint8))
    a = math.radians(angle)  # where each mark ended up: PIL rotates counter-clockwise about the centre
    placed = []
    for mark in marks:
        dx, dy = mark["x"] * S - S / 2, mark["y"] * S - S / 2
        px = S / 2 + dx * math.cos(a) + dy * math.sin(a) + tx
        py = S / 2 - dx * math.sin(a) + dy * math.cos(a) + ty
        placed.append([round(px / 2, 2), round(py / 2, 2), round(mark["r"] * size, 2)])
    return im, placed


def _synth_person(args):
    out_dir, pid, files, look, marks, seed, size, style = args
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images", pid), exist_ok=True)
    placed = {}
    for name in files:
        path = os.path.abspath(os.path.join(out_dir, "images", pid, name))
        im, placed[path] = _draw_face(look, marks, _photo_conditions(rng, size, style), size)
        im.save(path, quality=92)
    return placed


def synth(out_dir, shape="demo", size=112, seed=0, structure_file=None, traits="sites"):
    """Write images/ID/*.jpg, {train,test}_{info,pairs}.json and traits.json (every mark, in pixels).
    traits: 'sites' (three moles at nine fixed sites, a controlled setting) or 'random' (marks of several
    kinds at random places, varied pose, light and background)."""
    structure_file = structure_file or REAL_STRUCTURE
    rng = np.random.default_rng(seed)
    all_marks, jobs, files = {}, [], {}
    for split, (images, pairs) in synth_structure(shape, structure_file).items():
        people = data.split_of(images, pairs)
        ids = people.ids
        face_of = {}  # (look, marks): a family shares one look; each member has its own marks
        for family in people.families:
            look = _family_look(rng)
            members = (_family_traits(rng, len(family)) if traits == "sites" else
                       _random_traits(rng, look, len(family)))
            face_of.update({ids[p]: (look, marks) for p, marks in zip(family, members)})
        for pid in ids:
            jobs.append((out_dir, pid, images[pid], *face_of[pid], int(rng.integers(2**31)), size, traits))
        files[split] = ({pid: [os.path.abspath(os.path.join(out_dir, "images", pid, n)) for n in images[pid]]
                         for pid in ids}, pairs)
    with data.worker_pool() as pool:
        for marks in pool.map(_synth_person, jobs, chunksize=4):
            all_marks.update(marks)
    for split, (info, pairs) in files.items():
        with open(os.path.join(out_dir, f"{split}_info.json"), "w") as f:
            json.dump(info, f, indent=1)
        with open(os.path.join(out_dir, f"{split}_pairs.json"), "w") as f:
            json.dump(pairs, f)
    with open(os.path.join(out_dir, "traits.json"), "w") as f:
        json.dump({"format": "image path -> [[x, y, radius]] in pixels of the saved image", "marks": all_marks}, f)
    n = sum(len(v) for info, _ in files.values() for v in info.values())
    print(f"wrote {n} images and the info files to {out_dir}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", choices=["demo", "real"], default="demo",
                    help="demo: small; real: the real split's ids, image counts and pairs")
    ap.add_argument("--size", type=int, default=112, help="saved image side in pixels")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traits", choices=["sites", "random"], default="sites",
                    help="sites: three moles at fixed face sites, controlled setting; random: small marks of "
                         "several kinds at random places, varied pose, light and background")
    ap.add_argument("--structure", help="the real split's shape (default: tests/fixtures/nd_twin_split_structure.json)")
    args = ap.parse_args(argv)
    data.make_folder(args.out, "--out")
    synth(args.out, args.shape, args.size, args.seed, args.structure, args.traits)


if __name__ == "__main__":
    sys.exit(run_cli(main))
