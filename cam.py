"""Prompt-CAM explanations: where on both faces the prompts found their evidence (promptcam and traits checkpoints).

    python cam.py a.jpg b.jpg [--ckpt ckpt] [--out pair.png]   # a run folder (its best.pt) or a checkpoint
    python cam.py --pairs test --n 16 --out DIR              # a gallery of twin and genuine test pairs
    python cam.py --faithfulness --n 64                      # deletion/insertion against random orders
    python cam.py --trait-hits DATA/traits.json --n 64       # synthetic set: do contrast peaks hit the marks?

Maps are the last block's attention of the identity prompts p(A), p(B) over the image patches, per head:
cross (p(A) on B, p(B) on A), self (p(A) on A, p(B) on B) and contrast (self minus cross on each image).
Heads are ranked by Prompt-CAM's greedy blur: the head whose map, made uniform, changes the pair score
least is dropped first; the last ones left matter most.
"""
import argparse
import html
import os
import sys

import numpy as np
import torch

import data
import plots
from evaluate import GENUINE, TWIN, protocol_pairs
from errors import UserError, run_cli
from model import METHOD_BEFORE_THE_KEY, checkpoint_of_run, read_training_checkpoint, verifier_from_checkpoint
from tracking import Tracker, tracker_of_checkpoint


def load_model(ckpt_path, device):
    ckpt = read_training_checkpoint(ckpt_path)
    method = ckpt["model_args"].get("method", METHOD_BEFORE_THE_KEY)
    if method == "arcface":
        raise UserError(f"{ckpt_path}: a method 'arcface' checkpoint has no prompts, so there are no prompt maps "
                         f"to draw; cam.py explains traits and promptcam checkpoints (evaluate.py scores every method)")
    model = verifier_from_checkpoint(ckpt, ckpt_path, ckpt["config"]["weights_dir"] or None)
    return model.to(device).eval(), ckpt


def read_image(path, size):
    """Any JPEG/PNG (grayscale, RGBA, any size) prepared exactly as the training cache prepares it."""
    try:
        return data.load_image(path, size)
    except FileNotFoundError:
        raise UserError(f"{path}: no such image file") from None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


@torch.no_grad()
def encode_pair(model, image_a, image_b, device):
    enc = model.encode(data.normalize(torch.stack([image_a, image_b]).to(device)))
    return enc[0], enc[1]


@torch.no_grad()
def rank_heads(model, enc_a, enc_b):
    """Heads from most to least important by greedy blurring (Prompt-CAM), with the pair score."""
    H = model.num_heads
    full, _ = model.pair_maps(enc_a, enc_b)
    blurred, dropped = torch.zeros(H, dtype=torch.bool), []
    while len(dropped) < H:
        change = {}
        for h in range(H):
            if not blurred[h]:
                trial = blurred.clone()
                trial[h] = True
                change[h] = abs(model.pair_maps(enc_a, enc_b, trial.to(enc_a.prompt.device))[0] - full)
        least = min(change, key=change.get)
        blurred[least] = True
        dropped.append(least)
    return dropped[::-1], full


@torch.no_grad()
def explain(model, enc_a, enc_b, top):
    """Score, ranked heads and maps (heads, grid, grid) as numpy, contrast maps included."""
    order, score = rank_heads(model, enc_a, enc_b)
    _, maps = model.pair_maps(enc_a, enc_b)
    maps = {k: v.float().cpu().numpy() for k, v in maps.items()}
    maps["contrast_a"] = maps["self_a"] - maps["cross_b_on_a"]
    maps["contrast_b"] = maps["self_b"] - maps["cross_a_on_b"]
    return score, order[:top], maps


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


def header(name_a, name_b, score, threshold):
    verdict = "no threshold" if threshold is None else ("same" if score >= threshold else "different")
    return (f"A: {name_a}    B: {name_b}\npair score {score:+.4f}   threshold "
            f"{'n/a' if threshold is None else f'{threshold:+.4f}'}   verdict: {verdict}")


def figure(image_a, image_b, name_a, name_b, score, threshold, heads, maps, panel=150):
    """promptcam: one row per top head: both photos, cross, self and contrast maps, with colour scales."""
    photo_a, photo_b = to_photo(image_a), to_photo(image_b)
    columns = [("p(A) looks on B", "cross_a_on_b", photo_b), ("p(B) looks on A", "cross_b_on_a", photo_a),
               ("p(A) on A (self)", "self_a", photo_a), ("p(B) on B (self)", "self_b", photo_b),
               ("contrast on A", "contrast_a", photo_a), ("contrast on B", "contrast_b", photo_b)]
    rows = []
    for rank, h in enumerate(heads):
        attn_max = max(float(maps[k][h].max()) for k in ("cross_a_on_b", "cross_b_on_a", "self_a", "self_b"))
        contrast_max = max(float(np.abs(maps[k][h]).max()) for k in ("contrast_a", "contrast_b")) or 1e-6
        tiles = [tile("A", photo_a, panel=panel), tile("B", photo_b, panel=panel)]
        for title, key, photo in columns:
            lo, hi, cmap = ((-contrast_max, contrast_max, plots.DIVERGING) if key.startswith("contrast") else
                            (0, attn_max, plots.SEQUENTIAL))
            tiles.append(tile(title, photo, maps[key][h], lo, hi, cmap, panel))
        tiles.append(plots.colour_bar(panel + 18, 0, attn_max, plots.SEQUENTIAL, "attention"))
        tiles.append(plots.colour_bar(panel + 18, -contrast_max, contrast_max, plots.DIVERGING, "self-cross"))
        on_faces = (maps["cross_a_on_b"][h].sum() + maps["cross_b_on_a"][h].sum()) / 2
        rows.append((f"head {h} (rank {rank + 1} by greedy blur): {on_faces:.1%} of the prompts' attention on the "
                     f"other face's patches", plots.row(tiles, gap=4)))
    return labelled_rows(header(name_a, name_b, score, threshold), rows)


# ---------------------------------------------------------------- verifier v2 (method traits)

@torch.no_grad()
def read_traits(model, image_a, image_b, device):
    """The trait prompts on both faces: what was read (the patch keys and final tokens, and both embeddings), the
    score, each prompt's term of the score and of 1 - score (model.pair_terms; each set adds up to its whole) and
    each prompt's attention on A and on B averaged over heads, (2, K, grid, grid)."""
    keys, tokens = model.keys_and_tokens(data.normalize(torch.stack([image_a, image_b]).to(device)))
    contributions, attn = model.read(keys, tokens)
    emb = model.embed(contributions)
    held, apart = (t.cpu().numpy() for t in model.pair_terms(contributions))
    grid = model.vit.grid
    maps = attn.float().mean(1).reshape(2, -1, grid, grid).cpu().numpy()
    return (keys, tokens, emb), float(emb[0] @ emb[1]), held, apart, maps


def weighted_maps(weights, maps):
    """(2, grid, grid): the prompts' maps on A and on B (2, K, grid, grid), weighted (K,) and summed. By each
    prompt's share of 1 - score it is where the faces differ (a prompt whose difference runs against the pair's
    has a negative share); by the size of each prompt's term of the score, where the score looks."""
    return (weights[None, :, None, None] * maps).sum(1)


def traits_figure(image_a, image_b, name_a, name_b, score, threshold, apart, maps, top, panel=150):
    """traits: where the faces differ (every prompt's map weighted by its share of 1 - score), then one row per
    trait prompt, the one whose reading differs most between the faces first: where it looks on A and on B, and
    the difference of the two maps on each face."""
    photo_a, photo_b = to_photo(image_a), to_photo(image_b)
    differ = weighted_maps(apart, maps)
    differ_max = float(differ.max()) or 1e-6
    rows = [(f"where they differ: every prompt's attention times its share of 1 - score = {1 - score:.4f}",
             plots.row([tile("A", photo_a, panel=panel), tile("B", photo_b, panel=panel),
                        tile("differs on A", photo_a, differ[0], 0, differ_max, plots.SEQUENTIAL, panel),
                        tile("differs on B", photo_b, differ[1], 0, differ_max, plots.SEQUENTIAL, panel),
                        plots.colour_bar(panel + 18, 0, differ_max, plots.SEQUENTIAL, "1 - score")], gap=4))]
    for k in np.argsort(-apart, kind="stable")[:top]:
        # the difference on the maps' own scale, so a difference of 1e-6 is not drawn as loud as one of 1
        attn_max = contrast_max = float(maps[:, k].max()) or 1e-6
        tiles = [tile("A", photo_a, panel=panel), tile("B", photo_b, panel=panel),
                 tile("prompt on A", photo_a, maps[0, k], 0, attn_max, plots.SEQUENTIAL, panel),
                 tile("prompt on B", photo_b, maps[1, k], 0, attn_max, plots.SEQUENTIAL, panel),
                 tile("on A minus on B", photo_a, maps[0, k] - maps[1, k], -contrast_max, contrast_max,
                      plots.DIVERGING, panel),
                 tile("on B minus on A", photo_b, maps[1, k] - maps[0, k], -contrast_max, contrast_max,
                      plots.DIVERGING, panel),
                 plots.colour_bar(panel + 18, 0, attn_max, plots.SEQUENTIAL, "attention"),
                 plots.colour_bar(panel + 18, -contrast_max, contrast_max, plots.DIVERGING, "A-B")]
        rows.append((f"trait prompt {k}: {apart[k]:.4f} of 1 - score = {1 - score:.4f} "
                     f"({apart[k] / max(1 - score, 1e-12):.0%})",
                     plots.row(tiles, gap=4)))
    return labelled_rows(header(name_a, name_b, score, threshold), rows)


def shown(model, wanted):
    """How many rows a figure can show: heads (promptcam) or trait prompts (traits)."""
    return min(wanted, len(model.trait_prompts) if model.method == "traits" else model.num_heads)


def pair_figure(model, image_a, image_b, name_a, name_b, threshold, top, device):
    """(score, explanation figure) of two uint8 images; top: heads (promptcam) or trait prompts (traits) shown."""
    if model.method == "traits":
        _, score, _, apart, maps = read_traits(model, image_a, image_b, device)
        return score, traits_figure(image_a, image_b, name_a, name_b, score, threshold, apart, maps, top)
    enc_a, enc_b = encode_pair(model, image_a, image_b, device)
    score, heads, maps = explain(model, enc_a, enc_b, top)
    return score, figure(image_a, image_b, name_a, name_b, score, threshold, heads, maps)


def evidence(model, image_a, image_b, device, top):
    """What the map checks need of a pair: its score; each face's contrast map (grid, grid), whose peak should
    sit on a trait the twins do not share; each face's patches in map order; and curves(order_a, order_b,
    insertion), the pair score as patches go (or come) in those orders on both faces at once.
    promptcam: self minus cross of the top heads; traits: where the faces differ (weighted_maps by share), and the
    order of all prompts' attention weighted by the size of their terms of the score."""
    if model.method == "traits":
        (keys, tokens, whole), score, held, apart, maps = read_traits(model, image_a, image_b, device)
        contrast_a, contrast_b = weighted_maps(apart, maps)
        # the patches the score leans on most first: each prompt's map weighted by the size of its term of the score
        leaned_on = weighted_maps(np.abs(held), maps)
        order_a, order_b = (np.argsort(-m.ravel(), kind="stable") for m in leaned_on)

        @torch.no_grad()
        def traits_curves(oa, ob, insertion):
            # as promptcam's two directions: each face, masked, against the other one whole
            masked_a = model.embed(model.read(keys[:1], tokens[:1], masks(oa, insertion).to(keys.device))[0])
            masked_b = model.embed(model.read(keys[1:], tokens[1:], masks(ob, insertion).to(keys.device))[0])
            return ((masked_a @ whole[1] + masked_b @ whole[0]) / 2).cpu().numpy()
        return score, contrast_a, contrast_b, order_a, order_b, traits_curves
    enc_a, enc_b = encode_pair(model, image_a, image_b, device)
    score, heads, maps = explain(model, enc_a, enc_b, top)
    order_a = np.argsort(-maps["cross_b_on_a"][heads].mean(0).ravel(), kind="stable")
    order_b = np.argsort(-maps["cross_a_on_b"][heads].mean(0).ravel(), kind="stable")
    return (score, maps["contrast_a"][heads].mean(0), maps["contrast_b"][heads].mean(0), order_a, order_b,
            lambda oa, ob, insertion: curves(model, enc_a, enc_b, oa, ob, insertion))


def pick_pairs(split, n):
    """n test pairs, half twin impostors and half genuine, spread evenly through the protocol (deterministic)."""
    a, b, kind, _, _ = protocol_pairs(split)
    chosen = []
    for k, count in ((TWIN, n - n // 2), (GENUINE, n // 2)):
        idx = np.flatnonzero(kind == k)
        chosen += [(int(a[i]), int(b[i]), k) for i in idx[np.linspace(0, len(idx) - 1, count).round().astype(int)]]
    return chosen


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
        score, fig = pair_figure(model, images[a], images[b], split.paths[a], split.paths[b], ckpt["threshold"],
                                 args.heads, device)
        name = f"pair_{i:03d}_{'twin' if kind == TWIN else 'genuine'}"
        fig.save(os.path.join(args.out, name + ".png"))
        tracker.log_image(f"test_{name}", fig, ckpt["epoch"])
        entries.append((name + ".png", "twin impostor" if kind == TWIN else "genuine", score))
    rows = "\n".join(f"<h3>{html.escape(kind)}: score {score:+.4f}</h3><img src='{name}'>" for name, kind, score
                     in entries)
    with open(os.path.join(args.out, "index.html"), "w") as f:
        f.write(f"<html><body><h1>Prompt-CAM gallery ({len(entries)} test pairs)</h1>\n{rows}\n</body></html>\n")
    print(f"wrote {len(entries)} pair pages and index.html to {args.out}")


def masks(order, insertion):
    """(P + 1, P) bool: row k keeps the first k patches of the order (insertion) or all but them (deletion)."""
    P = len(order)
    keep = torch.zeros(P + 1, P, dtype=torch.bool)
    for k in range(P + 1):
        keep[k, order[:k]] = True
    return keep if insertion else ~keep


@torch.no_grad()
def curves(model, enc_a, enc_b, order_a, order_b, insertion):
    """promptcam: pair score as patches are removed (or added) in the given orders, on both images at once."""
    device = enc_a.prompt.device

    def directed(prompt_enc, image_enc, keep):
        scores, _ = model.score_prompts(prompt_enc.prompt[None, None], image_enc[None], keep_patches=keep.to(device))
        return scores[:, 0]

    return ((directed(enc_a, enc_b, masks(order_b, insertion)) + directed(enc_b, enc_a, masks(order_a, insertion)))
            / 2).float().cpu().numpy()


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
        score, _, _, order_a, order_b, pair_curves = evidence(model, images[a], images[b], device, args.heads)
        randoms = [(rng.permutation(len(order_a)), rng.permutation(len(order_b))) for _ in range(n_random)]
        for mode, insertion in (("deletion", False), ("insertion", True)):
            change = lambda oa, ob: area(np.abs(pair_curves(oa, ob, insertion) - score))  # noqa: E731
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
    """Synthetic twins differ only in known marks: how often does a contrast map's peak patch hold one?"""
    traits = data.read_json(args.trait_hits, "traits")
    if not isinstance(traits, dict) or "marks" not in traits:
        raise UserError(f"{args.trait_hits}: no 'marks' in it; give the traits.json that `data.py synth` wrote")
    marks = traits["marks"]
    split, images = test_images(ckpt, args)
    size = ckpt["config"]["img_size"]
    grid = model.vit.grid
    cell = size / grid
    hits = chance = total = 0
    for a, b, _ in [p for p in pick_pairs(split, 2 * args.n) if p[2] == TWIN][:args.n]:
        _, contrast_a, contrast_b, _, _, _ = evidence(model, images[a], images[b], device, args.heads)
        for image, contrast in ((a, contrast_a), (b, contrast_b)):
            with_mark = patches_with_marks(marks[split.paths[image]], data.image_side(split.paths[image]), size, grid)
            peak = int(np.argmax(contrast))
            hits += peak in with_mark
            chance += len(with_mark) / grid ** 2
            total += 1
    print(f"contrast-map peak on a differing trait: {hits}/{total} = {hits / total:.1%} of twin images "
          f"(a random patch would hold one {chance / total:.1%} of the time; patch {cell:.0f}px)")
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
                    help="how many top-ranked heads (promptcam) or most differing trait prompts (traits) to show")
    ap.add_argument("--pairs", choices=["test"], help="a gallery of test pairs")
    ap.add_argument("--n", type=int, default=16, help="pairs for --pairs, --faithfulness and --trait-hits")
    ap.add_argument("--faithfulness", action="store_true")
    ap.add_argument("--trait-hits", help="traits.json of a synthetic set made by `data.py synth`")
    ap.add_argument("--test-info", help="default: the checkpoint's test_info")
    ap.add_argument("--test-pairs", help="default: the checkpoint's test_pairs")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tracker", action="store_true",
                    help="with --pairs, --faithfulness or --trait-hits: also log the figures or figures' checks to the "
                         "training run (the checkpoint's tracker and run id)")
    args = ap.parse_args(argv)
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
    tracker = tracker_of_checkpoint(ckpt, args.ckpt) if args.tracker else Tracker()
    args.heads = shown(model, args.heads)
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
    score, fig = pair_figure(model, image_a, image_b, *args.images, threshold, args.heads, device)
    verdict = "no threshold in checkpoint" if threshold is None else ("same" if score >= threshold else "different")
    print(f"score {score:+.4f}  threshold {'n/a' if threshold is None else f'{threshold:+.4f}'}  verdict: {verdict}")
    fig.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
