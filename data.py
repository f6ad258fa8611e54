"""Data: the user's info files, a uint8 image cache, twin-family batches and on-device augmentation (the synthetic
twin set that stands in for the user's is made by synth.py)."""
import ctypes
import hashlib
import json
import math
import os
import random
import signal
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from checkpoints import save_atomically
from errors import UserError
from model import IMAGENET_MEAN, IMAGENET_STD
from progress import Progress

CACHE_VERSION = 1  # bump when decoding changes, so old caches are rebuilt


class DataError(UserError):
    """Bad input data; the message lists every problem found."""

    def __init__(self, problems, what="data"):
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} problem(s) with the {what}:\n  " + "\n  ".join(shown) + more)


# ---------------------------------------------------------------- info files

@dataclass
class Split:
    """One split: image paths with their person, and the twin families.

    paths[i] is image i, person[i] its index into ids; families are lists of person indices
    (twins, the triplet, or one person with no listed twin)."""
    ids: list
    paths: list
    person: torch.Tensor
    families: list

    def images_of(self):
        """Image indices of every person, in id order."""
        out = [[] for _ in self.ids]
        for i, p in enumerate(self.person.tolist()):
            out[p].append(i)
        return out

    def subset(self, family_indices):
        """The split restricted to some families, with ids and images renumbered."""
        keep = sorted(p for f in family_indices for p in self.families[f])
        new_index = {p: i for i, p in enumerate(keep)}
        images = [i for i, p in enumerate(self.person.tolist()) if p in new_index]
        return Split(ids=[self.ids[p] for p in keep], paths=[self.paths[i] for i in images],
                     person=torch.tensor([new_index[int(self.person[i])] for i in images]),
                     families=[[new_index[p] for p in self.families[f]] for f in family_indices])


def remap_path(path, path_remap):
    """'OLD=NEW' rewrites a leading OLD: info files list paths from the machine that made them."""
    if not path_remap:
        return path
    old, new = path_remap.split("=", 1)
    return new + path[len(old):] if path.startswith(old) else path


def read_json(path, what):
    """A JSON file, or a DataError naming it: missing, not JSON, or an object with a key twice (json.load would keep
    the last one silently, dropping a person's other list of images)."""
    try:
        with open(path) as f:
            return json.load(f, object_pairs_hook=lambda pairs: unique_keys(pairs, path, what))
    except FileNotFoundError:
        raise DataError([f"{path}: {what} file not found; {json_files_beside(path)}"]) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError([f"{path}: {what} file is not valid JSON ({e})"]) from None


def write_json(obj, path):
    """A JSON file written whole or not at all: a temporary beside it, then a rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def unique_keys(pairs, path, what):
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise DataError([f"{path}: {what} file has the key {key!r} twice; merge its lists into one"])
        seen.add(key)
    return dict(pairs)


def json_files_beside(path):
    """What a user with a renamed file needs to see: the .json files that are in the folder named."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist"
    found = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
    return f"{folder} holds {', '.join(found)}" if found else f"{folder} holds no .json file"


def check_path_remap(path_remap, paths, info_path):
    """Problems with 'OLD=NEW' itself, reported before the thousands of missing images it would cause."""
    if not path_remap:
        return []
    if "=" not in path_remap:
        return [f"path_remap {path_remap!r}: expected OLD=NEW"]
    old, new = path_remap.split("=", 1)
    problems = []
    if paths and not any(p.startswith(old) for p in paths):
        problems.append(f"path_remap: no image path in {info_path} starts with {old} (the first is {paths[0]})")
    if not os.path.isdir(new):
        problems.append(f"path_remap: the folder {new} does not exist")
    return problems


def load_split(info_path, pairs_path, path_remap=""):
    """Read and check `{id: [image paths]}` and `[[id, id], ...]`; raise once with every problem."""
    info = read_json(info_path, "info")
    pairs = read_json(pairs_path, "pairs")
    if not isinstance(info, dict) or not all(isinstance(v, list) for v in info.values()):
        raise DataError([f"{info_path}: expected an object {{id: [image paths]}}"])
    if not isinstance(pairs, list):
        raise DataError([f"{pairs_path}: expected a list of [id, id] pairs"])
    ids = sorted(info)
    problems, seen = check_path_remap(path_remap, [p for pid in ids for p in info[pid]], info_path), {}
    if not ids:
        problems.append(f"{info_path}: no people in it")
    if not pairs:
        problems.append(f"{pairs_path}: no twin pairs in it (the twin protocol needs at least one)")
    for pid in ids:
        if len(info[pid]) < 2:
            problems.append(f"{info_path}: id {pid} has {len(info[pid])} image(s); at least 2 are needed")
        for p in info[pid]:
            if p in seen:
                problems.append(f"{info_path}: {p} is listed twice (ids {seen[p]} and {pid})")
            seen[p] = pid
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            problems.append(f"{pairs_path}: {pair!r} is not a pair of two id strings")
            continue
        problems += [f"{pairs_path}: id {x} has no images in {info_path}" for x in pair if x not in info]
        if pair[0] == pair[1]:
            problems.append(f"{pairs_path}: {pair!r} pairs an id with itself")
    remapped = {pid: [remap_path(p, path_remap) for p in info[pid]] for pid in ids}
    missing = [(p, pid) for pid in ids for p in remapped[pid] if not os.path.isfile(p)]
    if len(missing) > 1:  # most likely the data lives elsewhere on this machine: say which line fixes that
        prefix = os.path.commonpath([p for p, _ in missing])
        if prefix.strip(os.sep):
            problems.append(f"{len(missing)} images under {prefix} are missing; if the data set is elsewhere on "
                            f"this machine, add to the config: path_remap: {prefix}=/where/it/is/now")
    problems += [f"{p}: image file not found (id {pid})" for p, pid in missing]
    if problems:
        raise DataError(problems, f"data in {info_path} / {pairs_path}")
    return split_of(remapped, pairs)


def split_of(images, pairs):
    """The Split of {id: [image paths]} and [[id, id], ...] taken as they are: checked by load_split, or a shape
    (synthetic twins, the real split's structure)."""
    ids = sorted(images)
    index = {pid: i for i, pid in enumerate(ids)}
    return Split(ids=ids, paths=[p for pid in ids for p in images[pid]],
                 person=torch.tensor([index[pid] for pid in ids for _ in images[pid]]),
                 families=twin_families(len(ids), [(index[a], index[b]) for a, b in pairs]))


def shared_with_training(test_info, train_ids, train_paths=(), path_remap=""):
    """Problems when test people or test images are also training ones: the test split would then report on what the
    model was trained on (an AUC of 1.0 that means nothing). Returns one line per kind, naming a few. train_paths as
    path_remap rewrote them."""
    info = read_json(test_info, "info")
    if not isinstance(info, dict):
        return []  # load_split says what is wrong with it
    shared_ids = sorted(set(info) & set(train_ids))
    test_paths = {remap_path(p, path_remap) for paths in info.values() if isinstance(paths, list) for p in paths
                  if isinstance(p, str)}
    shared_paths = sorted(test_paths & set(train_paths))
    return [f"{test_info}: {len(found)} {what} also in the training split ({', '.join(map(str, found[:3]))}"
            f"{', ...' if len(found) > 3 else ''}): test people must be unseen"
            for what, found in (("person id(s)", shared_ids), ("image path(s)", shared_paths)) if found]


def twin_families(n, pairs):
    """People 0..n-1 grouped by twin pairs (i, j) into families (pairs sharing a person merge: the triplet);
    each family's members sorted, families ordered by their first member."""
    parent = list(range(n))  # union-find

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[root(i)] = root(j)
    groups = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values())


def hold_out_families(split, n_val, seed):
    """(train, val): a seeded choice of whole twin families (twins first, so val has twin impostors)."""
    if n_val == 0:
        return split, None
    twin_families = [i for i, f in enumerate(split.families) if len(f) > 1]
    if n_val >= len(twin_families):
        raise UserError(f"val_families={n_val} leaves no twin family for training ({len(twin_families)} in all)")
    val = sorted(random.Random(seed).sample(twin_families, n_val))
    train = [i for i in range(len(split.families)) if i not in set(val)]
    return split.subset(train), split.subset(val)


def fold_families(split, folds, seed):
    """Every family's fold, 0..folds-1, whole families only: twin families and people with no listed twin are each
    shuffled (seeded) and dealt in turn, so every fold validates on twins and the folds differ by one family at most."""
    fold_of, rng = [0] * len(split.families), random.Random(seed)
    for group in ([i for i, f in enumerate(split.families) if len(f) > 1],
                  [i for i, f in enumerate(split.families) if len(f) == 1]):
        rng.shuffle(group)
        for turn, family in enumerate(group):
            fold_of[family] = turn % folds
    return fold_of


def validation_split(split, cfg):
    """(train, validation) of a run: fold `fold` of `folds` held out, every family for a cross-validation's final
    run (fold == folds), or else `val_families` families held out (None: no validation)."""
    if not cfg["folds"]:
        return hold_out_families(split, cfg["val_families"], cfg["seed"])
    if cfg["fold"] in (-1, cfg["folds"]):  # -1: the whole cross-validation, whose largest run is the final one
        return split, None
    n_twins = sum(len(f) > 1 for f in split.families)
    if n_twins < cfg["folds"]:
        raise UserError(f"folds {cfg['folds']}: {n_twins} twin families to deal, and every fold validates on twins; "
                        f"use fewer folds")
    fold_of = fold_families(split, cfg["folds"], cfg["seed"])
    return (split.subset([i for i, f in enumerate(fold_of) if f != cfg["fold"]]),
            split.subset([i for i, f in enumerate(fold_of) if f == cfg["fold"]]))


# ---------------------------------------------------------------- decoding and the cache

def load_image(path, size):
    """Any image file -> uint8 (3, size, size): RGB, centre-cropped to a square, resized (antialiased)."""
    return torch.from_numpy(decode_rgb(path, size)).permute(2, 0, 1)


def min_side(size):
    """The fewest pixels a side that can hold a face at a model input of size px: no more than 4x upsampling."""
    return max(16, size // 4)


def decode_rgb(path, size):
    """The decoding behind load_image, as a (size, size, 3) uint8 array."""
    with Image.open(path) as im:
        im = as_rgb(ImageOps.exif_transpose(im))
    w, h = im.size
    side = min(w, h)
    if side < min_side(size):
        raise UserError(f"{path}: {w}x{h} px is too small to hold a face at the model's {size}-px input (at least "
                        f"{min_side(size)} px a side)")
    im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    if all(lo == hi for lo, hi in im.getextrema()):
        raise UserError(f"{path}: one flat colour {im.getpixel((0, 0))}, no face (a blank or fully transparent "
                        f"picture?)")
    return np.asarray(im.resize((size, size), Image.BICUBIC)).copy()


def as_rgb(im):
    """The picture an image shows, as 8-bit RGB: 16-bit, 32-bit and float grey scaled to 8 bits (Pillow's own
    conversion clips them), transparency laid over white."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        x = np.asarray(im, dtype=np.float64)
        peak = float(x.max(initial=0))
        top = (65535 if im.mode.startswith("I;16") else 1 if im.mode == "F" and peak <= 1 else
               255 if peak <= 255 else 65535 if peak <= 65535 else peak)
        im = Image.fromarray((x.clip(0, None) * (255 / top)).round().clip(0, 255).astype(np.uint8), "L")
    if im.mode in ("LA", "PA", "RGBA", "La", "RGBa") or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


def image_side(path):
    """The side of the square crop load_image takes from this file, in its own pixels."""
    with Image.open(path) as im:
        return min(im.size)


def _decode(args):
    # numpy, not torch, crosses the process boundary: torch's shared-memory tensor passing can deadlock
    path, size = args
    try:
        return decode_rgb(path, size), None
    except UserError as e:
        return None, str(e)
    except Exception as e:  # collected, so every unreadable file is reported at once
        return None, f"{path}: cannot read image ({type(e).__name__}: {e})"


def end_with_parent(parent):
    """Worker initializer: a worker dies with the process that started it, however that one dies (Linux), instead of
    decoding on alone."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def worker_pool():
    """Every CPU core, each worker ending with this process."""
    return ProcessPoolExecutor(max_workers=os.cpu_count(), initializer=end_with_parent, initargs=(os.getpid(),))


def cache_file(paths, size, cache_dir):
    """Named by the files' paths, sizes and modification times, and the image size."""
    h = hashlib.sha256(f"v{CACHE_VERSION} {size}".encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"\n{p}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return os.path.join(cache_dir, f"images_{size}px_{h.hexdigest()[:16]}.pt")


def build_cache(paths, size, cache_dir, verbose=True):
    """Decode every image once (all CPU cores) into uint8 (N, 3, size, size), saved and reused."""
    path = cache_file(paths, size, cache_dir)
    if os.path.exists(path):
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # damaged on disk: it is only a cache, so rebuild it
            cached = None
            print(f"{path} is unreadable ({type(e).__name__}); rebuilding it", flush=True)
        if isinstance(cached, dict) and cached.get("paths") == list(paths) and cached.get("size") == size:
            return cached["images"]
        if cached is not None and verbose:
            print(f"{path} was made from other files; rebuilding it", flush=True)
    images = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    problems = []
    bar = Progress(len(paths), f"decoding {len(paths)} images at {size}px", enabled=verbose)
    with worker_pool() as pool:
        for i, (img, err) in enumerate(pool.map(_decode, [(p, size) for p in paths], chunksize=32)):
            if err:
                problems.append(err)
            else:
                images[i] = torch.from_numpy(img).permute(2, 0, 1)
            bar.update()
    if problems:
        raise DataError(problems, "images")
    save_atomically({"paths": list(paths), "size": size, "images": images}, path)
    return images


def cache_on_gpu(cache_device, cache_bytes, gpu_bytes):
    """Whether the training images sit on the GPU: cache_device cuda, or auto where they take under a quarter of its
    memory (the rest is training's); else they stay in (pinned) RAM."""
    return cache_device == "cuda" or (cache_device == "auto" and bool(gpu_bytes) and cache_bytes < 0.25 * gpu_bytes)


def unwritable(folder, key):
    """Why `folder` (a config key's or a flag's) could not be created or written to, or None; nothing is created."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return f"{key}: {folder} cannot be a folder: {probe} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{key}: {folder} is not writable ({probe} is not)"
    return None


def make_folder(folder, what):
    """Create a folder an entry point will write to, before its work starts, or say why it cannot be."""
    problem = unwritable(folder, what)
    if problem:
        raise UserError(problem)
    os.makedirs(folder, exist_ok=True)
    return folder


# ---------------------------------------------------------------- twin-family batches

class FamilyBatches:
    """Batches of whole twin families, K images per person, so each person's sibling is in the batch.

    A family contributes ceil(max images / K) units per epoch; a person's images are shuffled and
    taken cyclically, so every image is seen at least once per epoch. Units are shuffled and grouped
    F to a batch; the list is padded so every rank gets the same number of batches. The order is a
    function of (seed, epoch) alone, so resuming at an epoch boundary repeats nothing and skips nothing.
    """

    def __init__(self, split, images_per_person, families_per_batch, seed, rank=0, world=1):
        self.families, self.images_of = split.families, split.images_of()
        self.K, self.F, self.seed, self.rank, self.world = images_per_person, families_per_batch, seed, rank, world

    def rounds(self, family):
        """Units a family contributes per epoch: enough for its member with the most images."""
        return max(math.ceil(len(self.images_of[p]) / self.K) for p in family)

    def epoch(self, epoch):
        rng = np.random.default_rng([self.seed, epoch])
        order = {p: rng.permutation(imgs) for p, imgs in enumerate(self.images_of)}
        units = []
        for family in self.families:
            for r in range(self.rounds(family)):
                units.append(np.concatenate([np.take(order[p], range(r * self.K, (r + 1) * self.K), mode="wrap")
                                             for p in family]))
        units = [units[i] for i in rng.permutation(len(units))]
        per_step = self.F * self.world
        units += units[:(-len(units)) % per_step]
        batches = [np.concatenate(units[i:i + self.F]) for i in range(0, len(units), self.F)]
        return [torch.from_numpy(b) for b in batches[self.rank::self.world]]

    def __len__(self):
        return math.ceil(sum(map(self.rounds, self.families)) / (self.F * self.world))


# ---------------------------------------------------------------- on-device augmentation

_NORMALISATION = {}  # device -> ImageNet mean and std (1, 3, 1, 1), made once: a copy to the GPU per step would sync


def normalize(images):
    """uint8 or [0, 1] float (B, 3, H, W) -> ImageNet-normalised float."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    if x.device not in _NORMALISATION:
        _NORMALISATION[x.device] = tuple(torch.tensor(v, device=x.device).view(1, 3, 1, 1)
                                         for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _NORMALISATION[x.device]
    return (x - mean) / std


def augment(images, gen, hflip=False):
    """Per-sample scale/translate/rotate, colour jitter and blur of a uint8 batch, on its device.

    No horizontal flip by default: left/right asymmetries are what tells twins apart."""
    B, _, S, _ = images.shape
    x = images.float() / 255
    r = torch.rand(B, 9, generator=gen, device=x.device) * 2 - 1  # uniform in [-1, 1]
    angle, scale = r[:, 0] * math.radians(8), 1 + 0.08 * r[:, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    flip = torch.where((r[:, 8] > 0) & hflip, -1.0, 1.0)
    theta = torch.stack([torch.stack([cos * flip, -sin, 0.05 * r[:, 2]], 1),
                         torch.stack([sin * flip, cos, 0.05 * r[:, 3]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    brightness, contrast, saturation = (1 + 0.25 * r[:, 4:7]).T.view(3, B, 1, 1, 1)
    x = x * brightness
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = gray + (x - gray) * saturation
    mean = gray.mean((2, 3), keepdim=True)
    x = (mean + (x - mean) * contrast).clamp(0, 1)
    # Gaussian blur on half the samples, sigma 1-2 px at 224 (scaled with the image); the other half stay sharp.
    # Halving it (sigma up to 1 px) left the demo's arcface yardstick at twin EER 0.40 instead of 0.09 (README).
    sigma = ((r[:, 7] + 1) * S / 224).clamp(min=1e-3)
    sigma = torch.where(r[:, 7] > 0, sigma, torch.full_like(sigma, 1e-3))
    radius = max(1, math.ceil(2 * S / 224))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-t[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (B*3, taps)
    x = x.reshape(1, B * 3, S, S)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=B * 3)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=B * 3)
    return normalize(x.reshape(B, 3, S, S))


def batches_on(device, batches):
    """An epoch's batches of indices on the device, in one copy: the steps then read them with no copy (and no sync)
    each."""
    if device.type == "cpu":
        return batches
    return list(torch.cat(batches).to(device).split([len(b) for b in batches]))
