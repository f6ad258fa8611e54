"""The run's configuration: every key with its default and type, YAML files layered and command-line overrides on
top, every value checked before any image is read.

    cfg = load_config(["configs/t4x2.yaml"], {"lr": "1e-3"})   # defaults < files in turn < overrides
"""
import math
import os
import re

import yaml

from devices import GPUS
from errors import UserError
from model import ARCH_SHAPES, METHOD_BEFORE_THE_KEY, METHODS

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
    "val_families": 12, "seed": 0, "precision": "auto", "compile": "auto",
    # folds K >= 2: cross-validation over the twin families instead of the val_families hold-out, then a final run on
    # every family (see README); fold: which of those runs this is (0..K-1 a fold, K the final run; set by --folds)
    "folds": 0, "fold": -1,
    # output and tracking; resume_dirs: where `--resume auto` also looks (os.pathsep between folders)
    "out_dir": "ckpt", "resume_dirs": "", "tracker": "none", "run_name": "", "mlflow_uri": "",
    "mlflow_experiment": "", "wandb_project": "twin-verification", "wandb_entity": "",
    "log_images_every": 5,  # epochs between the validation ROC and explanation figures sent to the tracker; 0: never
    "gpu": "",  # the GPU a config is meant for: --check and bench.py memory compare the run's memory with it
}
CHOICES = {"method": METHODS, "cache_device": ("auto", "cuda", "cpu"), "precision": ("auto", "fp32", "fp16", "bf16"),
           "compile": ("auto", "true", "false"), "tracker": ("none", "mlflow", "wandb"), "gpu": ("", *GPUS)}
# What a resumed run may change: where things are and how they are tracked, never what is trained.
RESUMABLE = {"epochs", "out_dir", "resume_dirs", "cache_dir", "cache_device", "path_remap", "weights_dir", "compile",
             "tracker", "run_name", "mlflow_uri", "mlflow_experiment", "wandb_project", "wandb_entity",
             "log_images_every", "train_info", "train_pairs", "test_info", "test_pairs", "gpu"}
# The keys that say which model is built (a checkpoint's model_args: these and the number of identities).
MODEL_KEYS = ("method", "arch", "img_size", "deep_prompts", "train_blocks", "margin", "scale", "trait_prompts")
RETIRED = {"full": "val_families: 0 (no family held out)"}  # keys configs once had -> what says the same today


def coerce(key, value, source):
    """A config value of the default's type (YAML or command-line text), or a clear error."""
    if key in RETIRED:
        raise UserError(f"{source}: config key {key!r} is retired; write {RETIRED[key]}")
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


def trained_config(saved):
    """The whole config a checkpoint trained with: a key added since has its default, which is what it did (method
    aside: before the key, promptcam trained); a retired key read as what says the same today."""
    saved = dict(saved)
    if saved.pop("full", False):
        saved["val_families"] = 0
    return {**DEFAULTS, "method": METHOD_BEFORE_THE_KEY, **saved}


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
              ("folds", cfg["folds"] == 0 or cfg["folds"] >= 2, "must be 0 (no cross-validation) or at least 2"),
              ("fold", -1 <= cfg["fold"] <= cfg["folds"], "is set by --folds: 0..folds-1 a fold, folds the final run"),
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
