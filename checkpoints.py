"""Checkpoints in one place: saving atomically, reading with an integrity check, finding the run a `--resume`
means, matching its config, and the lock that keeps two runs out of one out_dir.

A run's out_dir holds last.pt (every epoch), previous.pt (the epoch before), best.pt (the best validation epoch) and,
for arcface, backbone.pth (its trained backbone in the official layout).
"""
import contextlib
import fcntl
import glob
import hashlib
import os
import socket
import time
from dataclasses import dataclass

import torch

from config import DEFAULTS, MODEL_KEYS, RESUMABLE, load_config, read_config_files, trained_config
from errors import UserError
from model import build_verifier

CHECKPOINTS = ("last.pt", "previous.pt")  # what a run leaves to resume from: this epoch's and the one before


def save_atomically(obj, path, keep_previous=None):
    """torch.save to a temporary file, fsync, then rename: a failed save (a full disk) leaves the previous
    file intact and no temporary behind. keep_previous: where the file it replaces goes, renamed, not copied. The
    temporary is per process: a training run and an evaluation may build the same cache at once."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and os.path.exists(path):
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        kept = f"; the previous {os.path.basename(path)} is intact" if os.path.exists(path) else ""
        raise UserError(f"could not save {path} ({type(e).__name__}: {e}){kept}") from None


def save_training_state(state, out_dir, best):
    """last.pt (the one it replaces kept as previous.pt) and, when this epoch is the best, best.pt; with a checksum of
    the contents, so a file damaged later is refused, not trained on."""
    state = {**state, "checksum": content_digest(state)}
    save_atomically(state, os.path.join(out_dir, "last.pt"), keep_previous=os.path.join(out_dir, "previous.pt"))
    if best:
        save_atomically(state, os.path.join(out_dir, "best.pt"))


# How a file that is not a checkpoint starts, so a mistaken --resume or --ckpt says what it was given.
FILE_KINDS = {b"\xff\xd8": "a JPEG image", b"\x89PNG": "a PNG image", b"{": "a JSON file", b"[": "a JSON file",
              b"#": "a text file"}


def content_digest(obj):
    """sha256 of a checkpoint's contents: every tensor's dtype, shape and bytes and every other value, dicts in key
    order. A file damaged inside a tensor still loads; its digest no longer matches the one saved with it."""
    digest = hashlib.sha256()

    def feed(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            digest.update(f"tensor {t.dtype} {tuple(x.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            digest.update(b"{")
            for key in sorted(x, key=repr):
                feed(key)
                feed(x[key])
            digest.update(b"}")
        elif isinstance(x, (list, tuple)):
            digest.update(b"[")
            for value in x:
                feed(value)
            digest.update(b"]")
        else:
            digest.update(repr(x).encode())
    feed(obj)
    return digest.hexdigest()


def read_training_checkpoint(path):
    """A checkpoint train.py wrote, or a UserError that names the file and what is wrong."""
    if os.path.isdir(path):
        raise UserError(f"{path}: a folder, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if not head:
            raise UserError(f"{path}: an empty file, not a checkpoint (a save that never finished?)")
        if not head.startswith(b"PK"):  # torch.save writes a zip archive
            kind = next((k for magic, k in FILE_KINDS.items() if head.startswith(magic)), "not a PyTorch file")
            raise UserError(f"{path}: not a checkpoint ({kind})")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not {"config", "model", "model_args"} <= set(ckpt):
        raise UserError(f"{path}: not a training checkpoint of this project (no model in it)")
    checksum = ckpt.pop("checksum", None)  # files written before checksums were kept have none to check
    if checksum is not None and content_digest(ckpt) != checksum:
        raise UserError(f"{path}: damaged: its contents no longer match the checksum saved with them")
    ckpt["config"] = trained_config(ckpt["config"])  # complete, as written today, for a file from an older version
    ckpt["model_args"] = {**{k: ckpt["config"][k] for k in MODEL_KEYS}, **ckpt["model_args"]}
    return ckpt


def checkpoint_of_run(path):
    """A checkpoint file, or a run folder's best.pt (else its last.pt), saying which was taken."""
    if not os.path.isdir(path):
        return path
    for name in ("best.pt", "last.pt"):
        if os.path.isfile(os.path.join(path, name)):
            print(f"using {os.path.join(path, name)}", flush=True)
            return os.path.join(path, name)
    raise UserError(f"{path}: a folder with neither best.pt nor last.pt in it (train.py writes them to its out_dir)")


def verifier_from_checkpoint(ckpt, source, weights_dir=None):
    """Rebuild the verifier a training checkpoint describes (backbone from `arch`, then its trainable weights),
    or a UserError that names the checkpoint and what does not match."""
    diverged = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not v.isfinite().all()]
    if diverged:
        raise UserError(f"{source}: weights that are not finite ({', '.join(diverged[:3])}"
                        f"{', ...' if len(diverged) > 3 else ''}): the run that wrote it diverged; train again with a "
                        f"lower lr")
    model = build_verifier(**ckpt["model_args"], weights_dir=weights_dir)
    if model.vit.fingerprint != ckpt["backbone_fingerprint"]:
        raise UserError(f"{source}: was trained on other backbone weights than {ckpt['model_args']['arch']} "
                        f"holds now (that file was replaced after training)")
    model.load_trainable_state(ckpt["model"], source)
    return model


@dataclass
class Resume:
    path: str
    ckpt: dict


def config_changes(cfg, trained, keys):
    return [f"{k}: {trained[k]!r} in the checkpoint, {cfg[k]!r} now" for k in keys
            if k not in RESUMABLE and cfg[k] != trained[k]]


def find_this_run(cfg, user_keys, log):
    """--resume auto: the checkpoint with the highest epoch under out_dir and resume_dirs whose config agrees with
    every key the user set: a run's own files, or a previous session's saved output mounted where resume_dirs says."""
    roots = [cfg["out_dir"]] + [d for d in cfg["resume_dirs"].split(os.pathsep) if d]
    found, skipped = [], []
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in CHECKPOINTS:
                path = os.path.join(folder, name)
                if name not in files:
                    continue
                try:
                    ckpt = read_training_checkpoint(path)
                except UserError as e:
                    log(f"--resume auto: skipping {e}")
                    if name == "last.pt" and os.path.abspath(folder) == os.path.abspath(cfg["out_dir"]):
                        set_aside(path, log)
                    continue
                if config_changes(cfg, ckpt["config"], user_keys):
                    skipped.append(path)
                else:
                    found.append((ckpt["epoch"], os.path.getmtime(path), path, ckpt))
    if skipped:
        log(f"--resume auto: {len(skipped)} checkpoint(s) of other runs left alone ({', '.join(skipped[:3])})")
    if not found:
        log(f"--resume auto: no checkpoint of this run in {', '.join(roots)}; starting fresh")
        return None
    _, _, path, ckpt = max(found, key=lambda f: f[:2])
    return Resume(path, ckpt)


def named_checkpoint(arg, log):
    """--resume FILE, or a run folder's last.pt; where last.pt is missing or damaged, the previous.pt beside it (the
    epoch before), saying so."""
    path = os.path.join(arg, "last.pt") if os.path.isdir(arg) else arg
    previous = os.path.join(os.path.dirname(path), "previous.pt")
    try:
        if os.path.isdir(arg) and not os.path.exists(path):
            raise UserError(f"--resume {arg}: a folder with no last.pt in it")
        return Resume(path, read_training_checkpoint(path))
    except UserError as e:
        if os.path.basename(path) != "last.pt" or not os.path.isfile(previous):
            raise
        log(f"--resume: {e}; resuming from {previous}, the epoch before")
        resume = Resume(previous, read_training_checkpoint(previous))
        set_aside(path, log)
        return resume


def set_aside(path, log):
    """A damaged last.pt renamed out of the way (rank 0), so that the next save does not keep it as previous.pt in
    place of the good checkpoint the run continues from."""
    if os.path.isfile(path) and os.environ.get("RANK", "0") == "0":
        os.replace(path, path + ".damaged")
        log(f"--resume: the damaged file is kept as {path}.damaged")


def resume_from(arg, cfg_paths, overrides, log):
    """The checkpoint --resume names (a file, a run folder's last.pt, or auto) and the config to resume it with."""
    if arg == "auto":
        from_files = read_config_files(cfg_paths)
        cfg = load_config([], overrides, base={**DEFAULTS, **from_files})
        resume = find_this_run(cfg, set(from_files) | set(overrides), log)
        if resume is None:
            return None, cfg
    else:
        resume = named_checkpoint(arg, log)
    cfg = load_config(cfg_paths, overrides, base=resume.ckpt["config"])
    refuse_another_config(resume, cfg)
    return resume, cfg


def refuse_another_config(resume, cfg):
    """A checkpoint continues only with the config it trained with, RESUMABLE keys aside."""
    changed = config_changes(cfg, resume.ckpt["config"], DEFAULTS)
    if changed:
        raise UserError(f"{resume.path} was trained with another config; resume with the same one or start a new "
                        f"out_dir:\n  " + "\n  ".join(changed))


def resume_in(cfg, resuming, log):
    """The checkpoint a run of a cross-validation continues from, in its own out_dir: None where it has not started;
    where it has, its last.pt (with the same config) when resuming, else a refusal to overwrite it."""
    if not any(os.path.exists(os.path.join(cfg["out_dir"], name)) for name in CHECKPOINTS):
        return None
    if not resuming:
        refuse_to_overwrite(cfg["out_dir"])
    resume = named_checkpoint(cfg["out_dir"], log)
    refuse_another_config(resume, cfg)
    return resume


def hold_out_dir(out_dir):
    """One run at a time writes into out_dir: an exclusive lock on out_dir/.lock, which the system drops when the
    process ends, however it ends. What a killed save left behind (*.tmp) is removed. Returns the open lock file."""
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise UserError(f"{out_dir} is being written by another run ({lock.read().strip() or 'a process'}); wait "
                        f"for it to end, or give this one another --out_dir") from None
    lock.truncate(0)
    lock.write(f"process {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
    lock.flush()
    for stale in glob.glob(os.path.join(glob.escape(out_dir), "*.tmp")):
        os.remove(stale)
    return lock


def refuse_to_overwrite(out_dir):
    """A fresh run never overwrites another run's checkpoints."""
    for name in CHECKPOINTS:
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            raise UserError(f"{path} holds a run already; continue it with `python train.py --resume {path}` "
                            f"(or `--resume auto`), or start this one elsewhere with `--out_dir OTHER`")
