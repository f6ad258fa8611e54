"""Measuring: speed and memory figures that print numbers (not tests). train.py hands its training step to the
preflight (`--check`), the benchmark (`--benchmark`) and the largest-batch search (`batch_size: auto`) here.

    python bench.py memory --cfg configs/t4x2.yaml      # peak training memory per process, estimated without a GPU
    python bench.py scoring [--arch FILE]               # encode 100 images vs score 10,000 pairs
    python bench.py data --data DIR | ddp [--cfg FILE]  # cache + device augmentation vs DataLoader; DDP vs one process
"""
import argparse
import functools
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist

import data
import evaluate
import model
import synth
from config import MODEL_KEYS, load_config
from devices import autocast, named_gpu, peak_memory_gb
from errors import UserError, run_cli
from model import Encoding, PromptCamVerifier, ViT, ViTConfig, load_vit
from progress import format_seconds


# ---------------------------------------------------------------- the training step (train.py hands it over)

def probe_step(raw, images, labels, n, device, precision, gen):
    """Forward and backward of a training batch of n images, its gradients dropped: no state of the run changes."""
    try:
        x = data.augment(images[:n].to(device), gen)
        with autocast(device, precision):
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


def auto_batch_size(raw, images, labels, K, device, precision, log):
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


def preflight(run, train_step, budget, steps=3):
    """--check: a few of train.py's training steps at the config's batch size on this device, then what the whole run
    needs: speed, peak memory per process (measured on a GPU; on a CPU estimated, before the steps) against the GPU it
    is meant for, and wall time against the time budget. A UserError when the batch would not fit."""
    cfg, procs, device = run.cfg, run.procs, run.procs.device
    if device.type != "cuda":
        report_memory(run, *estimated_memory(run))
    try:
        seconds, images, _ = time_steps(train_step, data.batches_on(procs.device, run.batches.epoch(0)), procs,
                                        warmup=1, steps=steps)
    except torch.OutOfMemoryError:
        raise UserError(f"batch_size {cfg['batch_size']} does not fit {torch.cuda.get_device_name(device)}: a training "
                        f"step ran out of memory; lower batch_size (or try --batch_size auto)") from None
    val_seconds = time.perf_counter()
    if procs.master and run.train_set.val_split is not None:
        evaluate.validate(run.raw, run.train_set.val_images, run.train_set.val_split, device, procs.precision)
    val_seconds = time.perf_counter() - val_seconds
    wall = ((cfg["epochs"] * len(run.batches) - run.step) * seconds / steps
            + (cfg["epochs"] - run.first_epoch) * val_seconds)
    n_train = sum(p.numel() for p in run.raw.parameters() if p.requires_grad)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU"
    procs.log(f"check: {n_train:,} trainable parameters; on {name}: {1000 * seconds / steps:.0f} ms a step, "
              f"{images * procs.world / seconds:.1f} images/s, validation {val_seconds:.2f} s")
    if cfg["folds"]:  # K folds of (K - 1) / K of the families each, then the final run on all of them
        wall *= cfg["folds"]
    what = (f"the cross-validation ({cfg['folds']} folds and the final run, up to {cfg['epochs']} epochs each)"
            if cfg["folds"] else
            f"the whole run ({cfg['epochs'] - run.first_epoch} epochs of {len(run.batches)} steps)")
    procs.log(f"check: {what} takes about {format_seconds(wall)} here" + (
        f", {math.ceil(wall / budget)} session(s) of the time budget {format_seconds(budget)}" if budget else ""))
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
    cfg = run.cfg
    capacity, precision = named_gpu(cfg)
    shape = {k: v for k, v in asdict(run.raw.vit.cfg).items() if k != "img_size"}
    batch = max(len(idx) for idx in run.batches.epoch(0))
    peak = sum(training_memory(cfg, shape, capacity, precision, batch, len(run.train_set.images))[0].values())
    return (peak + MEMORY_NOT_ESTIMATED, f"estimated for {precision} at batch {batch}: {peak:.2f} GiB and about "
            f"{MEMORY_NOT_ESTIMATED:.1f} for CUDA's context, NCCL and the allocator's reserve", capacity,
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


def benchmark(run, train_step, steps, warmup=5):
    """--benchmark: steady-state images/s of train.py's training step and where its time goes; under DDP also what
    the gradient all-reduce costs alone (DDP runs it inside backward)."""
    procs, device = run.procs, run.procs.device
    elapsed, images, timer = time_steps(train_step, data.batches_on(procs.device, run.batches.epoch(0)), procs,
                                        warmup, steps)
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


# ---------------------------------------------------------------- bench.py's own figures

def scoring(args):
    """Encoding runs every block on every token; a pair costs two prompt rows through the last block."""
    torch.manual_seed(0)
    if args.arch:
        vit = load_vit(args.arch, args.img_size)
    else:  # a ViT-S/14-shaped backbone with random weights: the cost is the architecture's, not the weights'
        vit = ViT(ViTConfig(embed_dim=384, depth=args.depth, patch_size=14, num_registers=4, layerscale=True,
                            img_size=args.img_size))
        vit.fingerprint = "random"
    model = PromptCamVerifier(vit, num_classes=10).eval()
    images = torch.randn(100, 3, args.img_size, args.img_size)
    a, b = torch.triu_indices(100, 100, 1)
    pick = torch.randperm(len(a), generator=torch.Generator().manual_seed(0))[:10_000]
    with torch.no_grad():
        model.encode(images[:8])  # warm-up
        t0 = time.perf_counter()
        enc = Encoding.cat([model.encode(images[i:i + 25]) for i in range(0, 100, 25)])
        t1 = time.perf_counter()
        model.score_pairs(enc, a[pick], b[pick])
        t2 = time.perf_counter()
    cfg = vit.cfg
    print(f"backbone D={cfg.embed_dim} depth={cfg.depth} patch={cfg.patch_size} at {cfg.img_size}px "
          f"({vit.grid ** 2} patches), CPU, {torch.get_num_threads()} threads")
    print(f"  encode 100 images:          {t1 - t0:7.3f} s")
    print(f"  score 10,000 pairs (cache): {t2 - t1:7.3f} s  = {100 * (t2 - t1) / (t1 - t0):.1f}% of encoding")


def data_loading(args):
    """Images/s of cache indexing + device augmentation against decoding JPEGs in a DataLoader."""
    split = data.load_split(os.path.join(args.data, "train_info.json"), os.path.join(args.data, "train_pairs.json"))
    cache = data.build_cache(split.paths, args.size, os.path.join(args.data, "cache"), verbose=False)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(cache), generator=gen)
    bs = args.batch_size

    def from_cache(augment):
        for i in range(args.batches):
            batch = cache[order[(i * bs) % (len(cache) - bs):][:bs]]
            if augment:
                data.augment(batch, gen)

    class Decoding(torch.utils.data.Dataset):
        def __len__(self):
            return len(split.paths)

        def __getitem__(self, i):
            return data.load_image(split.paths[i], args.size)

    loader = torch.utils.data.DataLoader(Decoding(), batch_size=bs, shuffle=True, num_workers=os.cpu_count(),
                                         persistent_workers=True, drop_last=True)

    def from_loader(augment):
        done = 0
        while done < args.batches:
            for batch in loader:
                if augment:
                    data.augment(batch, gen)
                done += 1
                if done == args.batches:
                    break

    print(f"{args.size}px, batch {bs}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} loader workers")
    for augment in (False, True):
        rates = []
        for run in (from_cache, from_loader):
            run(augment)  # warm-up: worker start, allocator
            t = time.perf_counter()
            run(augment)
            rates.append(args.batches * bs / (time.perf_counter() - t))
        what = "with augmentation" if augment else "batches only     "
        print(f"{what}: cache indexing {rates[0]:8.0f} images/s, PIL-decoding DataLoader {rates[1]:6.0f} images/s, "
              f"ratio {rates[0] / rates[1]:.1f}x")


def ddp(args):
    """Training images/s per process with one thread each on CPU: one process alone, two independent
    processes at once (what two busy cores cost without any communication), and DDP on two processes.
    Rounds alternate so that a slow spell of the machine falls on all three; medians are compared."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    train_py = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
    train = [train_py, "--cfg", args.cfg, "--benchmark", str(args.steps)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

    def per_process(*commands):
        """Start the commands at once; the images/s per process that each printed."""
        procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in commands]
        rates = []
        for command, proc in zip(commands, procs):
            output = proc.communicate()[0]
            found = re.search(r"([\d.]+) images/s per process", output)
            if proc.returncode or not found:
                raise SystemExit(f"{' '.join(command)} failed (exit {proc.returncode}):\n{output[-2000:]}")
            rates.append(float(found.group(1)))
        return rates

    print(f"{args.cfg}, {args.steps} timed steps, 1 thread per process, {os.cpu_count()} CPU cores")
    alone, pair, distributed = [], [], []
    for r in range(args.rounds):
        alone += per_process([sys.executable, *train])
        pair += per_process([sys.executable, *train], [sys.executable, *train])
        distributed += per_process(torchrun + train)
        print(f"round {r + 1}: alone {alone[-1]:.1f} | two independent {pair[-2]:.1f} {pair[-1]:.1f} | "
              f"DDP {distributed[-1]:.1f} images/s per process", flush=True)
    base = statistics.median(alone)
    print(f"median images/s per process: alone {base:.1f}, "
          + ", ".join(f"{name} {statistics.median(x):.1f} ({100 * (statistics.median(x) / base - 1):+.0f}%)"
                      for name, x in (("two independent", pair), ("DDP", distributed))))


def nd_twin_training_images(cfg):
    """How many of ND TWIN's 6,182 training images train, and so sit in the GPU's cache: the real split's shape
    (tests/fixtures/nd_twin_split_structure.json) with the config's validation families held out as train.py does."""
    split = data.split_of(*synth.synth_structure("real", synth.REAL_STRUCTURE)["train"])
    train_split, _ = data.validation_split(split, cfg)
    return len(train_split.paths)


def largest_batch_images(cfg):
    """The most images a training batch holds: its families of two, one of them ND TWIN's triplet (K images more)."""
    K = cfg["images_per_person"]
    return max(1, cfg["batch_size"] // (2 * K)) * 2 * K + K


def saved_bytes(model, batch, precision, img_size):
    """Bytes autograd keeps for backward from one training forward of `batch` random images, parameters aside
    (they are counted once, as weights): every saved tensor's storage, counted once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device("cpu"), precision):
        model.loss_terms(model(x), torch.arange(batch) % 8)
    return sum(seen.values())


def per_image_and_fixed(model, precision, img_size):
    one, two = (saved_bytes(model, b, precision, img_size) for b in (1, 2))
    return two - one, 2 * one - two


def arch_shape(cfg):
    """The backbone's shape by its name: what the memory estimate needs, with no weights at hand."""
    if cfg["arch"] not in model.ARCH_SHAPES:
        raise UserError(f"arch {cfg['arch']!r}: the estimate needs a backbone by name "
                        f"({', '.join(model.ARCH_SHAPES)}); "
                        f"for a checkpoint file, `python train.py --cfg ... --check` reads its shape")
    return model.named_shape(cfg["arch"])


def config_model(cfg, shape, embed_dim=None):
    """The verifier a config trains, with fresh weights; embed_dim narrows it (same depth, tokens and method)."""
    vit = model.random_vit(cfg["arch"], cfg["img_size"], **{**shape, **({"embed_dim": embed_dim} if embed_dim else {})})
    return model.build_verifier(vit, cfg["img_size"], 8, cfg["deep_prompts"], cfg["train_blocks"],
                                **{k: cfg[k] for k in ("method", "margin", "scale", "trait_prompts")})


@functools.lru_cache(maxsize=None)
def backward_bytes(model_key, shape_items, precision):
    """(bytes saved per image, bytes saved per step, parameters, trainable parameters) of a model: measured on this
    CPU for the exact model in fp32, scaled to 16 bits by the ratios a narrow twin of it (embed 128) shows under bf16
    autocast (fp16 saves the same sizes; the 16-bit copies of weights grow with the square of the width)."""
    cfg, shape = dict(zip(MODEL_KEYS, model_key)), dict(shape_items)
    torch.manual_seed(0)
    full = config_model(cfg, shape).train()
    per_image, fixed = per_image_and_fixed(full, "fp32", cfg["img_size"])
    if precision in ("fp16", "bf16"):
        narrow = config_model(cfg, shape, embed_dim=128).train()
        narrow_fp32, narrow_fixed32 = per_image_and_fixed(narrow, "fp32", cfg["img_size"])
        narrow_16, narrow_fixed16 = per_image_and_fixed(narrow, "bf16", cfg["img_size"])
        per_image, fixed = (per_image * narrow_16 / narrow_fp32, fixed * narrow_16 / narrow_fp32
                            + max(0, narrow_fixed16 - narrow_fixed32) * (shape["embed_dim"] / 128) ** 2)
    return (per_image, fixed, sum(p.numel() for p in full.parameters()),
            sum(p.numel() for p in full.parameters() if p.requires_grad))


def training_memory(cfg, shape, gpu_gib=None, precision=None, batch=None, cache_images=None):
    """Estimated peak training memory per process in GiB, by part: weights (fp32), gradients and AdamW's two moments
    of what trains (fp32), the image cache when it would sit on the GPU, and what autograd saves for backward
    (backward_bytes) at the largest batch, a third more for backward's transient buffers. batch and cache_images
    default to ND TWIN's (largest_batch_images, nd_twin_training_images). Not counted: CUDA's context, NCCL's
    buffers and what the allocator holds beyond its peak (MEMORY_NOT_ESTIMATED)."""
    per_image, fixed, n_all, n_train = backward_bytes(tuple(cfg[k] for k in MODEL_KEYS), tuple(sorted(shape.items())),
                                                      precision)
    cache = (cache_images or nd_twin_training_images(cfg)) * 3 * cfg["img_size"] ** 2
    on_gpu = data.cache_on_gpu(cfg["cache_device"], cache, gpu_gib and gpu_gib * 2**30)
    parts = {"weights": 4 * n_all, "gradients and AdamW": 12 * n_train, "image cache": cache if on_gpu else 0,
             "saved for backward": (fixed + per_image * (batch or largest_batch_images(cfg))) * 4 / 3}
    return {k: v / 2**30 for k, v in parts.items()}, n_train


# What the estimate leaves out, and about how much it is on the GPUs of the configs (GiB): CUDA's context with its
# kernels, NCCL's buffers under DDP, and what the allocator reserves beyond the peak it hands out.
MEMORY_NOT_ESTIMATED = 1.0


def memory(args):
    """Peak training memory per process of a config, estimated with no GPU, no data and no weights."""
    cfg = load_config(args.cfg, {})
    gpu_gib, precision = named_gpu(cfg)
    n_images = nd_twin_training_images(cfg)
    parts, n_train = training_memory(cfg, arch_shape(cfg), gpu_gib, precision, cache_images=n_images)
    total = sum(parts.values())
    print(f"{' + '.join(args.cfg)}: {cfg['method']}, {cfg['arch']} at {cfg['img_size']} px, batch {cfg['batch_size']} "
          f"per process (up to {largest_batch_images(cfg)} with the triplet family), {precision}, train_blocks "
          f"{cfg['train_blocks']} ({n_train:,} trainable parameters; {n_images:,} images train)")
    for name, gib in parts.items():
        print(f"  {name:<22} {gib:6.2f} GiB")
    target = f"{cfg['gpu']}: {gpu_gib:.1f} GiB" if gpu_gib else "no `gpu` in the config"
    print(f"  {'estimated peak':<22} {total:6.2f} GiB per process ({target}), plus about {MEMORY_NOT_ESTIMATED:.1f} "
          f"GiB not estimated: CUDA's context, NCCL's buffers, the allocator's reserve; --check measures all of it")
    return 1 if gpu_gib and total + MEMORY_NOT_ESTIMATED > gpu_gib else 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scoring")
    s.add_argument("--arch", help="a backbone checkpoint; default: a ViT-S/14-shaped random backbone")
    s.add_argument("--img-size", type=int, default=224)
    s.add_argument("--depth", type=int, default=12)
    d = sub.add_parser("data")
    d.add_argument("--data", required=True, help="a folder made by `python synth.py`")
    d.add_argument("--size", type=int, default=112)
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--batches", type=int, default=20)
    m = sub.add_parser("memory")
    m.add_argument("--cfg", action="append", required=True, help="a training config; repeat to layer files")
    g = sub.add_parser("ddp")
    g.add_argument("--cfg", default="configs/cpu_demo.yaml", help="a training config whose data exists")
    g.add_argument("--rounds", type=int, default=6)
    g.add_argument("--steps", type=int, default=60, help="timed steps per run")
    args = ap.parse_args(argv)
    return {"scoring": scoring, "data": data_loading, "ddp": ddp, "memory": memory}[args.command](args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
