"""Train a twin verifier: Prompt-CAM (method promptcam), the ArcFace yardstick (arcface) or verifier v2 (traits).

    python train.py --cfg configs/cpu_demo.yaml
    python train.py --cfg configs/cpu_demo.yaml --cfg configs/synth_random.yaml   # later files override earlier
    torchrun --nproc_per_node 2 train.py --cfg configs/t4x2.yaml
    python train.py --resume ckpt/last.pt          # or --resume auto: the newest last.pt under out_dir
    python train.py --cfg FILE --benchmark [STEPS] # timed steps (20): images/s, phase shares, peak memory

Every config key can be overridden as `--key value`. Each epoch writes out_dir/last.pt, and best.pt
when the validation EER improves, atomically; a resumed run continues exactly where it stopped.
"""
import argparse
import gc
import glob
import math
import os
import re
import statistics
import sys
import time

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel as DDP

import cam
import data
import evaluate
from model import METHOD_BEFORE_THE_KEY, METHODS, build_verifier, official_backbone_state, read_training_checkpoint
from progress import Progress, format_seconds
from tracking import make_tracker

DEFAULTS = {
    # data: the user's info files; path_remap 'OLD=NEW' rewrites paths made on another machine
    "train_info": "", "train_pairs": "", "test_info": "", "test_pairs": "", "path_remap": "",
    "cache_dir": "cache", "cache_device": "auto",  # auto: on the GPU when it takes under a quarter of it
    # model: traits (verifier v2), promptcam (v1) or arcface, the conventional yardstick (no prompts, no maps)
    "method": "traits", "arch": "dinov2_vits14", "weights_dir": "", "img_size": 224, "deep_prompts": 4,
    "train_blocks": 0, "margin": 0.3, "scale": 30.0,  # the margin loss's angle and logit scale (traits, arcface)
    "trait_prompts": 36,  # method traits: prompts tiling the face (a square number); their outputs form the embedding
    # optimisation
    "epochs": 30, "batch_size": 64, "images_per_person": 4, "lr": 2e-3, "weight_decay": 0.05,
    "warmup_epochs": 1, "loss_class": 1.0, "loss_episodic": 1.0, "loss_pull": 0.1, "hflip": False,
    "val_families": 12, "full": False, "seed": 0, "precision": "auto", "compile": "auto",
    # output and tracking
    "out_dir": "ckpt", "tracker": "none", "run_name": "", "mlflow_uri": "", "mlflow_experiment": "",
    "wandb_project": "twin-verification", "wandb_entity": "",
    "log_images_every": 5,  # epochs between the validation ROC and explanation figures sent to the tracker; 0: never
}
CHOICES = {"method": METHODS, "cache_device": ("auto", "cuda", "cpu"), "precision": ("auto", "fp32", "fp16", "bf16"),
           "compile": ("auto", "true", "false"), "tracker": ("none", "mlflow", "wandb")}
# What a resumed run may change: where things are and how they are tracked, never what is trained.
RESUMABLE = {"epochs", "out_dir", "cache_dir", "cache_device", "path_remap", "weights_dir", "compile", "tracker",
             "run_name", "mlflow_uri", "mlflow_experiment", "wandb_project", "wandb_entity", "log_images_every",
             "train_info", "train_pairs", "test_info", "test_pairs"}


# ---------------------------------------------------------------- configuration

def coerce(key, value, source):
    """A config value of the default's type (YAML or command-line text), or a clear error."""
    if key not in DEFAULTS:
        raise SystemExit(f"{source}: unknown config key {key!r}; known keys: {', '.join(sorted(DEFAULTS))}")
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
    except ValueError:
        raise SystemExit(f"{source}: config key {key!r} needs a {type(default).__name__}"
                         f"{' or auto' if key == 'batch_size' else ''}, got {value!r}") from None
    if key in CHOICES and value not in CHOICES[key]:
        raise SystemExit(f"{source}: config key {key!r} must be one of {CHOICES[key]}, got {value!r}")
    return value


def parse_overrides(items):
    """['--lr', '1e-3', '--img-size=336'] -> {'lr': '1e-3', 'img_size': '336'}."""
    out, i = {}, 0
    while i < len(items):
        item = items[i]
        if not item.startswith("--"):
            raise SystemExit(f"command line: expected --key value, got {item!r}")
        if "=" in item:
            key, value = item[2:].split("=", 1)
        elif i + 1 < len(items):
            key, value = item[2:], items[i + 1]
            i += 1
        else:
            raise SystemExit(f"command line: {item} needs a value")
        out[key.replace("-", "_")] = value
        i += 1
    return out


def load_config(cfg_paths, overrides, base=None):
    """Defaults (or a checkpoint's config), then each YAML file in turn, then command-line overrides."""
    cfg = dict(base or DEFAULTS)
    for cfg_path in cfg_paths or []:
        try:
            with open(cfg_path) as f:
                from_file = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise SystemExit(f"{cfg_path}: config file not found") from None
        except yaml.YAMLError as e:
            raise SystemExit(f"{cfg_path}: not valid YAML ({e})") from None
        if not isinstance(from_file, dict):
            raise SystemExit(f"{cfg_path}: expected a mapping of config keys")
        cfg.update({k: coerce(k, v, cfg_path) for k, v in from_file.items()})
    cfg.update({k: coerce(k, v, "command line") for k, v in overrides.items()})
    return cfg


def parse_duration(text):
    """'11h30m', '90m', '45s', '2h' -> seconds."""
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", text.strip())
    if not text.strip() or not m:
        raise SystemExit(f"--time-budget: cannot read {text!r}; write it like 11h30m, 90m or 45s")
    h, mi, s = (float(x or 0) for x in m.groups())
    return h * 3600 + mi * 60 + s


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
            f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}. Install a build that includes it, e.g. "
            f"for a P100 (sm_60): pip install torch==2.5.1 torchvision==0.20.1 "
            f"--index-url https://download.pytorch.org/whl/cu121")


# torch.compile pays back when the step time it saves over the run exceeds the time compiling takes. Measured on
# an H100: compiled ViT-B/14 steps ran 1.8x faster (986 vs 541 images/s), and the demo config's graphs took 73 s
# to compile; Kaggle's 2-4-core hosts compile more slowly, hence 180 s.
COMPILE_SPEEDUP, COMPILE_SECONDS = 1.8, 180.0


def compile_pays(step_seconds, steps_left):
    """Whether compiling saves more time over the steps left than it costs."""
    return steps_left * step_seconds * (1 - 1 / COMPILE_SPEEDUP) > COMPILE_SECONDS


def resolve_compile(cfg, device, time_step, steps_left, log):
    """compile true/false as set; auto: on a GPU Triton supports (sm_70+, so never a P100), when compile_pays
    for the steps this run has left, from an uncompiled step timed now."""
    if cfg["compile"] != "auto":
        return cfg["compile"] == "true"
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (7, 0):
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


# ---------------------------------------------------------------- checkpoints

def find_resume(arg, out_dir):
    if arg != "auto":
        if not os.path.isfile(arg):
            raise SystemExit(f"--resume {arg}: no such file")
        return arg
    found = glob.glob(os.path.join(out_dir, "**", "last.pt"), recursive=True)
    return max(found, key=os.path.getmtime) if found else None


def check_resume_config(cfg, ckpt_cfg, path):
    changed = [f"{k}: {ckpt_cfg.get(k)!r} in the checkpoint, {cfg[k]!r} now"
               for k in DEFAULTS if k not in RESUMABLE and cfg[k] != ckpt_cfg.get(k)]
    if changed:
        raise SystemExit(f"{path} was trained with another config; resume with the same one or start a new "
                         f"out_dir:\n  " + "\n  ".join(changed))


# ---------------------------------------------------------------- timing

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


# ---------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="config keys (--key value): " + ", ".join(sorted(DEFAULTS)))
    ap.add_argument("--cfg", action="append", help="YAML file of config keys; repeat it to layer files (later win)")
    ap.add_argument("--resume", help="a last.pt, or 'auto' for the newest last.pt under out_dir")
    ap.add_argument("--time-budget", help="stop cleanly before the next epoch would pass it, e.g. 11h30m")
    ap.add_argument("--benchmark", nargs="?", const=20, type=int, metavar="STEPS",
                    help="time STEPS training steps (default 20) instead of training")
    args, rest = ap.parse_known_args(argv)
    if args.benchmark is not None and args.benchmark < 1:
        raise SystemExit(f"--benchmark {args.benchmark}: time at least one step")
    overrides = parse_overrides(rest)
    budget = parse_duration(args.time_budget) if args.time_budget else None
    cfg = load_config(args.cfg, overrides)
    resume_path = find_resume(args.resume, cfg["out_dir"]) if args.resume else None
    ckpt = read_training_checkpoint(resume_path) if resume_path else None
    if ckpt:
        # the checkpoint's config, then what the user gave now, which may only move or re-track the run
        # a key added since then has its default, which is what the run did, except `method`
        trained = {**DEFAULTS, "method": METHOD_BEFORE_THE_KEY, **ckpt["config"]}
        cfg = load_config(args.cfg, overrides, base=trained)
        check_resume_config(cfg, trained, resume_path)
    for key in ("train_info", "train_pairs"):
        if not cfg[key]:
            raise SystemExit(f"config key {key!r} is empty: point it at your info files (see README)")

    # ---- processes and devices: torchrun sets RANK; plain python runs one process
    ddp, n_gpus = "RANK" in os.environ, torch.cuda.device_count()
    if ddp:
        # NCCL needs a GPU per process; more processes than GPUs (a DDP check on one GPU) share them over gloo
        local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
        dist.init_process_group("nccl" if n_gpus >= local_world else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{local_rank % n_gpus}" if n_gpus else "cpu")
    else:
        rank, world = 0, 1
        device = torch.device("cuda:0" if n_gpus else "cpu")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        check_gpu_support(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # fp16 (T4, 2080 Ti, P100) trains with a gradient scaler; bf16 and fp32 need none
    precision = evaluate.default_precision(device) if cfg["precision"] == "auto" else cfg["precision"]
    if ckpt and len(ckpt["rng"]) != world:
        raise SystemExit(f"{resume_path} was written by {len(ckpt['rng'])} process(es); resume it with as many")

    # ---- data: rank 0 decodes the cache once, the others read it
    split = data.load_split(cfg["train_info"], cfg["train_pairs"], cfg["path_remap"])
    train_split, val_split = data.hold_out_families(split, 0 if cfg["full"] else cfg["val_families"], cfg["seed"])
    if ckpt and ckpt["class_ids"] != train_split.ids:
        raise SystemExit(f"{resume_path}: the training identities differ from the checkpoint's")
    all_images = rank0_first(lambda: data.build_cache(split.paths, cfg["img_size"], cfg["cache_dir"], master), ddp)
    index = {p: i for i, p in enumerate(split.paths)}
    train_images = all_images[[index[p] for p in train_split.paths]]
    val_images = all_images[[index[p] for p in val_split.paths]] if val_split else None
    if device.type == "cuda":  # index the cache on the GPU, or in pinned RAM when it would crowd the GPU
        fits = train_images.nbytes < 0.25 * torch.cuda.get_device_properties(device).total_memory
        on_gpu = cfg["cache_device"] == "cuda" or (cfg["cache_device"] == "auto" and fits)
        train_images = train_images.to(device) if on_gpu else train_images.pin_memory()
    labels = train_split.person.to(device)
    K = cfg["images_per_person"]

    # ---- model, optimiser, schedule
    torch.manual_seed(cfg["seed"])
    model_args = {k: cfg[k] for k in ("method", "arch", "img_size", "deep_prompts", "train_blocks", "margin", "scale",
                                      "trait_prompts")}
    model_args["num_classes"] = len(train_split.ids)
    raw = rank0_first(lambda: build_verifier(**model_args, weights_dir=cfg["weights_dir"] or None), ddp).to(device)
    log(raw.summary())
    batch_size = cfg["batch_size"]
    if batch_size == "auto":
        batch_size = largest_batch(raw, train_images, labels, K, device, precision, log)
    batches = data.FamilyBatches(train_split, K, max(1, batch_size // (2 * K)), cfg["seed"], rank, world)
    named = [(n, p) for n, p in raw.named_parameters() if p.requires_grad]
    # weight decay on weight matrices only: not on prompts, norms or biases
    decays = {n: p.ndim >= 2 and "prompts" not in n for n, p in named}
    decay = [p for n, p in named if decays[n]]
    no_decay = [p for n, p in named if not decays[n]]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"],
                                  fused=device.type == "cuda")
    steps_per_epoch, warmup = len(batches), cfg["warmup_epochs"] * len(batches)
    total = cfg["epochs"] * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(warmup, 1)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, max(0, s - warmup) / max(total - warmup, 1)))))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    steps_left = total - (ckpt["step"] if ckpt else 0)
    use_compile = torch.tensor(float(resolve_compile(
        cfg, device, lambda: time_probe_step(raw, train_images, labels, len(batches.epoch(0)[0]), device, precision),
        steps_left, log)), device=device)
    if ddp:
        dist.broadcast(use_compile, 0)  # every rank runs the same graph: rank 0's timing decides
    use_compile = bool(use_compile.item())
    # one static graph, gradients reduced in place in their buckets (no copy per step)
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
                static_graph=True) if ddp else raw
    if use_compile:  # one static graph per batch size: only batches holding the triplet family differ
        model = torch.compile(model, dynamic=False)
    gen = torch.Generator(device=device).manual_seed(cfg["seed"] * 1000 + rank)
    start_epoch, step, best_eer, threshold, run_id = 0, 0, math.inf, None, None
    if ckpt:
        raw.load_trainable_state(ckpt["model"], resume_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"][rank]
        torch.set_rng_state(rng["torch"])
        gen.set_state(rng["augment"])
        if device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        start_epoch, step = ckpt["epoch"] + 1, ckpt["step"]
        best_eer, threshold, run_id = ckpt["best_eer"], ckpt["threshold"], ckpt["tracker_run_id"]
        log(f"resumed {resume_path}: epoch {start_epoch} of {cfg['epochs']} done, best EER {best_eer:.4f}")

    def train_step(idx, timer=None):
        """One optimisation step on a batch of image indices; the timer marks phases when benchmarking."""
        idx = idx.to(train_images.device, non_blocking=True)
        x, y = train_images[idx].to(device, non_blocking=True), labels[idx.to(device)]
        timer and timer.mark("data")
        x = data.augment(x, gen, cfg["hflip"])
        timer and timer.mark("augmentation")
        with evaluate.autocast(device, precision):
            terms = raw.loss_terms(model(x), y)  # {name: term}, weighted by the config's loss_<name>
            loss = sum(cfg[f"loss_{name}"] * term for name, term in terms.items())
        timer and timer.mark("forward")
        scaler.scale(loss).backward()
        timer and timer.mark("backward")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        timer and timer.mark("optimiser")
        return loss.detach()

    if args.benchmark:
        n_trainable = sum(p.numel() for _, p in named)
        return benchmark(train_step, batches, device, precision, use_compile, world, log, n_trainable,
                         steps=args.benchmark)

    if master:
        os.makedirs(cfg["out_dir"], exist_ok=True)
    tracker = make_tracker(cfg, run_id, rank)
    if master and run_id is None:
        tracker.log_params(cfg)
    run_start, epoch_times = time.perf_counter(), []
    for epoch in range(start_epoch, cfg["epochs"]):
        epoch_start, improved = time.perf_counter(), False
        model.train()
        epoch_batches = batches.epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        bar = Progress(len(epoch_batches), f"epoch {epoch + 1}/{cfg['epochs']}", enabled=master)
        for i, idx in enumerate(epoch_batches):
            loss_sum += train_step(idx)
            step += 1
            bar.update(info=lambda: f"loss {loss_sum.item() / (i + 1):.4f}")
        train_time = time.perf_counter() - epoch_start
        images_per_s = sum(len(b) for b in epoch_batches) * world / train_time
        if ddp:
            dist.all_reduce(loss_sum)
        stats = {"loss": loss_sum.item() / len(epoch_batches) / world, "lr": schedule.get_last_lr()[0],
                 "images_per_s": images_per_s, "peak_memory_gb": peak_memory_gb(device)}
        if master:
            if val_split is not None:
                val = evaluate.validate(raw, val_images, val_split, device, precision)
                stats.update(val_eer=val["eer"], val_auc=val["auc"])
                improved = val["eer"] < best_eer
                if improved:
                    best_eer, threshold = val["eer"], val["threshold"]
                every = cfg["log_images_every"]
                if tracker.kind != "none" and every and ((epoch + 1) % every == 0 or epoch + 1 == cfg["epochs"]):
                    log_validation_figures(tracker, raw, val, val_images, val_split, device, epoch)
        rng = {"torch": torch.get_rng_state(), "augment": gen.get_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        rngs = [rng]
        if ddp:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng)
        if master:
            state = {"config": cfg, "model_args": model_args,
                     "backbone_fingerprint": raw.vit.fingerprint, "class_ids": train_split.ids,
                     "model": {k: v.detach().cpu() for k, v in raw.trainable_state().items()},
                     "optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(),
                     "scaler": scaler.state_dict(), "epoch": epoch, "step": step, "rng": rngs,
                     "sampler": {"seed": cfg["seed"], "next_epoch": epoch + 1}, "best_eer": best_eer,
                     "threshold": threshold, "val": {k: v for k, v in stats.items() if k.startswith("val")},
                     "tracker_run_id": tracker.run_id}
            data.save_atomically(state, os.path.join(cfg["out_dir"], "last.pt"))
            if improved:
                data.save_atomically(state, os.path.join(cfg["out_dir"], "best.pt"))
            if raw.method == "arcface" and (improved or val_split is None):
                # the trained backbone as an official checkpoint: `arch: .../backbone.pth` freezes it elsewhere
                data.save_atomically(official_backbone_state(raw.vit), os.path.join(cfg["out_dir"], "backbone.pth"))
            tracker.log_metrics(stats, epoch)
        epoch_times.append(time.perf_counter() - epoch_start)
        steady = epoch_times[1:] or epoch_times  # a process's first epoch compiles and warms up
        eta = (cfg["epochs"] - epoch - 1) * statistics.median(steady)  # the median passes over a slow validation
        val_text = f"val EER {stats['val_eer']:.4f} AUC {stats['val_auc']:.4f}{' *' if improved else ''} | " \
            if master and val_split is not None else ""
        log(f"epoch {epoch + 1}/{cfg['epochs']} | loss {stats['loss']:.4f} | {val_text}"
            f"{images_per_s:.0f} img/s | peak mem {stats['peak_memory_gb']:.2f} GB | "
            f"{format_seconds(epoch_times[-1])}/epoch, ETA {format_seconds(eta)}", flush=True)
        stop = torch.tensor(float(budget is not None and time.perf_counter() - run_start + 1.1 * max(steady)
                                  > budget), device=device)
        if ddp:
            dist.broadcast(stop, 0)  # every rank stops together, on rank 0's clock
        if stop.item() and epoch + 1 < cfg["epochs"]:
            log(f"time budget {args.time_budget}: stopping before epoch {epoch + 2} would pass it; "
                f"continue with --resume auto (or --resume {cfg['out_dir']}/last.pt)")
            break
    check_ranks_agree(raw, ddp, world, log)
    tracker.finish()


def log_validation_figures(tracker, raw, val, val_images, val_split, device, epoch):
    """The validation ROC and score histograms and, for the prompt methods, the explanation of one fixed
    validation twin pair, so a run can be watched in the tracker."""
    tracker.log_image("val_roc", evaluate.roc_figure(val["scores"], val["kind"], f"validation, epoch {epoch + 1}"),
                      epoch)
    if raw.method != "arcface":
        a, b, _ = cam.pick_pairs(val_split, 1)[0]  # the first twin-impostor pair of the protocol
        _, figure = cam.pair_figure(raw, val_images[a], val_images[b], val_split.paths[a], val_split.paths[b],
                                    val["threshold"], cam.shown(raw, 3), device)
        tracker.log_image("val_explanation", figure, epoch)


def rank0_first(make, ddp):
    """make() on rank 0, then on the others: one process downloads or decodes, the rest read its result."""
    if not ddp:
        return make()
    if dist.get_rank() == 0:
        result = make()
    dist.barrier()
    if dist.get_rank() != 0:
        result = make()
    dist.barrier()
    return result


def check_ranks_agree(raw, ddp, world, log):
    """Every rank must end with the same trainable weights; a silent DDP fault would break this."""
    flat = torch.cat([p.detach().float().flatten() for p in raw.parameters() if p.requires_grad])
    if not ddp:
        return
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, dist.ReduceOp.MIN)
    dist.all_reduce(hi, dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise SystemExit(f"trainable weights differ across ranks (max gap {(hi - lo).max().item():.3g})")
    log(f"trainable weights identical on all {world} ranks ({flat.numel():,} values)")


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


def benchmark(train_step, batches, device, precision, use_compile, world, log, n_trainable, warmup=5, steps=20):
    """Steady-state images/s and where the step time goes; under DDP also what the gradient all-reduce
    costs alone (DDP runs it inside backward)."""
    epoch_batches = batches.epoch(0)
    # compilation and allocator warm-up, not timed, on every batch size the epoch holds (batches holding
    # the triplet family are larger): torch.compile builds a graph per size
    warm = list({len(idx): idx for idx in epoch_batches}.values())
    n_warm = torch.tensor(len(warm) + warmup, device=device)
    if world > 1:  # every rank takes as many steps: DDP reduces gradients in each
        dist.all_reduce(n_warm, dist.ReduceOp.MAX)
    for i in range(n_warm.item()):
        train_step(warm[i] if i < len(warm) else epoch_batches[i % len(epoch_batches)])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer, images, start = PhaseTimer(device), 0, time.perf_counter()
    for i in range(steps):
        idx = epoch_batches[(warmup + i) % len(epoch_batches)]
        timer.mark("start")
        train_step(idx, timer)
        images += len(idx)
    elapsed = time.perf_counter() - start
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    total = sum(v for k, v in timer.totals.items() if k != "start")
    shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in timer.totals.items() if k != "start")
    log(f"benchmark on {name} x{world} process(es), {precision}, compile {'on' if use_compile else 'off'}:\n"
        f"  {images / elapsed:.1f} images/s per process, {images * world / elapsed:.1f} in all "
        f"(batch {images // steps})\n  step time: {shares}\n  peak memory: {peak_memory_gb(device):.2f} GB")
    if world > 1:
        grads = torch.zeros(n_trainable, device=device)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            dist.all_reduce(grads)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        per_step = (time.perf_counter() - start) / steps
        log(f"  gradient all-reduce alone ({n_trainable:,} values): {1000 * per_step:.1f} ms per step, "
            f"{100 * per_step * steps / elapsed:.0f}% of the step time")


if __name__ == "__main__":
    status = main()
    if dist.is_initialized():
        # DDP sits in a reference cycle that holds the process group: free it now, not while Python shuts down
        gc.collect()
        dist.destroy_process_group()
    sys.exit(status)
