"""Train a twin verifier (method traits, promptcam or arcface) in one process or under torchrun's DDP.

    torchrun --nproc_per_node 2 train.py --cfg configs/t4x2.yaml   # or python train.py --cfg FILE [--cfg FILE ...]
    python train.py --resume ckpt/last.pt        # with any number of processes; --resume auto: this run's newest
    python train.py --cfg FILE --check           # or --benchmark [STEPS]: will it fit, how fast, before a long run
Any config key can be overridden as `--key value`. Each epoch writes out_dir/last.pt, and best.pt when it improves.
"""
import argparse
import fcntl
import gc
import glob
import inspect
import math
import os
import re
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

import cam
import data
import evaluate
from errors import UserError, refuse, run_cli
from model import (ARCH_SHAPES, METHOD_BEFORE_THE_KEY, METHODS, build_verifier, content_digest,
                   official_backbone_state, read_training_checkpoint)
from progress import Progress, format_seconds
from tracking import make_tracker

DEFAULTS = {
    # data: the user's info files; path_remap 'OLD=NEW' rewrites paths made on another machine
    "train_info": "", "train_pairs": "", "test_info": "", "test_pairs": "", "path_remap": "",
    "cache_dir": "cache", "cache_device": "auto",  # auto: on the GPU when it takes under a quarter of it
    # model: traits, promptcam or arcface, the conventional yardstick (no prompts, no maps)
    "method": "traits", "arch": "dinov2_vits14", "weights_dir": "", "img_size": 224, "deep_prompts": 4,
    "train_blocks": 0, "margin": 0.3, "scale": 30.0,  # the margin loss's angle and logit scale (traits, arcface)
    "trait_prompts": 64,  # method traits: prompts tiling the face (a square number); 8 x 8 cells: 3 x 3 patches at 336
    # optimisation
    "epochs": 30, "batch_size": 64, "images_per_person": 4, "lr": 2e-3, "weight_decay": 0.05,
    "warmup_epochs": 1, "loss_class": 1.0, "loss_episodic": 1.0, "loss_pull": 0.1, "hflip": False,
    "val_families": 12, "full": False, "seed": 0, "precision": "auto", "compile": "auto",
    # output and tracking; resume_dirs: where `--resume auto` also looks (os.pathsep between folders)
    "out_dir": "ckpt", "resume_dirs": "", "tracker": "none", "run_name": "", "mlflow_uri": "",
    "mlflow_experiment": "", "wandb_project": "twin-verification", "wandb_entity": "",
    "log_images_every": 5,  # epochs between the validation ROC and explanation figures sent to the tracker; 0: never
    "gpu": "",  # the GPU a config is meant for: --check and bench.py memory compare the run's memory with it
}
# The GPUs of the shipped configs: memory as torch reports it (GiB), and the precision `auto` picks on them (bf16 from
# sm_80 on, else fp16 with a gradient scaler).
GPUS = {"t4": (14.6, "fp16"), "p100": (15.9, "fp16"), "2080ti": (10.7, "fp16"), "a100": (39.4, "bf16"),
        "h100": (79.1, "bf16")}
CHOICES = {"method": METHODS, "cache_device": ("auto", "cuda", "cpu"), "precision": ("auto", "fp32", "fp16", "bf16"),
           "compile": ("auto", "true", "false"), "tracker": ("none", "mlflow", "wandb"), "gpu": ("", *GPUS)}
# What a resumed run may change: where things are and how they are tracked, never what is trained.
RESUMABLE = {"epochs", "out_dir", "resume_dirs", "cache_dir", "cache_device", "path_remap", "weights_dir", "compile",
             "tracker", "run_name", "mlflow_uri", "mlflow_experiment", "wandb_project", "wandb_entity",
             "log_images_every", "train_info", "train_pairs", "test_info", "test_pairs", "gpu"}
CHECKPOINTS = ("last.pt", "previous.pt")  # what a run leaves to resume from: this epoch's and the one before


# ---------------------------------------------------------------- configuration

def coerce(key, value, source):
    """A config value of the default's type (YAML or command-line text), or a clear error."""
    if key not in DEFAULTS:
        raise UserError(f"{source}: unknown config key {key!r}; known keys: {', '.join(sorted(DEFAULTS))}")
    default = DEFAULTS[key]
    if key == "compile" and isinstance(value, bool):  # YAML reads `compile: false` as a bool
        value = str(value).lower()
    try:
        if key == "batch_size" and value == "auto":
            pass
        elif isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            elif not isinstance(value, bool):
                raise ValueError
        elif isinstance(default, (int, float)):
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if isinstance(default, int) and not number.is_integer():
                raise ValueError
            value = int(number) if isinstance(default, int) else number
        elif not isinstance(value, str):
            raise ValueError
    except (ValueError, TypeError, OverflowError):
        raise UserError(f"{source}: config key {key!r} needs a {type(default).__name__}"
                        f"{' or auto' if key == 'batch_size' else ''}, got {value!r}") from None
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"{source}: config key {key!r} must be one of {CHOICES[key]}, got {value!r}")
    return value


def parse_overrides(items):
    """['--lr', '1e-3', '--img-size=336'] -> {'lr': '1e-3', 'img_size': '336'}."""
    out, i = {}, 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise UserError(f"command line: expected --key value, got {item!r}")
        if "=" in item:
            key, value = item[2:].split("=", 1)
        elif i + 1 < len(items):
            key, value = item[2:], items[i + 1]
            i += 1
        else:
            raise UserError(f"command line: {item} needs a value")
        out[key.replace("-", "_")] = value
        i += 1
    return out


def read_config_files(cfg_paths):
    """The keys of each YAML file in turn, later files winning, each value coerced."""
    out = {}
    for cfg_path in cfg_paths or []:
        try:
            with open(cfg_path) as f:
                from_file = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise UserError(f"{cfg_path}: config file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{cfg_path}: cannot read the config file ({e})") from None
        except yaml.YAMLError as e:
            raise UserError(f"{cfg_path}: not valid YAML ({e})") from None
        if not isinstance(from_file, dict):
            raise UserError(f"{cfg_path}: expected a mapping of config keys")
        out.update({k: coerce(k, v, cfg_path) for k, v in from_file.items()})
    return out


def load_config(cfg_paths, overrides, base=None):
    """Defaults (or a checkpoint's config), then each YAML file in turn, then command-line overrides."""
    return {**(base or DEFAULTS), **read_config_files(cfg_paths),
            **{k: coerce(k, v, "command line") for k, v in overrides.items()}}


def config_problems(cfg):
    """One line per config value out of range (all of them), before any image is read."""
    finite = lambda k: math.isfinite(cfg[k])  # noqa: E731
    K, patch = cfg["images_per_person"], ARCH_SHAPES.get(cfg["arch"], {}).get("patch_size")
    checks = [("epochs", cfg["epochs"] >= 1, "must be at least 1"),
              ("images_per_person", K >= (2 if cfg["method"] == "promptcam" else 1),
               "must be at least 1 (2 with method promptcam, whose episodic loss needs a same-person pair)"),
              ("batch_size", cfg["batch_size"] == "auto" or cfg["batch_size"] >= 4 * max(K, 1),
               f"must hold two twin families of images_per_person images each (at least {4 * max(K, 1)}), or auto"),
              ("lr", finite("lr") and cfg["lr"] > 0, "must be a finite number above 0"),
              ("weight_decay", finite("weight_decay") and cfg["weight_decay"] >= 0, "must be finite and at least 0"),
              ("warmup_epochs", cfg["warmup_epochs"] >= 0, "must be at least 0"),
              ("margin", finite("margin") and 0 <= cfg["margin"] < math.pi / 2, "must lie in [0, pi/2)"),
              ("scale", finite("scale") and cfg["scale"] > 0, "must be a finite number above 0"),
              ("img_size", cfg["img_size"] >= (patch or 1) and cfg["img_size"] % (patch or 1) == 0,
               f"must be a positive multiple of {cfg['arch']}'s patch size {patch}"),
              ("deep_prompts", cfg["deep_prompts"] >= 0, "must be at least 0"),
              ("train_blocks", cfg["train_blocks"] >= 0, "must be at least 0"),
              ("val_families", cfg["val_families"] >= 0, "must be at least 0"),
              ("seed", cfg["seed"] >= 0, "must be at least 0"),
              ("log_images_every", cfg["log_images_every"] >= 0, "must be at least 0 (0: never)"),
              ("path_remap", not cfg["path_remap"] or "=" in cfg["path_remap"], "must read OLD=NEW"),
              ("arch", cfg["arch"] in ARCH_SHAPES or cfg["arch"].startswith(("http://", "https://"))
               or os.path.isfile(cfg["arch"]), f"is neither a backbone by name ({', '.join(ARCH_SHAPES)}), "
                                                "a URL, nor a checkpoint file that exists")]
    checks += [(k, finite(k) and cfg[k] >= 0, "must be finite and at least 0")
               for k in ("loss_class", "loss_episodic", "loss_pull")]
    if cfg["method"] == "traits":
        g = math.isqrt(max(cfg["trait_prompts"], 0))
        grid = cfg["img_size"] // patch if patch else None
        checks.append(("trait_prompts", cfg["trait_prompts"] >= 1 and g * g == cfg["trait_prompts"]
                       and (grid is None or g <= grid),
                       "must be a square number g x g with g at most the patch grid's side"
                       + (f" ({grid} at img_size {cfg['img_size']})" if grid else "")))
    problems = [f"{key}: {cfg[key]!r} {why}" for key, ok, why in checks if not ok]
    problems += [f"{key} is empty: point it at your info files (see README)" for key in ("train_info", "train_pairs")
                 if not cfg[key]]
    return problems


def parse_duration(text):
    """'11h30m', '90m', '45s', '2h' -> seconds."""
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text.strip())
    if not text.strip() or not m:
        raise UserError(f"--time-budget: cannot read {text!r}; write it like 11h30m, 90m or 45s")
    h, mi, s = (float(x or 0) for x in m.groups())
    return h * 3600 + mi * 60 + s


@dataclass
class Resume:
    path: str
    ckpt: dict


def trained_config(ckpt):
    """The config a checkpoint trained with; a key added since has its default, which is what it did, except method."""
    return {**DEFAULTS, "method": METHOD_BEFORE_THE_KEY, **ckpt["config"]}


def config_changes(cfg, trained, keys):
    return [f"{k}: {trained.get(k)!r} in the checkpoint, {cfg[k]!r} now" for k in keys
            if k not in RESUMABLE and cfg[k] != trained.get(k)]


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
                if config_changes(cfg, trained_config(ckpt), user_keys):
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
    trained = trained_config(resume.ckpt)
    cfg = load_config(cfg_paths, overrides, base=trained)
    changed = config_changes(cfg, trained, DEFAULTS)
    if changed:
        raise UserError(f"{resume.path} was trained with another config; resume with the same one or start a new "
                        f"out_dir:\n  " + "\n  ".join(changed))
    return resume, cfg


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


def configure(argv):
    """Command line and YAML, range-checked; the checkpoint to resume, if any; the places the run will write."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="config keys (--key value): " + ", ".join(sorted(DEFAULTS)))
    ap.add_argument("--cfg", action="append", help="YAML file of config keys; repeat it to layer files (later win)")
    ap.add_argument("--resume", help="a checkpoint or run folder, or 'auto' for this run's newest checkpoint in "
                                     "out_dir and resume_dirs")
    ap.add_argument("--time-budget", help="stop cleanly before the next epoch would pass it, e.g. 11h30m")
    ap.add_argument("--benchmark", nargs="?", const=20, type=int, metavar="STEPS",
                    help="time STEPS training steps (default 20) instead of training")
    ap.add_argument("--check", action="store_true",
                    help="preflight: config, data, weights and model as training has them, a few steps at the config's "
                         "batch size; prints speed, memory and the run's wall time; writes no checkpoint")
    args, rest = ap.parse_known_args(argv)
    if args.benchmark is not None and args.benchmark < 1:
        raise UserError(f"--benchmark {args.benchmark}: time at least one step")
    args.budget = parse_duration(args.time_budget) if args.time_budget else None
    overrides = parse_overrides(rest)
    log = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    resume, cfg = resume_from(args.resume, args.cfg, overrides, log) if args.resume else \
        (None, load_config(args.cfg, overrides))
    problems = config_problems(cfg) + [p for key in ("out_dir", "cache_dir")
                                       for p in [data.unwritable(cfg[key], key)] if p]
    refuse(problems, "config")
    if not (args.benchmark or args.check) and os.environ.get("RANK", "0") == "0":
        args.lock = hold_out_dir(cfg["out_dir"])
        if resume is None:
            refuse_to_overwrite(cfg["out_dir"])
    return args, cfg, resume


# ---------------------------------------------------------------- processes and data

@dataclass
class Processes:
    """This process's place in the run: rank, world size, device and precision."""
    rank: int
    world: int
    device: torch.device
    precision: str

    @property
    def ddp(self):
        return dist.is_initialized()

    @property
    def master(self):
        return self.rank == 0

    def log(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)


# How long a process waits for the others at a collective. NCCL's default, 10 minutes, is shorter than what rank 0
# does alone while the others wait: decoding 6,182 images into the cache, downloading the weights, validating.
PROCESS_GROUP_TIMEOUT = timedelta(hours=1)


def start_processes(cfg):
    """torchrun's processes (it sets RANK) or one; each on its GPU, or the CPU; the precision it trains in."""
    # batches come in two sizes (those holding the triplet family are larger): segments that grow in place leave
    # the allocator less stranded memory than fixed blocks (read when CUDA first allocates, so set before that)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    n_gpus = torch.cuda.device_count()
    if "RANK" in os.environ:
        # NCCL needs a GPU per process; more processes than GPUs (a DDP check on one GPU) share them over gloo
        local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
        dist.init_process_group("nccl" if n_gpus >= local_world else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{local_rank % n_gpus}" if n_gpus else "cpu")
    else:
        rank, world, device = 0, 1, torch.device("cuda:0" if n_gpus else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        check_gpu_support(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # fp16 (T4, 2080 Ti, P100) trains with a gradient scaler; bf16 and fp32 need none
    precision = evaluate.default_precision(device) if cfg["precision"] == "auto" else cfg["precision"]
    return Processes(rank, world, device, precision)


@dataclass
class TrainSet:
    """The training families and the held-out validation families, with their uint8 images."""
    split: data.Split
    images: torch.Tensor
    labels: torch.Tensor
    val_split: data.Split = None
    val_images: torch.Tensor = None


def load_train_set(cfg, procs, resume):
    """Info files checked, validation families held out, images decoded once by rank 0 into the cache and placed
    on the GPU (or in pinned RAM when they would take over a quarter of it)."""
    split = data.load_split(cfg["train_info"], cfg["train_pairs"], cfg["path_remap"])
    if cfg["test_info"] and os.path.isfile(cfg["test_info"]):  # the test split may live elsewhere until evaluation
        train_info = data.read_json(cfg["train_info"], "info")
        leaks = data.shared_with_training(cfg["test_info"], train_info, [p for ps in train_info.values() for p in ps])
        if leaks:
            raise data.DataError(leaks, f"test split in {cfg['test_info']}")
    train_split, val_split = data.hold_out_families(split, 0 if cfg["full"] else cfg["val_families"], cfg["seed"])
    if resume and resume.ckpt["class_ids"] != train_split.ids:
        raise UserError(f"{resume.path}: the training identities in {cfg['train_info']} differ from the checkpoint's")
    all_images = rank0_first(lambda: data.build_cache(split.paths, cfg["img_size"], cfg["cache_dir"], procs.master),
                             "reading or building the image cache")
    index = {p: i for i, p in enumerate(split.paths)}
    images = all_images[[index[p] for p in train_split.paths]]
    val_images = all_images[[index[p] for p in val_split.paths]] if val_split else None
    device = procs.device
    if device.type == "cuda":
        fits = images.nbytes < 0.25 * torch.cuda.get_device_properties(device).total_memory
        on_gpu = cfg["cache_device"] == "cuda" or (cfg["cache_device"] == "auto" and fits)
        images = images.to(device) if on_gpu else images.pin_memory()
    return TrainSet(train_split, images, train_split.person.to(device), val_split, val_images)


def rank0_first(make, what):
    """make() on rank 0, then on the others: one process downloads or decodes, the rest read its result. A user
    error on rank 0 ends every rank, not only rank 0 (the others would wait for it)."""
    if not dist.is_initialized():
        return make()
    failure = [None]
    if dist.get_rank() == 0:
        print(f"{what} on rank 0; the other {dist.get_world_size() - 1} process(es) wait for it "
              f"(up to {PROCESS_GROUP_TIMEOUT.total_seconds() / 3600:.0f} h)", flush=True)
        try:
            result = make()
        except UserError as e:
            failure = [str(e)]
    dist.broadcast_object_list(failure, 0)
    if failure[0] is not None:
        raise UserError(failure[0])
    if dist.get_rank() != 0:
        result = make()
    dist.barrier()
    return result


# ---------------------------------------------------------------- hardware

def check_gpu_support(device):
    """Stop early when the installed torch has no kernels for this GPU (e.g. a P100 with a recent build)."""
    major, minor = torch.cuda.get_device_capability(device)
    archs = torch.cuda.get_arch_list()
    ok = any(a.startswith("sm_") and int(a[3:].rstrip("a")) // 10 == major and int(a[3:].rstrip("a")) % 10 <= minor
             for a in archs) or any(a.startswith("compute_") and int(a[8:].rstrip("a")) <= major * 10 + minor
                                    for a in archs)
    if not ok:
        raise SystemExit(
            f"this torch {torch.__version__} (CUDA {torch.version.cuda}) has kernels for {' '.join(archs)}, but "
            f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}. Install a build that includes it: for a "
            f"P100 (sm_60), PyTorch's CUDA 12.6 builds (the cu128 and later ones have no sm_60): "
            f"pip install torch --index-url https://download.pytorch.org/whl/cu126")


# torch.compile pays back when the step time it saves over the run exceeds the time compiling takes. Measured on
# an H100 (sm_90): compiled ViT-B/14 steps ran 1.8x faster (986 vs 541 images/s), and the demo config's graphs took
# 73 s to compile; Kaggle's 2-4-core hosts compile more slowly, hence 180 s. Below sm_80 nothing was measured: a T4's
# or a 2080 Ti's step is mostly cuBLAS and memory-efficient attention, and a Kaggle session starts with an empty
# compile cache, so `auto` leaves those uncompiled (a P100, sm_60, has no Triton at all).
COMPILE_SPEEDUP, COMPILE_SECONDS, COMPILE_MEASURED_FROM = 1.8, 180.0, (8, 0)


def compile_pays(step_seconds, steps_left):
    """Whether compiling saves more time over the steps left than it costs."""
    return steps_left * step_seconds * (1 - 1 / COMPILE_SPEEDUP) > COMPILE_SECONDS


def resolve_compile(cfg, device, time_step, steps_left, log):
    """compile true/false as set; auto: on a GPU of the generations where the speed-up was measured (sm_80 on), when
    compile_pays for the steps this run has left, from an uncompiled step timed now."""
    if cfg["compile"] != "auto" or device.type != "cuda":
        return cfg["compile"] == "true"
    capability = torch.cuda.get_device_capability(device)
    if capability < COMPILE_MEASURED_FROM:
        log(f"compile auto: off on sm_{capability[0]}{capability[1]}: no measurement shows it pays below "
            f"sm_{COMPILE_MEASURED_FROM[0]}{COMPILE_MEASURED_FROM[1]} (compile: true turns it on)")
        return False
    seconds = time_step()
    pays = compile_pays(seconds, steps_left)
    log(f"compile auto: an uncompiled step takes {1000 * seconds:.0f} ms and {steps_left} steps are left, so "
        f"compiling ({COMPILE_SECONDS:.0f} s, {COMPILE_SPEEDUP}x faster steps) {'pays' if pays else 'does not pay'}")
    return pays


def peak_memory_gb(device):
    """Peak GPU memory allocated, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20



# ---------------------------------------------------------------- the run

@dataclass
class Run:
    """What lives for the whole run: the model and its optimisation, where the run stands, and its outputs."""
    cfg: dict
    procs: Processes
    train_set: TrainSet
    raw: torch.nn.Module  # the verifier itself; `model` is what trains it (DDP and compile wrap it)
    model_args: dict
    batches: data.FamilyBatches
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    augment_rng: torch.Generator
    model: torch.nn.Module = None
    tracker: object = None
    first_epoch: int = 0
    step: int = 0
    best_eer: float = math.inf
    best_epoch: int = None
    threshold: float = None
    tracker_run_id: str = None
    started: float = field(default_factory=time.perf_counter)
    epoch_times: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    stopped_early: bool = False
    compiled: bool = False
    epoch_started: float = 0.0


def make_optimizer(raw, cfg, fused):
    """AdamW, with weight decay on weight matrices only: not on prompts, norms or biases. fused (the GPU's): one kernel
    for every parameter, and under a gradient scaler it skips a step with an inf gradient without reading it back."""
    named = [(n, p) for n, p in raw.named_parameters() if p.requires_grad]
    decays = {n: p.ndim >= 2 and "prompts" not in n for n, p in named}
    return torch.optim.AdamW([{"params": [p for n, p in named if decays[n]], "weight_decay": cfg["weight_decay"]},
                              {"params": [p for n, p in named if not decays[n]], "weight_decay": 0.0}],
                             lr=cfg["lr"], fused=fused)


def lr_factor(step, steps_per_epoch, warmup_epochs, epochs):
    """Linear warm-up over warmup_epochs, then a cosine to 0 at the last step."""
    warmup, total = warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
    return min(1.0, (step + 1) / max(warmup, 1)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, step - warmup) / max(total - warmup, 1))))


def start_run(cfg, train_set, procs, resume):
    """The model, its optimiser, schedule and gradient scaler, restored from the checkpoint when resuming, then
    wrapped for DDP and compiled where that pays."""
    torch.manual_seed(cfg["seed"])
    model_args = {k: cfg[k] for k in ("method", "arch", "img_size", "deep_prompts", "train_blocks", "margin", "scale",
                                      "trait_prompts")}
    model_args["num_classes"] = len(train_set.split.ids)
    raw = rank0_first(lambda: build_verifier(**model_args, weights_dir=cfg["weights_dir"] or None),
                      "loading the backbone's weights (downloaded on the first run)").to(procs.device)
    procs.log(raw.summary())
    K, batch_size = cfg["images_per_person"], cfg["batch_size"]
    if batch_size == "auto":
        batch_size = largest_batch(raw, train_set.images, train_set.labels, K, procs.device, procs.precision,
                                   procs.log)
    batches = data.FamilyBatches(train_set.split, K, max(1, batch_size // (2 * K)), cfg["seed"], procs.rank,
                                 procs.world)
    optimizer = make_optimizer(raw, cfg, fused=procs.device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, len(batches), cfg["warmup_epochs"], cfg["epochs"]))
    run = Run(cfg, procs, train_set, raw, model_args, batches, optimizer, schedule,
              torch.amp.GradScaler(procs.device.type, enabled=procs.precision == "fp16"),
              torch.Generator(device=procs.device).manual_seed(cfg["seed"] * 1000 + procs.rank))
    if resume:
        restore(run, resume)
    run.model = wrap_model(run)
    return run


def restore(run, resume):
    """Continue the run a checkpoint stopped: exactly with as many processes as wrote it; with another number, the
    same weights, optimiser, schedule and epoch, the batches re-dealt and the random streams re-seeded."""
    ckpt, procs = resume.ckpt, run.procs
    run.raw.load_trainable_state(ckpt["model"], resume.path)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.schedule.load_state_dict(ckpt["scheduler"])
    if ckpt["scaler"] and run.scaler.is_enabled():  # an empty state: saved where fp16 was not used
        run.scaler.load_state_dict(ckpt["scaler"])
    run.first_epoch, run.step = ckpt["epoch"] + 1, ckpt["step"]
    run.best_eer, run.threshold, run.tracker_run_id = ckpt["best_eer"], ckpt["threshold"], ckpt["tracker_run_id"]
    run.best_epoch = ckpt.get("best_epoch")
    saved_world = len(ckpt["rng"])
    if saved_world == procs.world:
        rng = ckpt["rng"][procs.rank]
        torch.set_rng_state(rng["torch"])
        run.augment_rng.set_state(rng["augment"])
        if procs.device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], procs.device)
    else:
        # the epoch's batches are a function of (seed, epoch, world); the schedule moves to this epoch's step
        run.step = run.schedule.last_epoch = run.first_epoch * len(run.batches)
        for group, base_lr, factor in zip(run.optimizer.param_groups, run.schedule.base_lrs, run.schedule.lr_lambdas):
            group["lr"] = base_lr * factor(run.step)
        seed = int(np.random.SeedSequence([run.cfg["seed"], run.first_epoch, procs.rank]).generate_state(1)[0])
        torch.manual_seed(seed)
        run.augment_rng.manual_seed(seed)
        procs.log(f"{resume.path} was written by {saved_world} process(es) and resumes with {procs.world}: the same "
                  f"run, its batches re-dealt and random streams re-seeded, so no longer bit-identical to an "
                  f"uninterrupted one")
    procs.log(f"resumed {resume.path}: {run.first_epoch} of {run.cfg['epochs']} epochs done, best validation EER "
              f"{run.best_eer:.4f}")


def wrap_model(run):
    """DDP over the processes, and torch.compile when compile_pays (rank 0's timing decides for every rank)."""
    procs, raw, ts = run.procs, run.raw, run.train_set
    steps_left = run.cfg["epochs"] * len(run.batches) - run.step
    n = len(run.batches.epoch(0)[0])
    use_compile = torch.tensor(float(resolve_compile(
        run.cfg, procs.device, lambda: time_probe_step(raw, ts.images, ts.labels, n, procs.device, procs.precision),
        steps_left, procs.log)), device=procs.device)
    if procs.ddp:
        dist.broadcast(use_compile, 0)
    # one static graph, gradients reduced in place in their buckets (no copy per step)
    # no buffer changes in training (traits' cells are constants), so none is synced before every forward (the
    # switch is forward_sync_buffers in recent torch, broadcast_buffers before)
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                      else {"broadcast_buffers": False})
    model = DDP(raw, device_ids=[procs.device.index] if procs.device.type == "cuda" else None,
                gradient_as_bucket_view=True, static_graph=True, **no_buffer_sync) if procs.ddp else raw
    run.compiled = bool(use_compile.item())
    # one static graph per batch size: only batches holding the triplet family differ
    return torch.compile(model, dynamic=False) if run.compiled else model


def start_tracking(run):
    """The tracker the config names, continuing the checkpoint's tracker run when resuming (rank 0 only)."""
    if run.procs.master:
        os.makedirs(run.cfg["out_dir"], exist_ok=True)
    tracker = make_tracker(run.cfg, run.tracker_run_id, run.procs.rank)
    if run.procs.master and run.tracker_run_id is None:
        tracker.log_params(run.cfg)
    return tracker


def train_step(run, idx, timer=None):
    """One optimisation step on a batch of image indices (on the device: no copy from the host, no sync); the timer
    marks phases when benchmarking."""
    cfg, ts, device = run.cfg, run.train_set, run.procs.device
    x, y = ts.images[idx.to(ts.images.device)].to(device, non_blocking=True), ts.labels[idx]
    timer and timer.mark("data")
    x = data.augment(x, run.augment_rng, cfg["hflip"])
    timer and timer.mark("augmentation")
    with evaluate.autocast(device, run.procs.precision):
        terms = run.raw.loss_terms(run.model(x), y)  # {name: term}, weighted by the config's loss_<name>
        loss = sum(cfg[f"loss_{name}"] * term for name, term in terms.items())
    timer and timer.mark("forward")
    run.scaler.scale(loss).backward()
    timer and timer.mark("backward")
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.schedule.step()
    timer and timer.mark("optimiser")
    return loss.detach()


def train_epoch(run, epoch):
    """One pass over the epoch's family batches; the mean loss over every rank, images/s and peak memory."""
    procs, epoch_batches = run.procs, data.batches_on(run.procs.device, run.batches.epoch(epoch))
    run.epoch_started = time.perf_counter()
    run.model.train()
    loss_sum = torch.zeros((), device=procs.device)
    diverged = torch.full((2,), -1.0, device=procs.device)  # the first step whose loss is not finite, and that loss
    bar = Progress(len(epoch_batches), f"epoch {epoch + 1}/{run.cfg['epochs']}", enabled=procs.master)
    for i, idx in enumerate(epoch_batches):
        loss = train_step(run, idx)
        loss_sum += loss
        # kept on the device and read at the epoch's end: a check per step would wait for the GPU at every step
        diverged = torch.where((diverged[0] < 0) & ~loss.isfinite(),
                               torch.stack([torch.full_like(loss, run.step), loss]), diverged)
        run.step += 1
        bar.update(info=lambda: f"loss {loss_sum.item() / (i + 1):.4f}")
    seconds = time.perf_counter() - run.epoch_started
    if procs.ddp:
        dist.all_reduce(loss_sum)
    if not loss_sum.isfinite():  # on every rank: the sum holds every rank's losses
        stop_diverged(run, epoch, *diverged.tolist())
    run.stats = {"loss": loss_sum.item() / len(epoch_batches) / procs.world, "lr": run.schedule.get_last_lr()[0],
                 "images_per_s": sum(len(b) for b in epoch_batches) * procs.world / seconds,
                 "peak_memory_gb": peak_memory_gb(procs.device)}


def stop_diverged(run, epoch, step, loss, what="the loss"):
    """A non-finite loss or validation score ends the run before anything of the epoch is saved."""
    lr = run.cfg["lr"]
    where = f"at step {int(step) + 1} " if step >= 0 else ""  # another rank's loss when this rank saw none
    raise UserError(f"{what} is {'not finite' if step < 0 else loss} {where}in epoch {epoch + 1}: training diverged, "
                    f"and nothing of this epoch was saved. Train again with a lower learning rate (lr {lr:g}, e.g. "
                    f"--lr {lr / 10:g}) or --precision fp32")


def validate_and_save(run, epoch):
    """Validation EER on rank 0; last.pt every epoch and best.pt when it improves; the tracker; the epoch line."""
    cfg, procs, ts = run.cfg, run.procs, run.train_set
    if procs.master and ts.val_split is not None:
        val = evaluate.validate(run.raw, ts.val_images, ts.val_split, procs.device, procs.precision)
        if not np.isfinite(val["scores"]).all():
            stop_diverged(run, epoch, -1, None, "a validation score")
        run.stats.update(val_eer=val["eer"], val_auc=val["auc"])
        if val["eer"] < run.best_eer:
            run.best_eer, run.threshold, run.best_epoch = val["eer"], val["threshold"], epoch
        every = cfg["log_images_every"]
        if run.tracker.kind != "none" and every and ((epoch + 1) % every == 0 or epoch + 1 == cfg["epochs"]):
            log_validation_figures(run.tracker, run.raw, val, ts.val_images, ts.val_split, procs.device, epoch)
    save_checkpoints(run, epoch)
    run.epoch_times.append(time.perf_counter() - run.epoch_started)
    stats = run.stats
    val_text = (f"val EER {stats['val_eer']:.4f} AUC {stats['val_auc']:.4f}{' *' if run.best_epoch == epoch else ''} | "
                if "val_eer" in stats else "")
    procs.log(f"epoch {epoch + 1}/{cfg['epochs']} | loss {stats['loss']:.4f} | {val_text}"
              f"{stats['images_per_s']:.0f} img/s | peak mem {stats['peak_memory_gb']:.2f} GB | "
              f"{format_seconds(run.epoch_times[-1])}/epoch, "
              f"ETA {format_seconds(eta_seconds(run.epoch_times, cfg['epochs'] - epoch - 1))}")


def save_checkpoints(run, epoch):
    """Every rank's random state gathered; rank 0 writes last.pt (the previous one kept as previous.pt), best.pt
    when validation improved (this epoch is the best), and arcface's trained backbone; the tracker gets the epoch's
    metrics."""
    procs, raw = run.procs, run.raw
    rng = {"torch": torch.get_rng_state(), "augment": run.augment_rng.get_state(),
           "cuda": torch.cuda.get_rng_state(procs.device) if procs.device.type == "cuda" else None}
    rngs = [rng]
    if procs.ddp:
        rngs = [None] * procs.world
        dist.all_gather_object(rngs, rng)
    if not procs.master:
        return
    state = {"config": run.cfg, "model_args": run.model_args, "backbone_fingerprint": raw.vit.fingerprint,
             "class_ids": run.train_set.split.ids,
             "model": {k: v.detach().cpu() for k, v in raw.trainable_state().items()},
             "optimizer": run.optimizer.state_dict(), "scheduler": run.schedule.state_dict(),
             "scaler": run.scaler.state_dict(), "epoch": epoch, "step": run.step, "rng": rngs,
             "sampler": {"seed": run.cfg["seed"], "next_epoch": epoch + 1}, "best_eer": run.best_eer,
             "best_epoch": run.best_epoch, "threshold": run.threshold,
             "val": {k: v for k, v in run.stats.items() if k.startswith("val")}, "tracker_run_id": run.tracker.run_id}
    state["checksum"] = content_digest(state)
    out_dir, improved = run.cfg["out_dir"], run.best_epoch == epoch
    data.save_atomically(state, os.path.join(out_dir, "last.pt"), keep_previous=os.path.join(out_dir, "previous.pt"))
    if improved:
        data.save_atomically(state, os.path.join(out_dir, "best.pt"))
    if raw.method == "arcface" and (improved or run.train_set.val_split is None):
        # the trained backbone as an official checkpoint: `arch: .../backbone.pth` freezes it elsewhere
        data.save_atomically(official_backbone_state(raw.vit), os.path.join(out_dir, "backbone.pth"))
    run.tracker.log_metrics(run.stats, epoch)


def eta_seconds(epoch_times, epochs_left):
    """Seconds left at the median pace of the epochs after the first (which compiles and warms up), so neither a
    compile epoch nor one slow validation inflates it."""
    steady = epoch_times[1:] or epoch_times
    return epochs_left * statistics.median(steady) if steady else 0.0


def out_of_time(run, epoch, budget, resume_line):
    """With a time budget: stop, checkpoint saved, before the next epoch would pass it (rank 0's clock decides)."""
    procs = run.procs
    steady = run.epoch_times[1:] or run.epoch_times
    stop = torch.tensor(float(budget is not None and time.perf_counter() - run.started + 1.1 * max(steady) > budget),
                        device=procs.device)
    if procs.ddp:
        dist.broadcast(stop, 0)
    if not stop.item() or epoch + 1 == run.cfg["epochs"]:
        return False
    procs.log(f"time budget: stopping before epoch {epoch + 2} would pass it. Continue with the same line and "
              f"--resume auto:\n  {resume_line}")
    run.stopped_early = True
    return True


def resume_command(argv, procs):
    """The command line that started this run, with --resume auto: the one line for every later session."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--resume" in argv:
        del argv[argv.index("--resume"):argv.index("--resume") + 2]
    argv = [a for a in argv if not a.startswith("--resume=")] + ["--resume", "auto"]
    launcher = f"torchrun --nproc_per_node {procs.world}" if procs.ddp else "python"
    return " ".join([launcher, "train.py", *argv])


def finish(run):
    """Ranks checked to agree, the tracker closed, and a summary with the commands a user types next."""
    check_ranks_agree(run.raw, run.procs)
    if run.tracker:
        run.tracker.finish()
    procs, out_dir = run.procs, run.cfg["out_dir"]
    if run.first_epoch >= run.cfg["epochs"]:
        procs.log(f"all {run.cfg['epochs']} epochs were done already; to train longer, resume with --epochs N")
    best = (f"best epoch {run.best_epoch + 1}, validation EER {run.best_eer:.4f}, threshold {run.threshold:+.4f}"
            if run.best_epoch is not None else "no validation (full: true): give evaluate.py --threshold")
    last = os.path.join(out_dir, "last.pt")
    pair = example_pair(run.cfg)
    procs.log(f"{'stopped early' if run.stopped_early else 'done'}: {best}\n  {os.path.join(out_dir, 'best.pt')}: the best epoch\n  {last}: the last epoch\n"
              f"next:\n  python evaluate.py --ckpt {out_dir} --out eval\n"
              + (f"  python cam.py {pair[0]} {pair[1]} --ckpt {out_dir}\n"
                 f"  python cam.py --pairs test --n 16 --ckpt {out_dir} --out cam_gallery"
                 if run.raw.has_maps else f"  python cam.py {pair[0]} {pair[1]} --ckpt {out_dir}   # the score alone"))


def example_pair(cfg):
    """Two photos of twins from the test split, to show the explanation command with real paths."""
    try:
        split = data.load_split(cfg["test_info"], cfg["test_pairs"], cfg["path_remap"])
        a, b, _ = cam.pick_pairs(split, 1)[0]
        return split.paths[a], split.paths[b]
    except (UserError, IndexError):
        return "A.jpg", "B.jpg"


def log_validation_figures(tracker, raw, val, val_images, val_split, device, epoch):
    """The validation ROC and score histograms and, for the prompt methods, the explanation of one fixed
    validation twin pair, so a run can be watched in the tracker."""
    tracker.log_image("val_roc", evaluate.roc_figure(val["scores"], val["kind"], f"validation, epoch {epoch + 1}"),
                      epoch)
    if raw.has_maps:
        a, b, _ = cam.pick_pairs(val_split, 1)[0]  # the first twin-impostor pair of the protocol
        _, figure = cam.pair_figure(raw, val_images[a], val_images[b], val_split.paths[a], val_split.paths[b],
                                    val["threshold"], 3, device)
        tracker.log_image("val_explanation", figure, epoch)


def check_ranks_agree(raw, procs):
    """Every rank must end with the same trainable weights; a silent DDP fault would break this."""
    if not procs.ddp:
        return
    flat = torch.cat([p.detach().float().flatten() for p in raw.parameters() if p.requires_grad])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, dist.ReduceOp.MIN)
    dist.all_reduce(hi, dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"trainable weights differ across ranks (max gap {(hi - lo).max().item():.3g})")
    procs.log(f"trainable weights identical on all {procs.world} ranks ({flat.numel():,} values)")


def main(argv=None):
    args, cfg, resume = configure(argv)
    procs = start_processes(cfg)
    train_set = load_train_set(cfg, procs, resume)
    run = start_run(cfg, train_set, procs, resume)
    if args.check or args.benchmark:
        return preflight(run, args.budget) if args.check else benchmark(run, steps=args.benchmark)
    run.tracker = start_tracking(run)
    try:
        for epoch in range(run.first_epoch, cfg["epochs"]):
            train_epoch(run, epoch)
            validate_and_save(run, epoch)
            if out_of_time(run, epoch, args.budget, resume_command(argv, procs)):
                break
    except KeyboardInterrupt:
        saved = run.first_epoch + len(run.epoch_times)  # an epoch's time is kept once its checkpoint is written
        raise UserError(f"interrupted after epoch {saved}: " + (f"{cfg['out_dir']}/last.pt holds it" if saved else
                        "nothing was saved") + f"; continue with:\n  {resume_command(argv, procs)}") from None
    finish(run)


def probe_step(raw, images, labels, n, device, precision, gen):
    """Forward and backward of a training batch of n images, its gradients dropped: no state of the run changes."""
    try:
        x = data.augment(images[:n].to(device), gen)
        with evaluate.autocast(device, precision):
            loss = sum(raw.loss_terms(raw(x), labels[:n]).values())
        loss.backward()
    finally:
        raw.zero_grad(set_to_none=True)


def time_probe_step(raw, images, labels, n, device, precision, repeats=3):
    """Seconds per uncompiled training step (forward and backward; the optimiser is a few % more)."""
    gen = torch.Generator(device=device).manual_seed(0)
    probe_step(raw, images, labels, n, device, precision, gen)  # warm-up
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        probe_step(raw, images, labels, n, device, precision, gen)
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def largest_batch(raw, images, labels, K, device, precision, log):
    """The largest batch (whole families of K images per person) whose training step fits in GPU memory."""
    if device.type != "cuda":
        log("batch_size auto: no GPU, using 64")
        return 64
    gen = torch.Generator(device=device).manual_seed(0)

    def fits(n):
        try:
            probe_step(raw, images, labels, n, device, precision, gen)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()

    step = 4 * K  # two twin families
    n = step
    while n * 2 <= len(images) and fits(n * 2):
        n *= 2
    lo, hi = n, min(n * 2, len(images))
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    chosen = int(lo * 0.9) // step * step or step  # headroom for fragmentation and validation
    log(f"batch_size auto: {lo} images fit in {torch.cuda.get_device_name(device)}; using {chosen}")
    return chosen


def preflight(run, budget, steps=3):
    """--check: a few training steps at the config's batch size on this device, then what the whole run needs: speed,
    peak memory per process (measured on a GPU; on a CPU estimated, before the steps) against the GPU it is meant for,
    and wall time against the time budget. Non-zero when the batch would not fit."""
    cfg, procs, device = run.cfg, run.procs, run.procs.device
    if device.type != "cuda":
        report_memory(run, *estimated_memory(run))
    try:
        seconds, images, _ = time_steps(lambda idx, timer=None: train_step(run, idx, timer),
                                        data.batches_on(procs.device, run.batches.epoch(0)),
                                        procs, warmup=1, steps=steps)
    except torch.OutOfMemoryError:
        raise UserError(f"batch_size {cfg['batch_size']} does not fit {torch.cuda.get_device_name(device)}: a training "
                        f"step ran out of memory; lower batch_size (or try --batch_size auto)") from None
    val_seconds = time.perf_counter()
    if procs.master and run.train_set.val_split is not None:
        evaluate.validate(run.raw, run.train_set.val_images, run.train_set.val_split, device, procs.precision)
    val_seconds = time.perf_counter() - val_seconds
    wall = (cfg["epochs"] * len(run.batches) - run.step) * seconds / steps + (cfg["epochs"] - run.first_epoch) * val_seconds
    n_train = sum(p.numel() for p in run.raw.parameters() if p.requires_grad)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    procs.log(f"check: {n_train:,} trainable parameters; on {name}: {1000 * seconds / steps:.0f} ms a step, "
              f"{images * procs.world / seconds:.1f} images/s, validation {val_seconds:.2f} s")
    procs.log(f"check: the whole run ({cfg['epochs'] - run.first_epoch} epochs of {len(run.batches)} steps) takes "
              f"about {format_seconds(wall)} here" + (f", {math.ceil(wall / budget)} session(s) of the time budget "
                                                       f"{format_seconds(budget)}" if budget else ""))
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        procs.log(f"check: peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
                  f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved by torch, over every batch size "
                  f"an epoch deals")
        report_memory(run, (total - free) / 2**30, "measured in use on the GPU (CUDA's context, NCCL's buffers and "
                      "any other process on it included)", total / 2**30, name)
    return 0


def estimated_memory(run):
    """(peak GiB, how, capacity GiB or None, where) of the run on the GPU its config names, by bench.py's estimate at
    the largest batch an epoch deals, with this run's training images in the cache."""
    import bench
    cfg = run.cfg
    capacity, gpu_precision = GPUS.get(cfg["gpu"], (None, "fp32"))
    precision = gpu_precision if cfg["precision"] == "auto" else cfg["precision"]
    shape = {k: v for k, v in asdict(run.raw.vit.cfg).items() if k != "img_size"}
    batch = max(len(idx) for idx in run.batches.epoch(0))
    peak = sum(bench.training_memory(cfg, shape, capacity, precision, batch, len(run.train_set.images))[0].values())
    return (peak + bench.MEMORY_NOT_ESTIMATED, f"estimated for {precision} at batch {batch}: {peak:.2f} GiB and about "
            f"{bench.MEMORY_NOT_ESTIMATED:.1f} for CUDA's context, NCCL and the allocator's reserve", capacity,
            f"the config's gpu {cfg['gpu']}" if capacity else "no GPU named (config key gpu)")


def report_memory(run, peak, how, capacity, where):
    """The peak memory line of --check; a UserError when it does not fit."""
    fits = capacity is None or peak <= capacity
    run.procs.log(f"check: peak memory {peak:.2f} GiB per process, {how}, "
                  + (f"of {capacity:.1f} GiB on {where}: {'fits' if fits else 'does NOT fit'}" if capacity else where))
    if not fits:
        raise UserError(f"batch_size {run.cfg['batch_size']} does not fit {where}: {peak:.2f} of {capacity:.1f} GiB; "
                        f"lower batch_size (or try --batch_size auto on the GPU)")


def time_steps(step, epoch_batches, procs, warmup, steps):
    """(seconds, images, phase timer) of `steps` timed steps, after untimed ones on every batch size the epoch holds
    (batches holding the triplet family are larger, and torch.compile builds a graph per size) and `warmup` more.
    Every rank takes as many steps: DDP reduces gradients in each."""
    warm = list({len(idx): idx for idx in epoch_batches}.values())
    n_warm = torch.tensor(len(warm) + warmup, device=procs.device)
    if procs.ddp:
        dist.all_reduce(n_warm, dist.ReduceOp.MAX)
    if procs.device.type == "cuda":  # the peak over every batch size, the largest (the triplet's) included
        torch.cuda.reset_peak_memory_stats(procs.device)
    for i in range(n_warm.item()):
        step(warm[i] if i < len(warm) else epoch_batches[i % len(epoch_batches)])
    timer, images, start = PhaseTimer(procs.device), 0, time.perf_counter()
    for i in range(steps):
        idx = epoch_batches[(warmup + i) % len(epoch_batches)]
        timer.mark("start")
        step(idx, timer)
        images += len(idx)
    return time.perf_counter() - start, images, timer


def benchmark(run, steps, warmup=5):
    """Steady-state images/s and where the step time goes; under DDP also what the gradient all-reduce costs alone
    (DDP runs it inside backward)."""
    procs, device = run.procs, run.procs.device
    elapsed, images, timer = time_steps(lambda idx, timer=None: train_step(run, idx, timer),
                                        data.batches_on(procs.device, run.batches.epoch(0)),
                                        procs, warmup, steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    total = sum(v for k, v in timer.totals.items() if k != "start")
    shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in timer.totals.items() if k != "start")
    procs.log(f"benchmark on {name} x{procs.world} process(es), {procs.precision}, compile "
              f"{'on' if run.compiled else 'off'}:\n  {images / elapsed:.1f} images/s per process, "
              f"{images * procs.world / elapsed:.1f} in all (batch {images // steps})\n  step time: {shares}\n"
              f"  peak memory: {peak_memory_gb(device):.2f} GB")
    if procs.ddp:
        n_trainable = sum(p.numel() for p in run.raw.parameters() if p.requires_grad)
        grads = torch.zeros(n_trainable, device=device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            dist.all_reduce(grads)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_step = (time.perf_counter() - start) / steps
        procs.log(f"  gradient all-reduce alone ({n_trainable:,} values): {1000 * per_step:.1f} ms per step, "
                  f"{100 * per_step * steps / elapsed:.0f}% of the step time")


class PhaseTimer:
    """Wall time per phase of a step, synchronising the GPU at each mark (benchmark only)."""

    def __init__(self, device):
        self.device, self.totals, self.last = device, {}, None

    def mark(self, phase):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.last is not None:
            self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
        self.last = now


if __name__ == "__main__":
    status = run_cli(main)
    if dist.is_initialized():
        # DDP sits in a reference cycle that holds the process group: free it now, not while Python shuts down
        gc.collect()
        dist.destroy_process_group()
    sys.exit(status)
