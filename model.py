"""A hand-written DINO/DINOv2 ViT and the twin verifiers built on it.

ViT: patch embedding, CLS token (+ optional registers), learned positional embedding resampled once to the training
size, pre-norm blocks with optional LayerScale, final LayerNorm; it loads the official checkpoints strictly and reads
its architecture from them. Verifiers: `traits` (trait prompts tiling the face; their contributions form the
embedding), `promptcam` (Prompt-CAM's identity prompts scored by a shared vector) and `arcface` (the yardstick).
"""
import hashlib
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEAD_DIM = 64  # every official DINO/DINOv2 ViT uses 64-channel heads, so a checkpoint fixes the heads

_DINOV2 = "https://dl.fbaipublicfiles.com/dinov2/"
_DINO = "https://dl.fbaipublicfiles.com/dino/"
OFFICIAL_URLS = {
    "dinov2_vits14": _DINOV2 + "dinov2_vits14/dinov2_vits14_pretrain.pth",
    "dinov2_vitb14": _DINOV2 + "dinov2_vitb14/dinov2_vitb14_pretrain.pth",
    "dinov2_vitl14": _DINOV2 + "dinov2_vitl14/dinov2_vitl14_pretrain.pth",
    "dinov2_vits14_reg4": _DINOV2 + "dinov2_vits14/dinov2_vits14_reg4_pretrain.pth",
    "dinov2_vitb14_reg4": _DINOV2 + "dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth",
    "dinov2_vitl14_reg4": _DINOV2 + "dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth",
    "dino_vits16": _DINO + "dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    "dino_vitb16": _DINO + "dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
}
# Keys an official checkpoint carries that inference never reads (DINOv2's iBOT mask token).
UNUSED_CHECKPOINT_KEYS = {"mask_token"}
# Backbones with no pre-trained weights, trained whole from a fixed initialisation (the CPU demo).
SCRATCH_ARCHS = {"scratch_vit_tiny14": dict(embed_dim=128, depth=3, patch_size=14),
                 "scratch_vit_tiny14_conv": dict(embed_dim=128, depth=3, patch_size=14, conv_stem=True)}
# The shape of each backbone known by name, from the official model definitions (a checkpoint file's is read from
# it): what the config checks and the memory estimate need before any weights are at hand.
ARCH_SHAPES = {
    **{f"dinov2_vit{size}14{reg}": dict(embed_dim=dim, depth=depth, patch_size=14, num_registers=4 if reg else 0,
                                        layerscale=True, native_grid=37)
       for size, dim, depth in (("s", 384, 12), ("b", 768, 12), ("l", 1024, 24)) for reg in ("", "_reg4")},
    "dino_vits16": dict(embed_dim=384, depth=12, patch_size=16, num_registers=0, layerscale=False, native_grid=14),
    "dino_vitb16": dict(embed_dim=768, depth=12, patch_size=16, num_registers=0, layerscale=False, native_grid=14),
    **{name: dict(shape, num_registers=0, layerscale=False, native_grid=None) for name, shape in SCRATCH_ARCHS.items()}}


def named_shape(arch):
    """A named architecture's ViTConfig fields, image size aside."""
    return {k: v for k, v in ARCH_SHAPES[arch].items() if k != "native_grid"}


def random_vit(arch, img_size, seed=0, **shape):
    """A ViT with fresh weights (DINOv2's initialisation): the exact model of a config, with no download, for memory
    estimates and rehearsals. A named architecture's shape, its fields overridden by `shape` (a narrower twin), or
    `shape` alone (the ViTConfig fields of a backbone file, read from it)."""
    shape = {**(named_shape(arch) if arch in ARCH_SHAPES else {}), **shape}
    vit = ViT(vit_config(arch, img_size, **shape))
    vit.init_weights(torch.Generator().manual_seed(seed))
    vit.family = "dino" if arch.startswith("dino_") else "dinov2_reg" if shape["num_registers"] else "dinov2"
    vit.fingerprint = backbone_fingerprint(vit.state_dict())
    return vit


STEM_CHANNELS, STEM_STRIDE = 32, 2
FLAT_CHANNELS = 32  # arcface: numbers per patch token in its flattened grid (the head stays small at 448 px)


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.num_heads = dim // HEAD_DIM
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x):
        """(B, N, D) -> q, k, v, each (B, heads, N, 64)."""
        B, N, D = x.shape
        return self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x):
        return self.attend(*self.split_heads(x))

    def attend(self, q, k, v):
        """Attention of q over k, v (each (B, heads, N, 64)) -> (B, N, D), projected."""
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, layerscale, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim)
        self.ls1 = LayerScale(dim) if layerscale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return self.mlp_residual(x)

    def mlp_residual(self, x):
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """One patch_size x patch_size projection, as the official ViTs; or, with conv_stem, two 3x3 convolutions
    (the first with stride 2) before a projection of patch_size / 2: small convolutions learn to see details
    smaller than a patch from far less data (Xiao et al., "Early convolutions help transformers see better")."""

    def __init__(self, dim, patch_size, conv_stem=False):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, STEM_CHANNELS, 3, STEM_STRIDE, 1), nn.GELU(),
            nn.Conv2d(STEM_CHANNELS, STEM_CHANNELS, 3, 1, 1), nn.GELU()) if conv_stem else nn.Identity()
        stride = patch_size // STEM_STRIDE if conv_stem else patch_size
        self.proj = nn.Conv2d(STEM_CHANNELS if conv_stem else 3, dim, stride, stride)

    def forward(self, images):
        return self.proj(self.stem(images)).flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class ViTConfig:
    embed_dim: int
    depth: int
    patch_size: int
    num_registers: int
    layerscale: bool
    img_size: int
    conv_stem: bool = False
    eps: float = 1e-6


class ViT(nn.Module):
    """Maps a normalised image batch (B, 3, H, W) to final-normed tokens (B, 1 + registers + patches, D)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D, grid = cfg.embed_dim, cfg.img_size // cfg.patch_size
        self.patch_embed = PatchEmbed(D, cfg.patch_size, cfg.conv_stem)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, D))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_registers, D)) if cfg.num_registers else None
        self.blocks = nn.ModuleList(Block(D, cfg.layerscale, cfg.eps) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(D, eps=cfg.eps)

    @property
    def num_prefix(self):
        """CLS plus registers: the tokens before the patches."""
        return 1 + self.cfg.num_registers

    @property
    def grid(self):
        return self.cfg.img_size // self.cfg.patch_size

    def embed(self, images):
        """Patch tokens with positions, CLS first, then registers (which get no position)."""
        if images.shape[-2:] != (self.cfg.img_size, self.cfg.img_size):
            raise ValueError(f"expected {self.cfg.img_size}px images, got {tuple(images.shape[-2:])}")
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        if self.register_tokens is not None:
            x = torch.cat([x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]], dim=1)
        return x

    def forward(self, images):
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    @torch.no_grad()
    def init_weights(self, generator):
        """Fresh weights as DINOv2 initialises them: truncated-normal (0.02) projections and positions,
        near-zero CLS/registers, zero biases, unit norms and LayerScale; He-normal stem convolutions (0.02 would
        shrink the signal through each of them)."""
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif name.startswith("patch_embed.stem"):
                nn.init.kaiming_normal_(p, nonlinearity="relu", generator=generator)
            elif name.endswith(("cls_token", "register_tokens")):
                p.normal_(0, 1e-6, generator=generator)
            elif p.dim() == 1:  # LayerNorm weight, LayerScale gamma
                p.fill_(1.0)
            else:
                nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04, generator=generator)


def resample_pos_embed(pos_embed, grid, family):
    """Resample the patch pos-embed to grid x grid exactly as the official code of `family` does."""
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old = math.isqrt(patch_pos.shape[1])
    if old == grid:
        return pos_embed
    dim = patch_pos.shape[-1]
    patch_pos = patch_pos.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    if family == "dinov2_reg":  # registers release: explicit size, antialiased
        patch_pos = F.interpolate(patch_pos, size=(grid, grid), mode="bicubic", antialias=True)
    else:  # DINO and DINOv2 without registers: scale factor with a +0.1 offset, no antialias
        scale = (grid + 0.1) / old
        patch_pos = F.interpolate(patch_pos, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([cls_pos, patch_pos.to(pos_embed.dtype)], dim=1)


def read_checkpoint(source, cache_dir=None):
    """State dict from an official name, a URL or a local .pth file."""
    if source in OFFICIAL_URLS or source.startswith(("http://", "https://")):
        url = OFFICIAL_URLS.get(source, source)
        model_dir = cache_dir or os.environ.get("TWIN_WEIGHTS_DIR")  # None: torch hub's own cache
        try:
            state = torch.hub.load_state_dict_from_url(url, model_dir=model_dir, map_location="cpu",
                                                       weights_only=True)
        except Exception as e:
            raise UserError(f"could not download {url} ({e}); on an offline machine download it elsewhere and put "
                            f"it in weights_dir, or give its path as `arch`") from e
    elif os.path.isfile(source):
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UserError(f"{source}: not a readable PyTorch checkpoint ({e})") from e
    else:
        raise UserError(f"unknown backbone {source!r}: not a file, a URL or one of "
                         f"{sorted(OFFICIAL_URLS) + sorted(SCRATCH_ARCHS)}")
    if isinstance(state, dict) and "model" in state and "cls_token" not in state:
        state = state["model"]
    if not isinstance(state, dict) or "cls_token" not in state:
        raise UserError(f"{source}: not a DINO/DINOv2 ViT checkpoint (no `cls_token` key)")
    return state


def load_vit(source, img_size, cache_dir=None):
    """Build a ViT from an official checkpoint (name, URL or path), pos-embed resampled to img_size,
    or one of SCRATCH_ARCHS with fresh weights (always the same ones)."""
    if source in SCRATCH_ARCHS:
        return scratch_vit(source, img_size)
    state = dict(read_checkpoint(source, cache_dir))
    try:
        D = state["cls_token"].shape[-1]
        conv_stem = "patch_embed.stem.0.weight" in state  # our scratch backbones' stem, in backbone.pth
        patch = state["patch_embed.proj.weight"].shape[-1] * (STEM_STRIDE if conv_stem else 1)
        depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
        native_grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    except (KeyError, ValueError, AttributeError) as e:
        raise UserError(f"{source}: checkpoint is missing a ViT key or has a malformed one ({e!r})") from e
    if native_grid ** 2 + 1 != state["pos_embed"].shape[1]:
        raise UserError(f"{source}: pos_embed holds {state['pos_embed'].shape[1]} positions, not CLS + a square grid")
    registers = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    family = "dino" if "mask_token" not in state else ("dinov2_reg" if registers else "dinov2")
    vit = ViT(vit_config(source, img_size, embed_dim=D, depth=depth, patch_size=patch, num_registers=registers,
                         layerscale="blocks.0.ls1.gamma" in state, conv_stem=conv_stem))
    for key in UNUSED_CHECKPOINT_KEYS:
        state.pop(key, None)
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], img_size // patch, family)
    check_state_dict(vit.state_dict(), state, source)
    vit.load_state_dict(state, strict=True)
    vit.family = family
    vit.fingerprint = backbone_fingerprint(state)
    return vit


def vit_config(source, img_size, **shape):
    if img_size % shape["patch_size"]:
        raise UserError(f"img_size {img_size} is not a multiple of the patch size {shape['patch_size']} of {source}")
    return ViTConfig(img_size=img_size, **shape)


def scratch_vit(name, img_size):
    vit = random_vit(name, img_size)
    vit.family = "scratch"
    return vit


def backbone_fingerprint(state):
    """A digest of the pre-trained weights as loaded, so a checkpoint is never paired with another backbone."""
    digest = hashlib.sha256()
    for name in ("cls_token", "pos_embed", "patch_embed.proj.weight"):
        digest.update(state[name].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def check_state_dict(expected, state, source):
    """Raise naming every missing, unexpected or mis-shaped key (load_state_dict would stop at the first)."""
    problems = [f"missing key {k}" for k in expected if k not in state]
    problems += [f"unexpected key {k}" for k in state if k not in expected]
    problems += [f"{k}: shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise UserError(f"{source}: checkpoint does not fit the model:\n  " + "\n  ".join(problems))


def prompt_rows(vit, prompts, keys, values, first_patch, blurred_heads=None, keep_patches=None):
    """M prompts (B or 1, M, D) through the last block as queries only, each attending to itself and an image's
    tokens (keys, values (B, heads, N, 64)), never to another prompt: the final-normed outputs (B, M, D) and the
    attention over the patches, tokens first_patch on (B, heads, M, patches). blurred_heads (heads,) bool: those
    heads' patch attention made uniform with the same mass (Prompt-CAM's blur). keep_patches (B or R, patches)
    bool: the others hidden (R views of one image's keys without copying them). Explicit attention: a fused kernel
    would need the prompts as keys too, masked."""
    block = vit.blocks[-1]
    q, k, v = block.attn.split_heads(block.norm1(prompts))
    attn = prompt_attention(q, k, keys, first_patch, keep_patches)
    if blurred_heads is not None:
        patch_attn = attn[..., first_patch:]
        uniform = patch_attn.sum(-1, keepdim=True).expand_as(patch_attn) / patch_attn.shape[-1]
        patch_attn = torch.where(blurred_heads[None, :, None, None], uniform, patch_attn)
        attn = torch.cat([attn[..., :first_patch], patch_attn], -1)
    out = attn[..., :1] * v + attn[..., 1:] @ values
    h = prompts + block.ls1(block.attn.proj(out.transpose(1, 2).flatten(2)))
    return vit.norm(block.mlp_residual(h)), attn[..., first_patch:]


def prompt_attention(q, k, keys, first_patch, keep_patches=None, cells=None):
    """Attention (B, heads, M, 1 + N) of M prompt queries q (B or 1, heads, M, 64) over themselves (their own keys
    k) and N tokens' keys (B, heads, N, 64), of which those from first_patch on are patches. keep_patches
    (B, patches) bool: the others are hidden. cells (M, patches) bool: each prompt sees only its own patches (and
    itself), in every head."""
    on_tokens = q @ keys.transpose(-1, -2)
    on_itself = (q * k).sum(-1, keepdim=True).expand(*on_tokens.shape[:-1], 1)
    logits = torch.cat([on_itself, on_tokens], -1) * q.shape[-1] ** -0.5
    if cells is not None:
        logits = logits.masked_fill(F.pad(~cells, (first_patch, 0)), float("-inf"))
    if keep_patches is not None:
        hidden = F.pad(~keep_patches, (first_patch, 0))[:, None, None, :]
        logits = logits.masked_fill(hidden, float("-inf"))
    return logits.softmax(-1)


def with_deep_prompts(vit, deep_prompts, images):
    """Blocks 1..L-1 with VPT-Deep prompts (L-1, n, D): fresh ones inserted after CLS/registers at every block's
    input and dropped after it. Returns the last block's input tokens."""
    x = vit.embed(images)
    n_prefix, n_deep = vit.num_prefix, deep_prompts.shape[1]
    for block, prompts in zip(vit.blocks[:-1], deep_prompts):
        x = torch.cat([x[:, :n_prefix], prompts.expand(len(x), -1, -1), x[:, n_prefix:]], dim=1)
        x = block(x)
        x = torch.cat([x[:, :n_prefix], x[:, n_prefix + n_deep:]], dim=1)
    return x


def tiling_cells(num_prompts, grid):
    """(num_prompts, grid * grid) bool: the patches of each prompt's cell, when g x g cells (g * g = num_prompts)
    tile the patch grid row by row; a patch belongs to the cell its rows and columns fall in (cells of a grid
    that g does not divide differ by a patch)."""
    g = math.isqrt(num_prompts)
    if g * g != num_prompts:
        raise UserError(f"trait_prompts={num_prompts} must be a square number: the prompts tile the face g x g")
    if g > grid:
        raise UserError(f"trait_prompts={num_prompts} tile the face {g} x {g}, but the patch grid is {grid} x {grid}: "
                        f"some prompts would have no patch to read (use at most {grid * grid})")
    cell_of = torch.arange(grid) * g // grid  # the cell row (column) of each patch row (column)
    cell = (cell_of[:, None] * g + cell_of[None, :]).flatten()
    return cell[None, :] == torch.arange(num_prompts)[:, None]


def arcface_loss(cos, labels, margin, scale):
    """Cross-entropy over scale * cos, the true class's angle widened by the margin (ArcFace); past pi - margin,
    where cos(theta + m) would turn back up, the usual linear continuation."""
    cos = cos.float().clamp(-1 + 1e-7, 1 - 1e-7)
    target = cos.gather(1, labels[:, None])
    widened = torch.where(target > math.cos(math.pi - margin),
                          target * math.cos(margin) - (1 - target ** 2).sqrt() * math.sin(margin),
                          target - math.sin(math.pi - margin) * margin)
    return F.cross_entropy(scale * cos.scatter(1, labels[:, None], widened), labels)


@dataclass
class Encoding:
    """What the pair scorer needs of one image batch: its identity prompt and last-block keys/values."""
    prompt: torch.Tensor  # (B, D)   p(x)
    keys: torch.Tensor    # (B, heads, N, 64)
    values: torch.Tensor  # (B, heads, N, 64)

    def __getitem__(self, index):
        return Encoding(self.prompt[index], self.keys[index], self.values[index])

    @staticmethod
    def cat(parts):
        return Encoding(*(torch.cat([getattr(p, f) for p in parts]) for f in ("prompt", "keys", "values")))


class PromptGenerator(nn.Module):
    """p(x): an identity prompt made from an image's last-layer input.

    Twins differ in small local traits, so the prompt must know *where* things are: each patch token is
    projected to a few channels and the grid is kept in order (flattened), with the CLS token beside it.
    Mean pooling would erase exactly that."""

    def __init__(self, dim, num_patches, channels_per_patch=8):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.reduce = nn.Linear(dim, channels_per_patch)
        self.fc1 = nn.Linear(dim + num_patches * channels_per_patch, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, cls, patches):
        local = self.reduce(self.norm(patches)).flatten(1)
        return self.fc2(F.gelu(self.fc1(torch.cat([self.norm(cls), local], dim=-1))))


def freeze_backbone(vit, train_blocks):
    """Freeze the ViT except its last train_blocks blocks and final norm; all of it (embeddings too, for weak
    or untrained backbones) when train_blocks is its depth."""
    L = vit.cfg.depth
    if not 0 <= train_blocks <= L:
        raise UserError(f"train_blocks={train_blocks} must lie in 0..{L}")
    vit.requires_grad_(train_blocks == L)
    for block in vit.blocks[L - train_blocks:] if train_blocks else []:
        block.requires_grad_(True)
    if train_blocks:
        vit.norm.requires_grad_(True)


@dataclass
class Part:
    """One part of a verifier (a trait prompt, a head) on a pair: its maps on face A and on face B (grid, grid) up to
    `scale`, a signed difference on each face up to +-difference_scale, and a caption saying its share of the score."""
    caption: str
    maps: tuple
    titles: tuple
    scale: float
    differences: tuple
    difference_titles: tuple
    difference_scale: float
    difference_label: str


@dataclass
class Evidence:
    """A verifier's account of a pair, for cam.py to draw and check: the score; its parts, most telling first; where
    the faces differ (2, grid, grid) with a caption; each face's patches in the order the score leans on them; and
    rescore(order_a, order_b, insertion), the score as patches go (or come) in those orders. No parts: no maps."""
    score: float
    caption: str
    parts: list = field(default_factory=list)
    differ: np.ndarray = None
    differ_label: str = ""
    orders: tuple = None
    rescore: object = None


def patch_masks(order, insertion):
    """(P + 1, P) bool: row k keeps the first k patches of the order (insertion) or all but them (deletion)."""
    P = len(order)
    keep = torch.zeros(P + 1, P, dtype=torch.bool)
    for k in range(P + 1):
        keep[k, order[:k]] = True
    return keep if insertion else ~keep


class Verifier(nn.Module):
    """What every method shares: a partly frozen ViT, and checkpoints that hold the trainable weights only."""
    method = None
    has_maps = True  # whether its evidence on a pair has parts with maps

    def __init__(self, vit: ViT, train_blocks):
        super().__init__()
        freeze_backbone(vit, train_blocks)
        self.vit, self.train_blocks = vit, train_blocks

    def summary(self):
        n_train = sum(p.numel() for p in self.parameters() if p.requires_grad)
        n_all = sum(p.numel() for p in self.parameters())
        frozen = ("nothing frozen" if self.train_blocks == len(self.vit.blocks) else
                  f"backbone frozen except the last {self.train_blocks} blocks" if self.train_blocks else
                  "backbone frozen")
        return f"model ({self.method}): {n_train:,} trainable of {n_all:,} parameters ({frozen})"

    def trainable_state(self):
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if v.requires_grad}

    def load_trainable_state(self, state, source):
        expected = self.trainable_state()
        check_state_dict(expected, state, source)
        with torch.no_grad():
            for k, v in expected.items():
                v.copy_(state[k])


class CosineVerifier(Verifier):
    """A unit embedding per image, trained with an additive angular margin over the training identities
    (ArcFace); a pair's score is the cosine of its two embeddings. A subclass gives encode(images) and its
    class_centres (C, D); forward gives (embeddings, cosines to every training identity's centre)."""

    def __init__(self, vit: ViT, train_blocks, margin, scale):
        super().__init__(vit, train_blocks)
        self.margin, self.scale = margin, scale

    def forward(self, images):
        emb = self.encode(images)
        # the margin's cosines in fp32: under 16-bit autocast a cosine near 1 moves in steps of 0.004 (bf16), a
        # tenth of a logit at scale 30
        with torch.autocast(emb.device.type, enabled=False):
            return emb, emb.float() @ F.normalize(self.class_centres.float(), dim=-1).T

    def loss_terms(self, outputs, labels):
        return {"class": arcface_loss(outputs[1], labels, self.margin, self.scale)}

    @torch.no_grad()
    def score_pairs(self, emb, a, b):
        a, b = torch.as_tensor(a, dtype=torch.long), torch.as_tensor(b, dtype=torch.long)
        return (emb[a] * emb[b]).sum(-1)

    @staticmethod
    def cat_encodings(parts):
        return torch.cat(parts)


class ArcFaceVerifier(CosineVerifier):
    """The conventional yardstick, as face recognition nets end (ArcFace's flattened last feature map): each
    final patch token reduced to FLAT_CHANNELS numbers, the grid of them flattened in place, projected and
    normalised. A pooled embedding (CLS and mean patch) loses where a mark is, which is what tells twins with
    marks at random places apart: pooled, it stayed at chance on them (README, ablation)."""
    method = "arcface"
    has_maps = False

    def __init__(self, vit: ViT, num_classes, train_blocks=0, margin=0.3, scale=30.0):
        super().__init__(vit, train_blocks, margin, scale)
        D = vit.cfg.embed_dim
        self.reduce = nn.Linear(D, FLAT_CHANNELS)
        self.project = nn.Linear(vit.grid ** 2 * FLAT_CHANNELS, D)
        self.class_centres = nn.Parameter(torch.randn(num_classes, D) * 0.02)

    def encode(self, images):
        """(B, D) unit embeddings; each image's depends on that image alone."""
        patches = self.vit(images)[:, self.vit.num_prefix:]
        return F.normalize(self.project(self.reduce(patches).flatten(1)).float(), dim=-1)

    @torch.no_grad()
    def evidence(self, pair):
        """The score of a normalised pair (2, 3, H, W); no maps: the yardstick's score is one cosine."""
        emb = self.encode(pair)
        return Evidence(float(emb[0] @ emb[1]), "arcface has no maps: its score is the cosine of two embeddings")


class TraitPromptVerifier(CosineVerifier):
    """The default verifier: K trait prompts tile the face, each attending with the last block's attention to the
    patches of its own cell. Each patch's final token is gated by its prompt's attention on it, head by head, then
    reduced and projected by its own place's map; the embedding is the normalised sum over the patches, so a pair's
    cosine and 1 - cosine split exactly into one term per patch on each face, and per prompt over its cell
    (pair_terms). Trained with an ArcFace margin against the training identities' class prompts, kept as free class
    centres: why, and what the tiling and the reading replaced, is in docs/experiments.md."""
    method = "traits"

    def __init__(self, vit: ViT, num_classes, deep_prompts=4, train_blocks=0, trait_prompts=36, margin=0.3,
                 scale=30.0):
        super().__init__(vit, train_blocks, margin, scale)
        D, L, P = vit.cfg.embed_dim, vit.cfg.depth, vit.grid ** 2
        self.deep_prompts = nn.Parameter(torch.randn(L - 1, deep_prompts, D) * 0.02)
        self.trait_prompts = nn.Parameter(torch.randn(trait_prompts, D) * 0.02)
        cells = tiling_cells(trait_prompts, vit.grid)
        self.register_buffer("cells", cells, persistent=False)
        # the size of each patch's cell: the gate is attention times it, so attention spread evenly passes tokens whole
        self.register_buffer("cell_size", cells.sum(1)[cells.int().argmax(0)].float(), persistent=False)
        self.reduce = nn.Linear(D, FLAT_CHANNELS)
        self.project = nn.Parameter(torch.randn(P, FLAT_CHANNELS, D) / math.sqrt(P * FLAT_CHANNELS))
        self.class_prompts = nn.Parameter(torch.randn(num_classes, D) * 0.02)

    def keys_and_tokens(self, images):
        """The whole ViT once per image, deep prompts in blocks 1..L-1. What the trait prompts read: the last
        block's keys of the patches (where to look) and the final patch tokens split by head (what is there), each
        (B, heads, patches, 64)."""
        x = with_deep_prompts(self.vit, self.deep_prompts, images)
        last, n = self.vit.blocks[-1], self.vit.num_prefix
        q, k, v = last.attn.split_heads(last.norm1(x))  # the last block as Block.forward, its keys kept
        tokens = self.vit.norm(last.mlp_residual(x + last.ls1(last.attn.attend(q, k, v))))[:, n:]
        return k[:, :, n:], tokens.unflatten(-1, (k.shape[1], -1)).transpose(1, 2)

    def read(self, keys, tokens, keep_patches=None):
        """Each patch's contribution to the embedding (B, patches, D) and each prompt's attention over the patches
        (B, heads, K, patches); keep_patches as in prompt_attention. Gating each token in place, rather than pooling
        the cell into one reading, lets the loss reach which patch a prompt picks (docs/experiments.md)."""
        block = self.vit.blocks[-1]
        q, k, _ = block.attn.split_heads(block.norm1(self.trait_prompts[None]))
        attn = prompt_attention(q, k, keys, 1, keep_patches, self.cells)[..., 1:]
        gate = attn.sum(2) * self.cell_size  # (B, heads, patches): a patch lies in one cell, the others' rows are 0
        read = self.reduce((gate[..., None] * tokens).transpose(1, 2).flatten(2))
        return torch.einsum("bpc,pcd->bpd", read, self.project), attn

    @staticmethod
    def embed(contributions):
        """(B, D) fp32 unit embeddings: the sum of the contributions (B, N, D), normalised. Summed and normalised
        in fp32, as the yardstick's embedding is: under bf16 autocast a test split's cosines fell on a few hundred
        values."""
        return F.normalize(contributions.float().sum(1), dim=-1)

    @staticmethod
    def pair_terms(contributions):
        """Each part's term of a pair's cosine and of 1 - cosine on each face, (2, N) each, from the pair's
        contributions (2, N, D); each set adds up to its whole. With u the contributions over the norm of their sum,
        so that each unit embedding is e = sum_n u_n: cos = sum_n (u_n^A . e_B + u_n^B . e_A) / 2, and
        1 - cos = |e_A - e_B|^2 / 2 = sum_n (u_n^A . (e_A - e_B) + u_n^B . (e_B - e_A)) / 2."""
        contributions = contributions.float()
        u = contributions / contributions.sum(1, keepdim=True).norm(dim=-1, keepdim=True)
        e = u.sum(1)
        held = torch.stack([u[0] @ e[1], u[1] @ e[0]]) / 2
        return held, torch.stack([u[0] @ (e[0] - e[1]), u[1] @ (e[1] - e[0])]) / 2

    @property
    def class_centres(self):
        """The training identities' class prompts, free parameters (see the class docstring)."""
        return self.class_prompts

    def encode(self, images):
        return self.embed(self.read(*self.keys_and_tokens(images))[0])

    @torch.no_grad()
    def evidence(self, pair):
        """A normalised pair (2, 3, H, W) as its trait prompts see it: one part per prompt, the largest share of
        1 - score first, with its attention and its patches' terms of 1 - score on each face; where the faces differ
        is every patch's term of 1 - score on each face; the score leans on patches by the size of their terms."""
        keys, tokens = self.keys_and_tokens(pair)
        contributions, attn = self.read(keys, tokens)
        whole = self.embed(contributions)
        score = float(whole[0] @ whole[1])
        grid = (2, self.vit.grid, self.vit.grid)
        held, apart = (t.cpu().numpy() for t in self.pair_terms(contributions))
        shares = apart @ self.cells.float().T.cpu().numpy()  # (2, K): each prompt's patches on each face
        maps = attn.float().mean(1).reshape(2, -1, *grid[1:]).cpu().numpy()
        parts = []
        for k in np.argsort(-shares.sum(0), kind="stable"):
            share = shares[:, k].sum()
            terms = np.where(self.cells[k].cpu().numpy(), apart, 0).reshape(grid)
            parts.append(Part(f"trait prompt {k}: {share:.4f} of 1 - score = {1 - score:.4f} "
                              f"({share / max(1 - score, 1e-12):.0%})", (maps[0, k], maps[1, k]),
                              ("prompt on A", "prompt on B"), float(maps[:, k].max()) or 1e-6, tuple(terms),
                              ("its 1 - score on A", "its 1 - score on B"), float(np.abs(terms).max()) or 1e-6,
                              "1 - score"))

        @torch.no_grad()
        def rescore(order_a, order_b, insertion):
            """Each face masked, against the other one whole."""
            masked = [self.embed(self.read(keys[i:i + 1], tokens[i:i + 1],
                                           patch_masks(order, insertion).to(keys.device))[0])
                      for i, order in enumerate((order_a, order_b))]
            return ((masked[0] @ whole[1] + masked[1] @ whole[0]) / 2).cpu().numpy()
        leaned_on = tuple(np.argsort(-np.abs(h), kind="stable") for h in held)
        return Evidence(score, f"where they differ: each patch's term of 1 - score = {1 - score:.4f} on each face",
                        parts, apart.reshape(grid), "1 - score", leaned_on, rescore)


class PromptCamVerifier(Verifier):
    """Prompt-CAM's mechanism, open-set: training identities own class prompts, a generator makes a prompt p(x) for
    any face, and a shared vector w scores a prompt through the last block, s(p; x) = w . LN(block_L([p; x])_p); a
    pair scores (s(p(A); B) + s(p(B); A)) / 2, with no identity at test time."""
    method = "promptcam"
    EVIDENCE_HEADS = 3  # the top heads by greedy blur whose mean contrast is where the faces differ

    def __init__(self, vit: ViT, num_classes, deep_prompts=4, train_blocks=0):
        super().__init__(vit, train_blocks)
        D, L = vit.cfg.embed_dim, vit.cfg.depth
        # VPT-Deep: fresh class-agnostic prompts at the input of blocks 1..L-1, replaced at every layer
        self.deep_prompts = nn.Parameter(torch.randn(L - 1, deep_prompts, D) * 0.02)
        self.class_prompts = nn.Parameter(torch.randn(num_classes, D) * 0.02)
        self.generator = PromptGenerator(D, vit.grid ** 2)
        self.score_w = nn.Parameter(torch.randn(D) / math.sqrt(D))

    @property
    def num_heads(self):
        return self.vit.blocks[-1].attn.num_heads

    def last_layer_input(self, images):
        return with_deep_prompts(self.vit, self.deep_prompts, images)

    def encode(self, images) -> Encoding:
        """Run blocks 1..L-1 once per image; keep what the last block needs: p(x), keys and values."""
        x = self.last_layer_input(images)
        last = self.vit.blocks[-1]
        _, keys, values = last.attn.split_heads(last.norm1(x))
        return Encoding(self.generator(x[:, 0], x[:, self.vit.num_prefix:]), keys, values)

    def score_prompts(self, prompts, enc: Encoding, blurred_heads=None, keep_patches=None):
        """s(p; x) = w . LN(block_L([p; tokens(x)])_p) for M prompts per image (see prompt_rows): scores (B, M)
        and the attention over the patches (B, heads, M, patches)."""
        out, attn = prompt_rows(self.vit, prompts, enc.keys, enc.values, 1 + self.vit.num_prefix, blurred_heads,
                                keep_patches)
        return out @ self.score_w, attn

    def forward(self, images):
        """Training view: scores of every training identity's prompt and of every image's generated prompt on every
        image in the batch: (class_scores (B, C), pair_scores (B, B), p(x) (B, D), the class prompts (C, D)), where
        pair_scores[i, j] is the symmetric score of images i and j. The class prompts pass through the forward so
        that the pull term's gradient is part of the step DDP reduces."""
        enc = self.encode(images)
        class_scores, _ = self.score_prompts(self.class_prompts[None], enc)
        directed, _ = self.score_prompts(enc.prompt[None], enc)  # [j, i] = s(p(x_i); x_j)
        return class_scores, (directed + directed.T) / 2, enc.prompt, self.class_prompts

    def loss_terms(self, outputs, labels):
        """Cross-entropy over the training identities' prompts (literal Prompt-CAM); an episodic term where
        each image's generated prompt must pick out the same person among the batch (siblings included);
        and a pull of p(x) toward its identity's prompt P_y."""
        class_scores, pair_scores, prompts, class_prompts = outputs
        ce = F.cross_entropy(class_scores.float(), labels)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        logits = pair_scores.float().masked_fill(eye, float("-inf"))
        positive = (labels[:, None] == labels[None]) & ~eye
        episodic = (logits.logsumexp(1) - logits.masked_fill(~positive, float("-inf")).logsumexp(1)).mean()
        pull = (prompts.float() - class_prompts[labels].float()).pow(2).mean()
        return {"class": ce, "episodic": episodic, "pull": pull}

    @staticmethod
    def cat_encodings(parts):
        return Encoding.cat(parts)

    @torch.no_grad()
    def score_pairs(self, enc: Encoding, a, b, chunk=4096):
        """Symmetric scores of image pairs (a[k], b[k]) from cached encodings: two prompt rows per pair.

        Rows are grouped by the image whose keys/values they read, so no key/value tensor is copied
        per pair; a pair's score depends only on its two encodings.
        """
        a, b = torch.as_tensor(a, dtype=torch.long), torch.as_tensor(b, dtype=torch.long)
        prompt_idx, image_idx = torch.cat([a, b]), torch.cat([b, a])
        directed = torch.empty(len(prompt_idx), device=enc.prompt.device)
        order = torch.argsort(image_idx, stable=True)
        images, counts = torch.unique_consecutive(image_idx[order], return_counts=True)
        for image, rows in zip(images.tolist(), torch.split(order, counts.tolist())):
            for part in torch.split(rows, chunk):
                s, _ = self.score_prompts(enc.prompt[prompt_idx[part]][None], enc[image:image + 1])
                directed[part.to(directed.device)] = s[0].float()
        n = len(a)
        return (directed[:n] + directed[n:]) / 2

    @torch.no_grad()
    def pair_maps(self, enc_a: Encoding, enc_b: Encoding, blurred_heads=None):
        """Per-head attention of p(A) and p(B) on A and on B, each (heads, grid, grid), and the pair score."""
        prompts = torch.stack([enc_a.prompt, enc_b.prompt])[None]  # (1, 2, D): [p(A), p(B)]
        grid = self.vit.grid
        on_a_s, on_a = self.score_prompts(prompts, enc_a[None], blurred_heads)
        on_b_s, on_b = self.score_prompts(prompts, enc_b[None], blurred_heads)
        shape = (self.num_heads, grid, grid)
        maps = {"self_a": on_a[0, :, 0].reshape(shape), "cross_b_on_a": on_a[0, :, 1].reshape(shape),
                "cross_a_on_b": on_b[0, :, 0].reshape(shape), "self_b": on_b[0, :, 1].reshape(shape)}
        score = (on_b_s[0, 0] + on_a_s[0, 1]) / 2  # s(p(A); B) and s(p(B); A)
        return float(score), maps


    @torch.no_grad()
    def rank_heads(self, enc_a, enc_b):
        """Heads from most to least important by Prompt-CAM's greedy blur (the head whose map, made uniform, changes
        the pair score least is dropped first), with the pair score."""
        H = self.num_heads
        full, _ = self.pair_maps(enc_a, enc_b)
        blurred, dropped = torch.zeros(H, dtype=torch.bool), []
        while len(dropped) < H:
            change = {}
            for h in range(H):
                if not blurred[h]:
                    trial = blurred.clone()
                    trial[h] = True
                    change[h] = abs(self.pair_maps(enc_a, enc_b, trial.to(enc_a.prompt.device))[0] - full)
            least = min(change, key=change.get)
            blurred[least] = True
            dropped.append(least)
        return dropped[::-1], full

    @torch.no_grad()
    def evidence(self, pair):
        """A normalised pair (2, 3, H, W) as its identity prompts see it: one part per head, ranked by greedy blur,
        with where each face's prompt looks on the other face and self minus cross on each face."""
        enc = self.encode(pair)
        enc_a, enc_b = enc[0], enc[1]
        heads, score = self.rank_heads(enc_a, enc_b)
        maps = {k: v.float().cpu().numpy() for k, v in self.pair_maps(enc_a, enc_b)[1].items()}
        contrast = (maps["self_a"] - maps["cross_b_on_a"], maps["self_b"] - maps["cross_a_on_b"])
        parts = []
        for rank, h in enumerate(heads):
            on_faces = (maps["cross_a_on_b"][h].sum() + maps["cross_b_on_a"][h].sum()) / 2
            parts.append(Part(f"head {h} (rank {rank + 1} by greedy blur): {on_faces:.1%} of the prompts' attention on "
                              f"the other face's patches", (maps["cross_b_on_a"][h], maps["cross_a_on_b"][h]),
                              ("p(B) looks on A", "p(A) looks on B"),
                              max(float(maps[k][h].max())
                                  for k in ("cross_a_on_b", "cross_b_on_a", "self_a", "self_b")),
                              (contrast[0][h], contrast[1][h]), ("contrast on A", "contrast on B"),
                              max(float(np.abs(c[h]).max()) for c in contrast) or 1e-6, "self-cross"))
        top = heads[:self.EVIDENCE_HEADS]
        orders = tuple(np.argsort(-maps[k][top].mean(0).ravel(), kind="stable")
                       for k in ("cross_b_on_a", "cross_a_on_b"))

        @torch.no_grad()
        def rescore(order_a, order_b, insertion):
            """Each face's prompt scored on the other face, masked."""
            def directed(prompt_enc, image_enc, keep):
                scores, _ = self.score_prompts(prompt_enc.prompt[None, None], image_enc[None],
                                               keep_patches=keep.to(pair.device))
                return scores[:, 0]
            return ((directed(enc_a, enc_b, patch_masks(order_b, insertion))
                     + directed(enc_b, enc_a, patch_masks(order_a, insertion))) / 2).float().cpu().numpy()
        return Evidence(score, f"where they differ: self minus cross of the top {len(top)} heads by greedy blur",
                        parts, np.stack([c[top].mean(0) for c in contrast]), "self-cross", orders, rescore)


METHODS = ("promptcam", "arcface", "traits")
METHOD_BEFORE_THE_KEY = "promptcam"  # what checkpoints saved before `method` existed trained


def build_verifier(arch, img_size, num_classes, deep_prompts, train_blocks, *, method, margin, scale, trait_prompts,
                   weights_dir=None):
    """The verifier a config describes (arch: a backbone name, URL or file, or a ViT already built); arcface reads no
    prompts, promptcam no margin, scale or trait prompts."""
    vit = arch if isinstance(arch, ViT) else load_vit(arch, img_size, weights_dir)
    if vit.family == "scratch" and train_blocks != vit.cfg.depth:
        raise UserError(f"{arch} has no pre-trained weights, so it trains whole: set train_blocks to its depth "
                         f"{vit.cfg.depth} (got {train_blocks})")
    if method == "arcface":
        return ArcFaceVerifier(vit, num_classes, train_blocks, margin, scale)
    if method == "traits":
        return TraitPromptVerifier(vit, num_classes, deep_prompts, train_blocks, trait_prompts, margin, scale)
    return PromptCamVerifier(vit, num_classes, deep_prompts, train_blocks)


def official_backbone_state(vit):
    """The ViT's weights in the official checkpoint layout, so `arch: FILE` loads them strictly: DINOv2's
    (mask token, LayerScale of ones where the ViT has none) unless it came from a DINO v1 checkpoint."""
    state = {k: v.detach().cpu().clone() for k, v in vit.state_dict().items()}
    if vit.family == "dino":
        return state
    state["mask_token"] = torch.zeros(1, vit.cfg.embed_dim)
    for i in range(vit.cfg.depth) if not vit.cfg.layerscale else []:
        state[f"blocks.{i}.ls1.gamma"] = torch.ones(vit.cfg.embed_dim)
        state[f"blocks.{i}.ls2.gamma"] = torch.ones(vit.cfg.embed_dim)
    return state
