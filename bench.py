"""Speed and memory figures that print numbers (not tests); training-step figures come from `train.py --benchmark`.

    python bench.py memory --cfg configs/t4x2.yaml      # peak training memory per process, estimated without a GPU
    python bench.py scoring [--arch FILE]               # encode 100 images vs score 10,000 pairs
    python bench.py data --data DIR | ddp [--cfg FILE]  # cache + device augmentation vs DataLoader; DDP vs one process
"""
import argparse
import functools
import os
import re
import statistics
import subprocess
import sys
import time

import torch

import data
import evaluate
import model
from errors import UserError, run_cli
from model import Encoding, PromptCamVerifier, ViT, ViTConfig, load_vit


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
    images, pairs = data.synth_structure("real", data.REAL_STRUCTURE)["train"]
    ids = sorted(images)
    index = {pid: i for i, pid in enumerate(ids)}
    split = data.Split(ids, [f for pid in ids for f in images[pid]],
                       torch.tensor([index[pid] for pid in ids for _ in images[pid]]),
                       data.twin_families(len(ids), [(index[a], index[b]) for a, b in pairs]))
    train_split, _ = data.hold_out_families(split, 0 if cfg["full"] else cfg["val_families"], cfg["seed"])
    return len(train_split.paths)


def largest_batch(cfg):
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
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), evaluate.autocast(torch.device("cpu"), precision):
        model.loss_terms(model(x), torch.arange(batch) % 8)
    return sum(seen.values())


def per_image_and_fixed(model, precision, img_size):
    one, two = (saved_bytes(model, b, precision, img_size) for b in (1, 2))
    return two - one, 2 * one - two


def arch_shape(cfg):
    """The backbone's shape by its name: what the memory estimate needs, with no weights at hand."""
    if cfg["arch"] not in model.ARCH_SHAPES:
        raise UserError(f"arch {cfg['arch']!r}: the estimate needs a backbone by name ({', '.join(model.ARCH_SHAPES)}); "
                        f"for a checkpoint file, `python train.py --cfg ... --check` reads its shape")
    return model.named_shape(cfg["arch"])


def config_model(cfg, shape, embed_dim=None):
    """The verifier a config trains, with fresh weights; embed_dim narrows it (same depth, tokens and method)."""
    shape = {**shape, "embed_dim": embed_dim or shape["embed_dim"]}
    vit = ViT(ViTConfig(img_size=cfg["img_size"], **shape))
    vit.init_weights(torch.Generator().manual_seed(0))
    vit.family, vit.fingerprint = "dinov2", "random"
    return model.build_verifier(vit, cfg["img_size"], 8, cfg["deep_prompts"], cfg["train_blocks"], cfg["method"],
                                cfg["margin"], cfg["scale"], cfg["trait_prompts"])


MODEL_KEYS = ("img_size", "deep_prompts", "train_blocks", "method", "margin", "scale", "trait_prompts")


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
    default to ND TWIN's (largest_batch, nd_twin_training_images). Not counted: CUDA's context, NCCL's buffers and
    what the allocator holds beyond its peak (MEMORY_NOT_ESTIMATED)."""
    per_image, fixed, n_all, n_train = backward_bytes(tuple(cfg[k] for k in MODEL_KEYS), tuple(sorted(shape.items())),
                                                      precision)
    cache = (cache_images or nd_twin_training_images(cfg)) * 3 * cfg["img_size"] ** 2
    on_gpu = cfg["cache_device"] == "cuda" or (cfg["cache_device"] == "auto" and gpu_gib and cache < 0.25 * gpu_gib * 2**30)
    parts = {"weights": 4 * n_all, "gradients and AdamW": 12 * n_train, "image cache": cache if on_gpu else 0,
             "saved for backward": (fixed + per_image * (batch or largest_batch(cfg))) * 4 / 3}
    return {k: v / 2**30 for k, v in parts.items()}, n_train


# What the estimate leaves out, and about how much it is on the GPUs of the configs (GiB): CUDA's context with its
# kernels, NCCL's buffers under DDP, and what the allocator reserves beyond the peak it hands out.
MEMORY_NOT_ESTIMATED = 1.0


def memory(args):
    """Peak training memory per process of a config, estimated with no GPU, no data and no weights."""
    import train
    cfg = train.load_config(args.cfg, {})
    gpu_gib, gpu_precision = train.GPUS.get(cfg["gpu"], (None, "fp32"))
    precision = gpu_precision if cfg["precision"] == "auto" else cfg["precision"]
    parts, n_train = training_memory(cfg, arch_shape(cfg), gpu_gib, precision)
    total = sum(parts.values())
    print(f"{' + '.join(args.cfg)}: {cfg['method']}, {cfg['arch']} at {cfg['img_size']} px, batch {cfg['batch_size']} "
          f"per process (up to {largest_batch(cfg)} with the triplet family), {precision}, train_blocks "
          f"{cfg['train_blocks']} ({n_train:,} trainable parameters; {nd_twin_training_images(cfg):,} images train)")
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
    d.add_argument("--data", required=True, help="a folder made by `python data.py synth`")
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
