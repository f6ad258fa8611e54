"""Speed and memory figures that print numbers (not tests); training-step figures come from `train.py --benchmark`.

    python bench.py scoring [--arch FILE] [--img-size 224] [--depth 12]  # encode 100 images vs score 10,000 pairs
    python bench.py data --data DIR [--size 112]                         # cache + device augmentation vs DataLoader
    python bench.py ddp [--cfg configs/cpu_demo.yaml] [--rounds 6]       # DDP on 2 CPU processes vs one alone
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

import torch

import data
from errors import run_cli
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
    g = sub.add_parser("ddp")
    g.add_argument("--cfg", default="configs/cpu_demo.yaml", help="a training config whose data exists")
    g.add_argument("--rounds", type=int, default=6)
    g.add_argument("--steps", type=int, default=60, help="timed steps per run")
    args = ap.parse_args(argv)
    {"scoring": scoring, "data": data_loading, "ddp": ddp}[args.command](args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
