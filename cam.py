"""Explanations: where on both faces a verifier found the evidence for a pair's score (model.Evidence).

    python cam.py a.jpg b.jpg [--ckpt ckpt] [--out pair.png]   # a run folder (its best.pt) or a checkpoint
    python cam.py --pairs test --n 16 --out DIR | --faithfulness --n 64 | --trait-hits DATA/traits.json --n 64
traits: a part per trait prompt with its share of 1 - score; promptcam: a part per head ranked by Prompt-CAM's greedy
blur; arcface: the score alone. A figure shows where the faces differ, then the most telling parts on both faces.
"""
import argparse
import html
import os
import sys

import numpy as np
import torch

import data
import plots
from evaluate import GENUINE, KINDS, TWIN, protocol_pairs
from errors import UserError, refuse, run_cli
from checkpoints import checkpoint_of_run, read_training_checkpoint, verifier_from_checkpoint
from tracking import Tracker, tracker_of_checkpoint


def load_model(ckpt_path, device):
    ckpt = read_training_checkpoint(ckpt_path)
    model = verifier_from_checkpoint(ckpt, ckpt_path, ckpt["config"]["weights_dir"] or None)
    return model.to(device).eval(), ckpt


def read_image(path, size):
    """Any image file prepared exactly as the training cache prepares it."""
    try:
        return data.load_image(path, size)
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def explain_pair(model, image_a, image_b, device):
    """The verifier's evidence (model.Evidence) on two uint8 images."""
    return model.evidence(data.normalize(torch.stack([image_a, image_b]).to(device)))


def to_photo(image):
    return image.permute(1, 2, 0).numpy()


def tile(title, photo, heat=None, lo=0.0, hi=1.0, cmap=None, panel=150):
    """A titled panel: the photo, or a map over it."""
    from PIL import Image, ImageDraw
    if heat is None:
        image = Image.fromarray(photo).resize((panel, panel), Image.BICUBIC)
    else:
        image = plots.overlay(photo, heat, lo, hi, cmap, size=panel)
    framed = Image.new("RGB", (panel, panel + 18), "white")
    framed.paste(image, (0, 18))
    ImageDraw.Draw(framed).text((panel / 2, 2), title, fill="black", font=plots.font(12), anchor="ma")
    return framed


def labelled_rows(header_text, rows):
    """A header, then each (label, row of tiles) under its label, as one image."""
    from PIL import Image, ImageDraw
    parts = []
    for label, body in rows:
        line = Image.new("RGB", (body.width, 20), "white")
        ImageDraw.Draw(line).text((4, 3), label, fill="black", font=plots.font(13))
        parts += [line, body]
    width = max(p.width for p in parts)
    header = Image.new("RGB", (width, 44), "white")
    ImageDraw.Draw(header).multiline_text((4, 4), header_text, fill="black", font=plots.font(14))
    out = Image.new("RGB", (width, sum(p.height for p in [header] + parts)), "white")
    y = 0
    for part in [header] + parts:
        out.paste(part, (0, y))
        y += part.height
    return out


def verdict(score, threshold):
    return "no threshold" if threshold is None else ("same" if score >= threshold else "different")


def header(name_a, name_b, score, threshold):
    return (f"A: {name_a}    B: {name_b}\npair score {score:+.4f}   threshold "
            f"{'n/a' if threshold is None else f'{threshold:+.4f}'}   verdict: {verdict(score, threshold)}")


def figure(evidence, image_a, image_b, name_a, name_b, threshold, top, panel=150):
    """Where the faces differ, then one row per part of the evidence, the `top` most telling: both photos, the
    part's maps on A and on B and its differences on each face, with their colour scales."""
    photo_a, photo_b = to_photo(image_a), to_photo(image_b)
    photos = [tile("A", photo_a, panel=panel), tile("B", photo_b, panel=panel)]
    first = photos
    if evidence.differ is not None:
        differ_max = float(evidence.differ.max()) or 1e-6
        first = photos + [tile("differs on A", photo_a, evidence.differ[0], 0, differ_max, plots.SEQUENTIAL, panel),
                          tile("differs on B", photo_b, evidence.differ[1], 0, differ_max, plots.SEQUENTIAL, panel),
                          plots.colour_bar(panel + 18, 0, differ_max, plots.SEQUENTIAL, evidence.differ_label)]
    rows = [(evidence.caption, plots.row(first, gap=4))]
    for part in evidence.parts[:top]:
        d = part.difference_scale
        tiles = photos + [tile(title, photo, heat, 0, part.scale, plots.SEQUENTIAL, panel)
                          for title, photo, heat in zip(part.titles, (photo_a, photo_b), part.maps)]
        tiles += [tile(title, photo, heat, -d, d, plots.DIVERGING, panel)
                  for title, photo, heat in zip(part.difference_titles, (photo_a, photo_b), part.differences)]
        tiles += [plots.colour_bar(panel + 18, 0, part.scale, plots.SEQUENTIAL, "attention"),
                  plots.colour_bar(panel + 18, -d, d, plots.DIVERGING, part.difference_label)]
        rows.append((part.caption, plots.row(tiles, gap=4)))
    return labelled_rows(header(name_a, name_b, evidence.score, threshold), rows)


def pair_figure(model, image_a, image_b, name_a, name_b, threshold, top, device):
    """(evidence, explanation figure) of two uint8 images; top: how many parts to draw."""
    evidence = explain_pair(model, image_a, image_b, device)
    return evidence, figure(evidence, image_a, image_b, name_a, name_b, threshold, top)


def pick_pairs(split, n):
    """n test pairs, half twin impostors and half genuine, spread evenly through the protocol (deterministic); each
    pair once, so fewer where the split has fewer, saying so."""
    a, b, kind, _, _ = protocol_pairs(split)
    chosen = []
    for k, count in ((TWIN, n - n // 2), (GENUINE, n // 2)):
        idx = np.flatnonzero(kind == k)
        if count > len(idx):
            print(f"--n {n}: the test split has {len(idx)} {KINDS[k]} pairs; each is used once", flush=True)
        picks = np.linspace(0, len(idx) - 1, min(count, len(idx))).round().astype(int)  # distinct: steps of 1 or more
        chosen += [(int(a[i]), int(b[i]), k) for i in idx[picks]]
    return chosen


def example_pair(cfg):
    """Two photos of twins from a config's test split, for the command line a finished run suggests."""
    try:
        split = data.load_split(cfg["test_info"], cfg["test_pairs"], cfg["path_remap"])
        a, b, _ = pick_pairs(split, 1)[0]
        return split.paths[a], split.paths[b]
    except (UserError, IndexError):
        return "A.jpg", "B.jpg"


def test_images(ckpt, args):
    """The test split (the checkpoint's, unless given) and its uint8 image cache at the model's size."""
    cfg = ckpt["config"]
    split = data.load_split(args.test_info or cfg["test_info"], args.test_pairs or cfg["test_pairs"],
                            cfg["path_remap"])
    return split, data.build_cache(split.paths, cfg["img_size"], cfg["cache_dir"])


def gallery(model, ckpt, args, device, tracker):
    split, images = test_images(ckpt, args)
    entries = []
    for i, (a, b, kind) in enumerate(pick_pairs(split, args.n)):
        evidence, fig = pair_figure(model, images[a], images[b], split.paths[a], split.paths[b], ckpt["threshold"],
                                    args.heads, device)
        name = f"pair_{i:03d}_{'twin' if kind == TWIN else 'genuine'}"
        fig.save(os.path.join(args.out, name + ".png"))
        tracker.log_image(f"test_{name}", fig, ckpt["epoch"])
        entries.append((name + ".png", "twin impostor" if kind == TWIN else "genuine", evidence.score))
    rows = "\n".join(f"<h3>{html.escape(kind)}: score {score:+.4f}</h3><img src='{name}'>" for name, kind, score
                     in entries)
    with open(os.path.join(args.out, "index.html"), "w") as f:
        f.write(f"<html><body><h1>Prompt-CAM gallery ({len(entries)} test pairs)</h1>\n{rows}\n</body></html>\n")
    print(f"wrote {len(entries)} pair pages and index.html to {args.out}")


def area(curve):
    x = np.linspace(0, 1, len(curve))
    return float(np.sum(np.diff(x) * (curve[1:] + curve[:-1]) / 2))


def faithfulness(model, ckpt, args, device, n_random=5):
    """How fast the pair score leaves its full value when patches are deleted in map order (higher area is
    better), and how fast it returns when they are inserted in map order (lower area is better), against
    random orders. |score - full score| is used because a map's patches may carry evidence for "same"
    (genuine pairs) or against it (twin impostors): what matters is that the score depends on them."""
    split, images = test_images(ckpt, args)
    rng = np.random.default_rng(0)
    results = {k: [] for k in ("deletion_map", "deletion_random", "insertion_map", "insertion_random")}
    for a, b, _ in pick_pairs(split, args.n):
        evidence = explain_pair(model, images[a], images[b], device)
        order_a, order_b = evidence.orders
        randoms = [(rng.permutation(len(order_a)), rng.permutation(len(order_b))) for _ in range(n_random)]
        for mode, insertion in (("deletion", False), ("insertion", True)):
            change = lambda oa, ob: area(np.abs(evidence.rescore(oa, ob, insertion) - evidence.score))  # noqa: E731
            results[f"{mode}_map"].append(change(order_a, order_b))
            results[f"{mode}_random"].append(np.mean([change(ra, rb) for ra, rb in randoms]))
    r = {k: np.array(v) for k, v in results.items()}
    summary = {k: float(v.mean()) for k, v in r.items()}
    summary.update(n_pairs=len(r["deletion_map"]),
                   map_beats_random_deletion=float(np.mean(r["deletion_map"] > r["deletion_random"])),
                   map_beats_random_insertion=float(np.mean(r["insertion_map"] < r["insertion_random"])))
    print(f"faithfulness over {summary['n_pairs']} test pairs (area under |pair score - full score| as patches "
          f"go; {n_random} random orders per pair):\n"
          f"  deletion:  maps {summary['deletion_map']:.4f}  random {summary['deletion_random']:.4f}  "
          f"(higher is better; maps higher on {100 * summary['map_beats_random_deletion']:.0f}% of pairs)\n"
          f"  insertion: maps {summary['insertion_map']:.4f}  random {summary['insertion_random']:.4f}  "
          f"(lower is better; maps lower on {100 * summary['map_beats_random_insertion']:.0f}% of pairs)")
    return summary


def trait_hits(model, ckpt, args, device):
    """Synthetic twins differ only in known marks: how often does where-they-differ peak on a patch holding one, and
    how often does a part's map (a trait prompt's attention) peak on one, where its reach holds a mark and more?"""
    traits = data.read_json(args.trait_hits, "traits")
    if not isinstance(traits, dict) or "marks" not in traits:
        raise UserError(f"{args.trait_hits}: no 'marks' in it; give the traits.json that `synth.py` wrote")
    marks = traits["marks"]
    split, images = test_images(ckpt, args)
    size = ckpt["config"]["img_size"]
    grid = model.vit.grid
    hits = chance = total = 0
    looks = look_chance = reaches = 0
    for a, b, _ in [p for p in pick_pairs(split, 2 * args.n) if p[2] == TWIN][:args.n]:
        evidence = explain_pair(model, images[a], images[b], device)
        for face, image in enumerate((a, b)):
            with_mark = patches_with_marks(marks[split.paths[image]], data.image_side(split.paths[image]), size, grid)
            hits += int(np.argmax(evidence.differ[face])) in with_mark
            chance += len(with_mark) / grid ** 2
            total += 1
            for part in evidence.parts:
                reach = set(np.flatnonzero(part.maps[face] > 0).tolist())
                if reach & with_mark and reach - with_mark:
                    looks += int(np.argmax(part.maps[face])) in with_mark
                    look_chance += len(reach & with_mark) / len(reach)
                    reaches += 1
    print(f"where-they-differ peak on a differing trait: {hits}/{total} = {hits / total:.1%} of twin images "
          f"(a random patch would hold one {chance / total:.1%} of the time; patch {size / grid:.0f}px)")
    if reaches:
        print(f"attention peak on a trait, in maps whose reach holds one and more: {looks}/{reaches} = "
              f"{looks / reaches:.1%} (a random patch of the reach: {look_chance / reaches:.1%})")
    return hits / total, chance / total


def patches_with_marks(image_marks, saved_side, size, grid):
    """Indices of the patches a mark (x, y, radius in the saved image's pixels) overlaps."""
    scale, cell = size / saved_side, size / grid
    out = set()
    for x, y, r in image_marks:
        x, y, r = x * scale, y * scale, r * scale
        for row in range(grid):
            for col in range(grid):
                nx = min(max(x, col * cell), (col + 1) * cell)
                ny = min(max(y, row * cell), (row + 1) * cell)
                if (nx - x) ** 2 + (ny - y) ** 2 <= r ** 2:
                    out.add(row * grid + col)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", nargs="*", help="two face images, A and B")
    ap.add_argument("--ckpt", default="ckpt", help="a run folder (its best.pt, else last.pt) or a checkpoint file")
    ap.add_argument("--out", help="figure (pair) or folder (gallery); default pair.png / cam_gallery")
    ap.add_argument("--heads", type=int, default=3,
                    help="how many parts of the evidence to draw: the most differing trait prompts (traits) or the "
                         "top-ranked heads (promptcam)")
    ap.add_argument("--pairs", choices=["test"], help="a gallery of test pairs")
    ap.add_argument("--n", type=int, default=16, help="pairs for --pairs, --faithfulness and --trait-hits")
    ap.add_argument("--faithfulness", action="store_true")
    ap.add_argument("--trait-hits", help="traits.json of a synthetic set made by `synth.py`")
    ap.add_argument("--test-info", help="default: the checkpoint's test_info")
    ap.add_argument("--test-pairs", help="default: the checkpoint's test_pairs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tracker", action="store_true",
                    help="with --pairs, --faithfulness or --trait-hits: also log the figures or figures' checks to the "
                         "training run (the checkpoint's tracker and run id)")
    args = ap.parse_args(argv)
    refuse([f"--{name} {value}: must be at least 1" for name, value in (("n", args.n), ("heads", args.heads))
            if value < 1], "arguments")
    modes = sum([bool(args.images), bool(args.pairs), args.faithfulness, bool(args.trait_hits)])
    if modes != 1 or (args.images and len(args.images) != 2):
        ap.error("give two images, or one of --pairs, --faithfulness, --trait-hits")
    if args.tracker and args.images:
        ap.error("--tracker logs --pairs, --faithfulness or --trait-hits, not a single pair")
    args.out = args.out or ("cam_gallery" if args.pairs else "pair.png")
    if args.pairs:
        data.make_folder(args.out, "--out")
    elif args.images:
        data.make_folder(os.path.dirname(os.path.abspath(args.out)), "--out")
    device = torch.device(args.device)
    args.ckpt = checkpoint_of_run(args.ckpt)
    model, ckpt = load_model(args.ckpt, device)
    if (args.faithfulness or args.trait_hits) and not model.has_maps:
        raise UserError(f"{args.ckpt}: method {model.method} has no maps, so there is nothing to check")
    tracker = tracker_of_checkpoint(ckpt, args.ckpt) if args.tracker else Tracker()
    if args.pairs:
        gallery(model, ckpt, args, device, tracker)
    elif args.faithfulness:
        summary = faithfulness(model, ckpt, args, device)
        tracker.log_metrics({f"test_faithfulness_{k}": v for k, v in summary.items()}, ckpt["epoch"])
    elif args.trait_hits:
        hits, chance = trait_hits(model, ckpt, args, device)
        tracker.log_metrics({"test_trait_hits": hits, "test_trait_hits_random_patch": chance}, ckpt["epoch"])
    if not args.images:
        return tracker.finish()
    size = ckpt["config"]["img_size"]
    image_a, image_b = (read_image(p, size) for p in args.images)
    threshold = ckpt["threshold"]
    evidence, fig = pair_figure(model, image_a, image_b, *args.images, threshold, args.heads, device)
    print(f"score {evidence.score:+.4f}  threshold {'n/a' if threshold is None else f'{threshold:+.4f}'}  verdict: "
          f"{verdict(evidence.score, threshold)}")
    fig.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
