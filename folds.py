"""Cross-validation over the twin families (--folds K): every family validated exactly once, the epoch count and the
decision threshold chosen on all of them, then a final run on every family that keeps that threshold.

    python train.py --cfg configs/t4x2.yaml --folds 5 [--time-budget 11h30m --resume auto]
"""
import contextlib
import os

import numpy as np
import torch.distributed as dist

import data
import evaluate
from checkpoints import hold_out_dir, read_training_checkpoint, resume_in
from tracking import make_tracker


def cross_validation(cfg):
    """Whether a config asks for a whole cross-validation, not one of its runs."""
    return cfg["folds"] > 0 and cfg["fold"] < 0


def run_of(cfg, fold, **changes):
    """The config of a cross-validation's fold (fold < folds) or final run (fold == folds), in its own subfolder."""
    name = f"fold{fold}" if fold < cfg["folds"] else "final"
    return {**cfg, **changes, "fold": fold, "out_dir": os.path.join(cfg["out_dir"], name)}


def cross_validate(args, cfg, procs, train_run):
    """--folds K: K runs, each validating on one fold of the twin families (out_dir/fold0 ...); their pooled
    out-of-fold scores choose the epoch count and the threshold (out_dir/folds.json); then the final run on every
    family for that many epochs, its checkpoint carrying that threshold (out_dir/final). Each is a run like any
    other (train.py's train_run): a session that ends mid-way is continued by the same line with --resume auto."""
    summary_path = os.path.join(cfg["out_dir"], "folds.json")
    saved = data.read_json(summary_path, "cross-validation summary") if os.path.isfile(summary_path) else {}
    name = cfg["run_name"] or os.path.basename(os.path.abspath(cfg["out_dir"]))
    parent = make_tracker({**cfg, "run_name": f"{name} cross-validation"}, saved.get("tracker_run_id"), procs.rank,
                          group=os.path.abspath(cfg["out_dir"]))
    if procs.master and not saved:
        parent.log_params(cfg)
        data.write_json({"tracker_run_id": parent.run_id}, summary_path)
    for fold in range(cfg["folds"]):
        fold_cfg = run_of(cfg, fold)
        with hold_out_dir(fold_cfg["out_dir"]) if procs.master else contextlib.nullcontext():
            if train_run(args, fold_cfg, resume_in(fold_cfg, args.resume, procs.log), procs, parent=parent):
                return  # stopped by the time budget: the same line with --resume auto continues
    # a resumed final run reuses the summary of the same epochs; folds trained longer (--epochs) are pooled anew
    chosen = [saved if len(saved.get("pooled_per_epoch", ())) == cfg["epochs"] else None]
    if chosen[0] is not None:
        procs.log(f"{summary_path}: the folds chose {saved['epochs']} epochs and the threshold "
                  f"{saved['threshold']:+.4f}")
    elif procs.master:
        chosen = [summary([run_of(cfg, fold) for fold in range(cfg["folds"])], parent, procs.log)]
        data.write_json({"tracker_run_id": parent.run_id, **chosen[0]}, summary_path)
    if procs.ddp:
        dist.broadcast_object_list(chosen, 0)
    final = run_of(cfg, cfg["folds"], epochs=chosen[0]["epochs"])
    with hold_out_dir(final["out_dir"]) if procs.master else contextlib.nullcontext():
        train_run(args, final, resume_in(final, args.resume, procs.log), procs, parent=parent,
                  threshold=chosen[0]["threshold"])
    parent.finish()


def summary(fold_cfgs, tracker, log):
    """Per epoch, the EER of every fold's validation scores pooled (each family validated once), with its interval;
    the epoch count where it is lowest (the earliest of ties), and the EER threshold of that epoch's pooled scores."""
    cfg = fold_cfgs[0]
    split = data.load_split(cfg["train_info"], cfg["train_pairs"], cfg["path_remap"])
    scores, genuine, fam_a, fam_b, per_fold = [], [], [], [], []
    for fold, fold_cfg in enumerate(fold_cfgs):
        ckpt = read_training_checkpoint(os.path.join(fold_cfg["out_dir"], "last.pt"))
        _, val = data.validation_split(split, fold_cfg)
        _, _, kind, a, b = evaluate.protocol_pairs(val)
        offset = sum(p["families"] for p in per_fold)  # family indices made unique across the folds
        scores.append(np.stack([s.numpy() for s in ckpt["val_scores"]]))  # (epochs, pairs)
        genuine.append(kind == evaluate.GENUINE)
        fam_a.append(a + offset)
        fam_b.append(b + offset)
        per_fold.append({"fold": fold, "families": len(val.families), "best_epoch": ckpt["best_epoch"] + 1,
                         "best_eer": ckpt["best_eer"]})
    epochs = min(len(s) for s in scores)  # each fold has trained them all
    pooled = np.concatenate([s[:epochs] for s in scores], axis=1)
    n_families = sum(p["families"] for p in per_fold)
    pairs = (np.concatenate(genuine), np.concatenate(fam_a), np.concatenate(fam_b), n_families)
    # each epoch's interval from 200 family draws, the chosen epoch's from the 1,000 of evaluate.py's
    per_epoch = [evaluate.eer_and_threshold(epoch_scores, *pairs, n_boot=200) for epoch_scores in pooled]
    best = int(np.argmin([p["eer"] for p in per_epoch]))
    for epoch, p in enumerate(per_epoch):
        interval = dict(zip(("oof_eer_low", "oof_eer_high"), p["eer_interval"] or ()))
        tracker.log_metrics({"oof_eer": p["eer"], **interval}, epoch)
    for p, fold_scores, fold_genuine in zip(per_fold, scores, genuine):
        p["eer_at_chosen_epoch"] = evaluate.eer(*evaluate.roc(fold_scores[best], fold_genuine)[:2])
    chosen = {"folds": cfg["folds"], "per_fold": per_fold, "pooled_per_epoch": per_epoch, "epochs": best + 1,
              **evaluate.eer_and_threshold(pooled[best], *pairs)}
    tracker.log_metrics({"chosen_epochs": best + 1, "oof_threshold": chosen["threshold"]}, best)
    log(f"cross-validation, {cfg['folds']} folds, {pooled.shape[1]:,} out-of-fold pairs:\n"
        + "".join(f"  fold {p['fold'] + 1}: {p['families']} families, EER {p['eer_at_chosen_epoch']:.4f} at epoch "
                  f"{best + 1} (its own best {p['best_eer']:.4f} at epoch {p['best_epoch']})\n" for p in per_fold)
        + f"  pooled: EER {chosen['eer']:.4f} {fmt_interval(chosen['eer_interval'])} at epoch {best + 1}, "
          f"threshold {chosen['threshold']:+.4f} {fmt_interval(chosen['threshold_interval'])}\n"
          f"the final run trains on every family for {best + 1} epochs and keeps that threshold")
    return chosen


def fmt_interval(bounds):
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]" if bounds else "[n/a]"
