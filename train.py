"""Train a twin verifier (method traits, promptcam or arcface) in one process or under torchrun's DDP.

    torchrun --nproc_per_node 2 train.py --cfg configs/t4x2.yaml   # or python train.py --cfg FILE [--cfg FILE ...]
    python train.py --resume ckpt/last.pt        # with any number of processes; --resume auto: this run's newest
    python train.py --cfg FILE --check           # or --benchmark [STEPS]: will it fit, how fast, before a long run
Any config key can be overridden as `--key value`. Each epoch writes out_dir/last.pt, and best.pt when it improves.
"""
import argparse
import functools
import gc
import inspect
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bench
import cam
import data
import evaluate
import folds
from checkpoints import hold_out_dir, refuse_to_overwrite, resume_from, save_atomically, save_training_state
from config import DEFAULTS, MODEL_KEYS, config_problems, load_config, parse_duration, parse_overrides
from devices import autocast, check_gpu_support, default_precision, peak_memory_gb, resolve_compile
from errors import UserError, refuse, run_cli
from model import build_verifier, official_backbone_state
from progress import Progress, format_seconds
from tracking import make_tracker


# ---------------------------------------------------------------- set-up: configuration, processes, data, model

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
    args.budget, args.started = parse_duration(args.time_budget) if args.time_budget else None, time.perf_counter()
    overrides = parse_overrides(rest)
    log = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)
    resume, cfg = None, load_config(args.cfg, overrides)
    if args.resume and not folds.cross_validation(cfg):  # a cross-validation finds each of its runs' checkpoints itself
        resume, cfg = resume_from(args.resume, args.cfg, overrides, log)
    problems = config_problems(cfg) + [p for key in ("out_dir", "cache_dir")
                                       for p in [data.unwritable(cfg[key], key)] if p]
    refuse(problems, "config")
    if not (args.benchmark or args.check) and os.environ.get("RANK", "0") == "0":
        args.lock = hold_out_dir(cfg["out_dir"])
        if resume is None:
            refuse_to_overwrite(cfg["out_dir"])
    return args, cfg, resume


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
    precision = default_precision(device) if cfg["precision"] == "auto" else cfg["precision"]
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
        leaks = data.shared_with_training(cfg["test_info"], split.ids, split.paths, cfg["path_remap"])
        if leaks:
            raise data.DataError(leaks, f"test split in {cfg['test_info']}")
    train_split, val_split = data.validation_split(split, cfg)
    if resume and resume.ckpt["class_ids"] != train_split.ids:
        raise UserError(f"{resume.path}: the training identities in {cfg['train_info']} differ from the checkpoint's")
    all_images = rank0_first(lambda: data.build_cache(split.paths, cfg["img_size"], cfg["cache_dir"], procs.master),
                             "reading or building the image cache")
    index = {p: i for i, p in enumerate(split.paths)}
    images = all_images[[index[p] for p in train_split.paths]]
    val_images = all_images[[index[p] for p in val_split.paths]] if val_split else None
    device = procs.device
    if device.type == "cuda":
        gpu_bytes = torch.cuda.get_device_properties(device).total_memory
        images = images.to(device) if data.cache_on_gpu(cfg["cache_device"], images.nbytes, gpu_bytes) else \
            images.pin_memory()
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
    val_scores: list = field(default_factory=list)  # each epoch's validation scores: a cross-validation pools them
    epoch_times: list = field(default_factory=list)  # seconds of each epoch saved in this session
    compiled: bool = False


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
    model_args = {**{k: cfg[k] for k in MODEL_KEYS}, "num_classes": len(train_set.split.ids)}
    raw = rank0_first(lambda: build_verifier(**model_args, weights_dir=cfg["weights_dir"] or None),
                      "loading the backbone's weights (downloaded on the first run)").to(procs.device)
    procs.log(raw.summary())
    K, batch_size = cfg["images_per_person"], cfg["batch_size"]
    if batch_size == "auto":
        batch_size = bench.auto_batch_size(raw, train_set.images, train_set.labels, K, procs.device, procs.precision,
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
    run.best_epoch, run.val_scores = ckpt.get("best_epoch"), ckpt.get("val_scores", [])
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
    time_step = functools.partial(bench.time_probe_step, raw, ts.images, ts.labels, n, procs.device, procs.precision)
    use_compile = torch.tensor(float(resolve_compile(run.cfg, procs.device, time_step, steps_left, procs.log)),
                               device=procs.device)
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


def start_tracking(run, parent=None):
    """The tracker the config names, continuing the checkpoint's tracker run when resuming (rank 0 only); under a
    cross-validation's parent run."""
    if run.procs.master:
        os.makedirs(run.cfg["out_dir"], exist_ok=True)
    tracker = make_tracker(run.cfg, run.tracker_run_id, run.procs.rank, parent)
    if run.procs.master and run.tracker_run_id is None:
        tracker.log_params(run.cfg)
    return tracker


# ---------------------------------------------------------------- the step and the epoch

def train_step(run, idx, timer=None):
    """One optimisation step on a batch of image indices (on the device: no copy from the host, no sync); the timer
    marks phases when benchmarking."""
    cfg, ts, device = run.cfg, run.train_set, run.procs.device
    x, y = ts.images[idx.to(ts.images.device)].to(device, non_blocking=True), ts.labels[idx]
    timer and timer.mark("data")
    x = data.augment(x, run.augment_rng, cfg["hflip"])
    timer and timer.mark("augmentation")
    with autocast(device, run.procs.precision):
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
    """One pass over the epoch's family batches. Returns the epoch's figures: the mean loss over every rank, the
    learning rate, images/s and peak memory."""
    procs, epoch_batches = run.procs, data.batches_on(run.procs.device, run.batches.epoch(epoch))
    started = time.perf_counter()
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
    seconds = time.perf_counter() - started
    if procs.ddp:
        dist.all_reduce(loss_sum)
    if not loss_sum.isfinite():  # on every rank: the sum holds every rank's losses
        stop_diverged(run, epoch, *diverged.tolist())
    return {"loss": loss_sum.item() / len(epoch_batches) / procs.world, "lr": run.schedule.get_last_lr()[0],
            "images_per_s": sum(len(b) for b in epoch_batches) * procs.world / seconds,
            "peak_memory_gb": peak_memory_gb(procs.device)}


def stop_diverged(run, epoch, step, loss, what="the loss"):
    """A non-finite loss or validation score ends the run before anything of the epoch is saved."""
    lr = run.cfg["lr"]
    where = f"at step {int(step) + 1} " if step >= 0 else ""  # another rank's loss when this rank saw none
    raise UserError(f"{what} is {'not finite' if step < 0 else loss} {where}in epoch {epoch + 1}: training diverged, "
                    f"and nothing of this epoch was saved. Train again with a lower learning rate (lr {lr:g}, e.g. "
                    f"--lr {lr / 10:g}) or --precision fp32")


# ---------------------------------------------------------------- validate and save

def validate(run, epoch):
    """The validation EER and AUC on rank 0 ({} with no families held out); the best epoch and its threshold move
    when it improves; the tracker gets the figures every log_images_every epochs."""
    cfg, procs, ts = run.cfg, run.procs, run.train_set
    if not procs.master or ts.val_split is None:
        return {}
    val = evaluate.validate(run.raw, ts.val_images, ts.val_split, procs.device, procs.precision)
    if not np.isfinite(val["scores"]).all():
        stop_diverged(run, epoch, -1, None, "a validation score")
    run.val_scores.append(torch.from_numpy(val["scores"]))
    if val["eer"] < run.best_eer:
        run.best_eer, run.threshold, run.best_epoch = val["eer"], val["threshold"], epoch
    every = cfg["log_images_every"]
    if run.tracker.kind != "none" and every and ((epoch + 1) % every == 0 or epoch + 1 == cfg["epochs"]):
        log_validation_figures(run.tracker, run.raw, val, ts.val_images, ts.val_split, procs.device, epoch)
    return {"val_eer": val["eer"], "val_auc": val["auc"]}


def save_checkpoints(run, epoch, stats):
    """Every rank's random state gathered; rank 0 writes last.pt (the previous one kept as previous.pt), best.pt
    when validation improved (this epoch is the best), and arcface's trained backbone; the tracker gets the epoch's
    figures."""
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
             "best_eer": run.best_eer, "best_epoch": run.best_epoch, "threshold": run.threshold,
             "val_scores": run.val_scores,
             "val": {k: v for k, v in stats.items() if k.startswith("val")}, "tracker_run_id": run.tracker.run_id}
    out_dir, improved = run.cfg["out_dir"], run.best_epoch == epoch
    save_training_state(state, out_dir, best=improved)
    if raw.method == "arcface" and (improved or run.train_set.val_split is None):
        # the trained backbone as an official checkpoint: `arch: .../backbone.pth` freezes it elsewhere
        save_atomically(official_backbone_state(raw.vit), os.path.join(out_dir, "backbone.pth"))
    run.tracker.log_metrics(stats, epoch)


def log_epoch(run, epoch, stats):
    cfg = run.cfg
    val_text = (f"val EER {stats['val_eer']:.4f} AUC {stats['val_auc']:.4f}{' *' if run.best_epoch == epoch else ''} | "
                if "val_eer" in stats else "")
    run.procs.log(f"epoch {epoch + 1}/{cfg['epochs']} | loss {stats['loss']:.4f} | {val_text}"
                  f"{stats['images_per_s']:.0f} img/s | peak mem {stats['peak_memory_gb']:.2f} GB | "
                  f"{format_seconds(run.epoch_times[-1])}/epoch, "
                  f"ETA {format_seconds(eta_seconds(run.epoch_times, cfg['epochs'] - epoch - 1))}")


def eta_seconds(epoch_times, epochs_left):
    """Seconds left at the median pace of the epochs after the first (which compiles and warms up), so neither a
    compile epoch nor one slow validation inflates it."""
    steady = epoch_times[1:] or epoch_times
    return epochs_left * statistics.median(steady) if steady else 0.0


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


# ---------------------------------------------------------------- finish

def out_of_time(run, epoch, args, resume_line):
    """With a time budget: stop, checkpoint saved, before the next epoch would pass it (rank 0's clock decides)."""
    procs, budget = run.procs, args.budget
    steady = run.epoch_times[1:] or run.epoch_times
    stop = torch.tensor(float(budget is not None and time.perf_counter() - args.started + 1.1 * max(steady) > budget),
                        device=procs.device)
    if procs.ddp:
        dist.broadcast(stop, 0)
    if not stop.item() or epoch + 1 == run.cfg["epochs"]:
        return False
    procs.log(f"time budget: stopping before epoch {epoch + 2} would pass it. Continue with the same line and "
              f"--resume auto:\n  {resume_line}")
    return True


def resume_command(argv, procs):
    """The command line that started this run, with --resume auto: the one line for every later session."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--resume" in argv:
        del argv[argv.index("--resume"):argv.index("--resume") + 2]
    argv = [a for a in argv if not a.startswith("--resume=")] + ["--resume", "auto"]
    launcher = f"torchrun --nproc_per_node {procs.world}" if procs.ddp else "python"
    return " ".join([launcher, "train.py", *argv])


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


def finish(run, stopped_early):
    """Ranks checked to agree, the tracker closed, and a summary with the commands a user types next."""
    check_ranks_agree(run.raw, run.procs)
    if run.tracker:
        run.tracker.finish()
    procs, cfg, out_dir = run.procs, run.cfg, run.cfg["out_dir"]
    if run.first_epoch >= cfg["epochs"]:
        procs.log(f"all {cfg['epochs']} epochs were done already in {out_dir}; to train longer, resume with --epochs N")
    best = (f"best epoch {run.best_epoch + 1}, validation EER {run.best_eer:.4f}, threshold {run.threshold:+.4f}"
            if run.best_epoch is not None else f"the out-of-fold threshold {run.threshold:+.4f}" if run.threshold
            is not None else "no validation (val_families: 0): give evaluate.py --threshold, or train with --folds K")
    ended = "stopped early" if stopped_early else "done"
    if cfg["folds"] and cfg["fold"] < cfg["folds"]:  # a fold: its cross-validation goes on
        procs.log(f"fold {cfg['fold'] + 1} of {cfg['folds']} {ended}: {best}")
        return
    pair = cam.example_pair(cfg)
    procs.log(f"{ended}: {best}\n" + (f"  {os.path.join(out_dir, 'best.pt')}: the best epoch\n" if run.best_epoch
                                      is not None else "") + f"  {os.path.join(out_dir, 'last.pt')}: the last "
              f"epoch\nnext:\n  python evaluate.py --ckpt {out_dir} --out eval\n"
              + (f"  python cam.py {pair[0]} {pair[1]} --ckpt {out_dir}\n"
                 f"  python cam.py --pairs test --n 16 --ckpt {out_dir} --out cam_gallery"
                 if run.raw.has_maps else f"  python cam.py {pair[0]} {pair[1]} --ckpt {out_dir}   # the score alone"))


# ---------------------------------------------------------------- a run, start to end

def train_run(args, cfg, resume, procs, argv=None, parent=None, threshold=None):
    """One run from its config to its last epoch (or --check, --benchmark): set-up, then per epoch train, validate,
    save. True when the time budget stopped it. threshold: a cross-validation's, for its final run."""
    train_set = load_train_set(cfg, procs, resume)
    run = start_run(cfg, train_set, procs, resume)
    step = functools.partial(train_step, run)
    if args.check or args.benchmark:
        bench.preflight(run, step, args.budget) if args.check else bench.benchmark(run, step, args.benchmark)
        return False
    if resume is None and threshold is not None:
        run.threshold = threshold
    run.tracker = start_tracking(run, parent)
    stopped_early = False
    try:
        for epoch in range(run.first_epoch, cfg["epochs"]):
            started = time.perf_counter()
            stats = train_epoch(run, epoch)
            stats.update(validate(run, epoch))
            save_checkpoints(run, epoch, stats)
            run.epoch_times.append(time.perf_counter() - started)
            log_epoch(run, epoch, stats)
            if out_of_time(run, epoch, args, resume_command(argv, procs)):
                stopped_early = True
                break
    except KeyboardInterrupt:
        saved = run.first_epoch + len(run.epoch_times)  # an epoch's time is kept once its checkpoint is written
        raise UserError(f"interrupted after epoch {saved}: " + (f"{cfg['out_dir']}/last.pt holds it" if saved else
                        "nothing was saved") + f"; continue with:\n  {resume_command(argv, procs)}") from None
    finish(run, stopped_early)
    return stopped_early


# ---------------------------------------------------------------- main

def main(argv=None):
    args, cfg, resume = configure(argv)
    procs = start_processes(cfg)
    if folds.cross_validation(cfg) and not (args.check or args.benchmark):
        folds.cross_validate(args, cfg, procs, functools.partial(train_run, argv=argv))
    else:  # --check and --benchmark of a cross-validation rehearse its final run, where every family trains
        train_run(args, folds.run_of(cfg, cfg["folds"]) if folds.cross_validation(cfg) else cfg, resume, procs, argv)


if __name__ == "__main__":
    status = run_cli(main)
    if dist.is_initialized():
        # DDP sits in a reference cycle that holds the process group: free it now, not while Python shuts down
        gc.collect()
        dist.destroy_process_group()
    sys.exit(status)
