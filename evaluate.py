"""The exhaustive, deterministic twin protocol: every test image encoded once, every genuine and twin-impostor pair
(with --all-impostors every cross-person pair) scored from the cache; the threshold is the checkpoint's, chosen on
validation families, never on the test set; intervals are 95% bootstraps over twin families.

    python evaluate.py [--ckpt ckpt] [--out eval] [--all-impostors]   # a run folder (its best.pt) or a checkpoint
    python evaluate.py --ckpt ckpt --out eval_cls --baseline cls     # frozen CLS cosine, no prompts
"""
import argparse
import csv
import json
import math
import os
import sys
import time

import numpy as np
import torch

import data
import plots
from errors import refuse, run_cli
from checkpoints import checkpoint_of_run, read_training_checkpoint, verifier_from_checkpoint
from devices import autocast, default_precision
from model import load_vit
from tracking import tracker_of_checkpoint

GENUINE, TWIN, OTHER = 0, 1, 2
KINDS = ("genuine", "twin", "other")
FARS = (1e-1, 1e-2, 1e-3, 1e-4)


# ---------------------------------------------------------------- pairs

def protocol_pairs(split, all_impostors=False):
    """Every image pair of the split with its kind and the twin families of its two images."""
    family_of_person = np.empty(len(split.ids), dtype=np.int64)
    for f, members in enumerate(split.families):
        family_of_person[members] = f
    person = split.person.numpy()
    a, b = np.triu_indices(len(person), k=1)
    kind = np.where(person[a] == person[b], GENUINE,
                    np.where(family_of_person[person[a]] == family_of_person[person[b]], TWIN, OTHER))
    keep = np.ones_like(kind, dtype=bool) if all_impostors else kind != OTHER
    a, b, kind = a[keep], b[keep], kind[keep]
    return a, b, kind, family_of_person[person[a]], family_of_person[person[b]]


# ---------------------------------------------------------------- metrics (weighted, for the bootstrap)

def roc(scores, genuine, weights=None, order=None):
    """ROC points (far, tar, threshold) from the highest threshold down; tied scores make one point.
    `order` (scores sorted descending) may be passed in when only the weights change (the bootstrap)."""
    w = np.ones(len(scores)) if weights is None else np.asarray(weights, dtype=np.float64)
    order = np.argsort(-scores, kind="stable") if order is None else order
    s, g, w = scores[order], genuine[order], w[order]
    tp, fp = np.cumsum(w * g), np.cumsum(w * ~g)
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp, fp, thr = tp[last_of_tie], fp[last_of_tie], s[last_of_tie]
    n_gen, n_imp = tp[-1], fp[-1]
    far = np.r_[0.0, fp / n_imp] if n_imp else np.r_[0.0, np.zeros_like(fp)]
    tar = np.r_[0.0, tp / n_gen] if n_gen else np.r_[0.0, np.zeros_like(tp)]
    return far, tar, np.r_[np.inf, thr]


def auc(far, tar):
    """Area under the ROC (trapezoids), equal to P(genuine > impostor) with ties counted half."""
    return float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2))


def eer(far, tar):
    """Where FAR meets FRR = 1 - TAR, interpolated between the two ROC points around the crossing."""
    d = far - (1 - tar)  # rises from -1 to +1
    k = int(np.argmax(d >= 0))
    if k == 0:
        return float(far[0])
    t = -d[k - 1] / (d[k] - d[k - 1])
    return float(far[k - 1] + t * (far[k] - far[k - 1]))


def eer_threshold(far, tar, thr):
    """The score threshold (same if score >= it) of the ROC point nearest to FAR = FRR."""
    k = 1 + int(np.argmin(np.abs(far[1:] - (1 - tar[1:]))))
    return float(thr[k])


def tar_at_far(far, tar, target, n_impostor):
    """Highest TAR with FAR <= target; None where fewer than one impostor pair would be a false accept."""
    if n_impostor * target < 1:
        return None
    return float(tar[far <= target + 1e-15].max())


def accuracy(scores, genuine, threshold, weights=None):
    w = np.ones(len(scores)) if weights is None else weights
    return float(np.sum(w * ((scores >= threshold) == genuine)) / np.sum(w))


def metrics(scores, genuine, threshold, weights=None, fars=FARS[:3], order=None):
    n_imp = int((~genuine).sum())
    far, tar, _ = roc(scores, genuine, weights, order)
    out = {"auc": auc(far, tar), "eer": eer(far, tar),
           "tar_at_far": {f"{f:g}": tar_at_far(far, tar, f, n_imp) for f in fars}}
    if threshold is not None:
        out["accuracy"] = accuracy(scores, genuine, threshold, weights)
    return out


def family_resamples(genuine, fam_a, fam_b, n_families, n_boot=1000, seed=0):
    """Pair weights of n_boot resamplings of the twin families with replacement: a pair weighs as often as its family
    (or, for a cross-family pair, both of its families) was drawn; draws with no genuine or no impostor pair skipped."""
    rng = np.random.default_rng(seed)
    same = fam_a == fam_b
    for _ in range(n_boot):
        drawn = np.bincount(rng.integers(0, n_families, n_families), minlength=n_families).astype(np.float64)
        w = np.where(same, drawn[fam_a], drawn[fam_a] * drawn[fam_b])
        if w[genuine].sum() and w[~genuine].sum():
            yield w


def interval(values):
    """The 95% percentile interval of bootstrap values (None where none was defined)."""
    values = [v for v in values if v is not None]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else None


def bootstrap(scores, genuine, fam_a, fam_b, n_families, threshold, fars, n_boot=1000, seed=0):
    """95% intervals of the metrics over family_resamples."""
    order = np.argsort(-scores, kind="stable")
    samples = [metrics(scores, genuine, threshold, w, fars, order)
               for w in family_resamples(genuine, fam_a, fam_b, n_families, n_boot, seed)]
    out = {k: interval([s[k] for s in samples]) for k in ("auc", "eer", "accuracy") if k in samples[0]}
    out["tar_at_far"] = {f: interval([s["tar_at_far"][f] for s in samples]) for f in samples[0]["tar_at_far"]}
    return out


def eer_and_threshold(scores, genuine, fam_a, fam_b, n_families, n_boot=1000):
    """The EER and its threshold, each with its 95% interval over family_resamples: what a cross-validation's pooled
    out-of-fold scores give the final run."""
    order = np.argsort(-scores, kind="stable")
    far, tar, thr = roc(scores, genuine, order=order)
    samples = [roc(scores, genuine, w, order) for w in family_resamples(genuine, fam_a, fam_b, n_families, n_boot)]
    return {"eer": eer(far, tar), "eer_interval": interval([eer(f, t) for f, t, _ in samples]),
            "threshold": eer_threshold(far, tar, thr),
            "threshold_interval": interval([eer_threshold(*s) for s in samples])}


def report(scores, kind, fam_a, fam_b, n_families, threshold, n_boot=1000):
    """metrics.json's content: twin protocol first; all-impostor figures when those pairs were scored."""
    genuine = kind == GENUINE
    twin = kind != OTHER
    s, g = scores[twin], genuine[twin]
    out = metrics(s, g, threshold)
    out.update(threshold=threshold, n_genuine=int(g.sum()), n_twin=int((~g).sum()))
    out["intervals"] = bootstrap(s, g, fam_a[twin], fam_b[twin], n_families, threshold, FARS[:3], n_boot)
    if (kind == OTHER).any():
        all_imp = metrics(scores, genuine, threshold, fars=FARS)
        all_imp["n_impostor"] = int((~genuine).sum())
        all_imp["intervals"] = bootstrap(scores, genuine, fam_a, fam_b, n_families, threshold, FARS, n_boot)
        out["all_impostors"] = all_imp
    return out


# ---------------------------------------------------------------- encoding and scoring

@torch.no_grad()
def encode_images(model, images, device, precision="fp32", batch_size=64):
    """Encode a uint8 image cache in batches; keys/values stay in the autocast dtype to halve memory."""
    model.eval()
    parts = []
    for i in range(0, len(images), batch_size):
        with autocast(device, precision):
            parts.append(model.encode(data.normalize(images[i:i + batch_size].to(device))))
    return model.cat_encodings(parts)


def verifier_scores(model, images, a, b, device, precision="fp32"):
    """(scores, seconds encoding, seconds scoring) for pairs (a, b) of a uint8 image cache."""
    t0 = time.perf_counter()
    enc = encode_images(model, images, device, precision)
    t1 = time.perf_counter()
    with autocast(device, precision):
        scores = model.score_pairs(enc, a, b).float().cpu().numpy()
    return scores, t1 - t0, time.perf_counter() - t1


@torch.no_grad()
def cls_scores(vit, images, a, b, device, batch_size=64):
    """Baseline: cosine similarity of the frozen backbone's final-normed CLS features."""
    vit.eval()
    t0 = time.perf_counter()
    feats = torch.cat([vit(data.normalize(images[i:i + batch_size].to(device)))[:, 0]
                       for i in range(0, len(images), batch_size)])
    feats = torch.nn.functional.normalize(feats.float(), dim=-1).cpu()
    t1 = time.perf_counter()
    scores = (feats[a] * feats[b]).sum(-1).numpy()
    return scores, t1 - t0, time.perf_counter() - t1


def cls_threshold(vit, cfg, remap, device):
    """The CLS baseline's threshold: its EER on the validation families the model used (None after val_families: 0)."""
    train = data.load_split(cfg["train_info"], cfg["train_pairs"], remap)
    _, val = data.validation_split(train, cfg)
    if val is None:
        return None
    a, b, kind, _, _ = protocol_pairs(val)
    scores, _, _ = cls_scores(vit, data.build_cache(val.paths, cfg["img_size"], cfg["cache_dir"]), a, b, device)
    return eer_threshold(*roc(scores, kind == GENUINE))


def validate(model, images, split, device, precision):
    """Validation during training: the same twin protocol on held-out families; sets the threshold."""
    a, b, kind, _, _ = protocol_pairs(split)
    scores, _, _ = verifier_scores(model, images, a, b, device, precision)
    genuine = kind == GENUINE
    far, tar, thr = roc(scores, genuine)
    return {"eer": eer(far, tar), "auc": auc(far, tar), "threshold": eer_threshold(far, tar, thr),
            "scores": scores, "kind": kind}


# ---------------------------------------------------------------- outputs

def write_scores(path, split, a, b, kind, scores):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path_a", "path_b", "label", "kind", "score"])
        for i, j, k, s in zip(a.tolist(), b.tolist(), kind.tolist(), scores.tolist()):
            w.writerow([split.paths[i], split.paths[j], int(k == GENUINE), KINDS[k], repr(s)])


def roc_figure(scores, kind, title):
    """ROC, DET and score histograms side by side, as one PIL image."""
    genuine = kind == GENUINE
    twin = kind != OTHER
    far, tar, _ = roc(scores[twin], genuine[twin])
    series_roc = [("genuine vs twin impostors", far, tar)]
    series_det = [("twin impostors", np.clip(far, 1e-4, 1), np.clip(1 - tar, 1e-4, 1))]
    if (kind == OTHER).any():
        far_all, tar_all, _ = roc(scores, genuine)
        series_roc.append(("genuine vs all impostors", far_all, tar_all))
        series_det.append(("all impostors", np.clip(far_all, 1e-5, 1), np.clip(1 - tar_all, 1e-5, 1)))
    floor = 1e-5 if (kind == OTHER).any() else 1e-4
    roc_img = plots.line_chart(series_roc, f"ROC - {title}", "false accept rate", "true accept rate",
                               (0, 1), (0, 1))
    det_img = plots.line_chart(series_det, "DET", "false accept rate (log)", "false reject rate (log)",
                               (floor, 1), (floor, 1), xlog=True, ylog=True)
    edges = np.linspace(scores.min(), scores.max() + 1e-9, 41)
    centres = (edges[1:] + edges[:-1]) / 2
    hist = [(f"{name} ({int(m.sum())})", centres, np.histogram(scores[m], edges)[0] / max(m.sum(), 1))
            for name, m in (("genuine", kind == GENUINE), ("twin impostor", kind == TWIN))]
    top = max(float(h[2].max()) for h in hist) * 1.1
    hist_img = plots.line_chart(hist, "score histograms", "pair score", "share of pairs",
                                (float(edges[0]), float(edges[-1])), (0, top))
    return plots.row([roc_img, det_img, hist_img])


def flat_metrics(result, prefix):
    """metrics.json's twin-protocol figures as flat names for a tracker: test_eer, test_tar_at_far_0.01, ..."""
    out = {f"{prefix}{k}": result[k] for k in ("auc", "eer", "accuracy") if result.get(k) is not None}
    out.update({f"{prefix}tar_at_far_{f}": v for f, v in result["tar_at_far"].items() if v is not None})
    return out


def argument_problems(args):
    """One line per value out of range, all of them, before any work."""
    problems = []
    if args.bootstrap < 1:
        problems.append(f"--bootstrap {args.bootstrap}: must be at least 1 (resamples for the intervals)")
    if args.threshold is not None and not math.isfinite(args.threshold):
        problems.append(f"--threshold {args.threshold}: must be a finite number")
    if args.path_remap and "=" not in args.path_remap:
        problems.append(f"--path-remap {args.path_remap!r}: expected OLD=NEW")
    return problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="ckpt", help="a run folder (its best.pt, else last.pt) or a checkpoint file")
    ap.add_argument("--out", default="eval", help="folder for metrics.json, scores.csv, roc.png")
    ap.add_argument("--test-info", help="default: test_info from the checkpoint's config")
    ap.add_argument("--test-pairs", help="default: test_pairs from the checkpoint's config")
    ap.add_argument("--path-remap", help="OLD=NEW for image paths; default: the checkpoint's path_remap")
    ap.add_argument("--all-impostors", action="store_true", help="also every cross-person pair (FAR down to 1e-4)")
    ap.add_argument("--baseline", choices=["cls"], help="cosine of the frozen backbone's CLS features instead")
    ap.add_argument("--threshold", type=float,
                    help="decision threshold instead of the one chosen on validation (needed after `val_families: 0`)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of twin families")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tracker", action="store_true",
                    help="also log the metrics and roc.png to the training run (the checkpoint's tracker and run id)")
    args = ap.parse_args(argv)
    refuse(argument_problems(args), "arguments")
    args.ckpt = checkpoint_of_run(args.ckpt)
    ckpt = read_training_checkpoint(args.ckpt)
    data.make_folder(args.out, "--out")
    tracker = tracker_of_checkpoint(ckpt, args.ckpt) if args.tracker else None
    cfg = ckpt["config"]
    device = torch.device(args.device)
    remap = cfg["path_remap"] if args.path_remap is None else args.path_remap
    test_info = args.test_info or cfg["test_info"]
    split = data.load_split(test_info, args.test_pairs or cfg["test_pairs"], remap)
    leaks = data.shared_with_training(test_info, ckpt["class_ids"])  # the people the checkpoint trained on
    if leaks:
        raise data.DataError(leaks, f"test split in {test_info}")
    images = data.build_cache(split.paths, cfg["img_size"], cfg["cache_dir"])
    a, b, kind, fam_a, fam_b = protocol_pairs(split, args.all_impostors)
    threshold, source = args.threshold, "given by --threshold"
    if args.baseline:
        vit = load_vit(cfg["arch"], cfg["img_size"], cfg["weights_dir"] or None).to(device)
        scores, t_enc, t_score = cls_scores(vit, images, a, b, device)
        if threshold is None:
            threshold, source = cls_threshold(vit, cfg, remap, device), "its EER on the validation families"
        title = f"CLS cosine baseline ({cfg['arch']})"
    else:
        model = verifier_from_checkpoint(ckpt, args.ckpt, cfg["weights_dir"] or None).to(device)
        scores, t_enc, t_score = verifier_scores(model, images, a, b, device, default_precision(device))
        if threshold is None:
            threshold, source = ckpt.get("threshold"), ("the out-of-fold EER's of its cross-validation, saved in the "
                                                         "checkpoint" if ckpt["config"]["folds"] else
                                                         "the validation EER's, saved in the checkpoint")
        title = f"{model.method} verifier, epoch {ckpt['epoch'] + 1}"
    if threshold is None:
        source = "no validation (val_families: 0)"
    t0 = time.perf_counter()
    result = report(scores, kind, fam_a, fam_b, len(split.families), threshold, args.bootstrap)
    t_metrics = time.perf_counter() - t0
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    write_scores(os.path.join(args.out, "scores.csv"), split, a, b, kind, scores)
    figure = roc_figure(scores, kind, title)
    figure.save(os.path.join(args.out, "roc.png"))
    if tracker:
        prefix = "test_cls_" if args.baseline else "test_"
        tracker.log_metrics(flat_metrics(result, prefix), ckpt["epoch"])
        tracker.log_image(prefix + "roc", figure, ckpt["epoch"])
        tracker.finish()
    counts = ", ".join(f"{(kind == k).sum()} {KINDS[k]}" for k in range(3) if (kind == k).any())
    tars = ", ".join(f"TAR@{f}={'n/a' if v is None else f'{v:.3f}'}" for f, v in result["tar_at_far"].items())
    acc = (f"n/a ({source}: give --threshold, or train with --folds K for an out-of-fold one)" if threshold is None else
           f"{result['accuracy']:.4f} at threshold {threshold:.4f} ({source})")
    print(f"{title}: {len(images)} images, {counts} pairs\n"
          f"AUC {result['auc']:.4f} {result['intervals']['auc']}  EER {result['eer']:.4f} "
          f"{result['intervals']['eer']}  {tars}  accuracy {acc}\n"
          f"time: encoding {t_enc:.2f}s, scoring {t_score:.2f}s, metrics+bootstrap {t_metrics:.2f}s\n"
          f"wrote {args.out}/metrics.json, scores.csv, roc.png")


if __name__ == "__main__":
    sys.exit(run_cli(main))
