"""Every shipped GPU config rehearsed on the CPU: its exact model (backbone shape, image size, method, prompts,
trained blocks) with random weights and no download, two training steps, a save and an exact resume, the pair
scoring and an explanation figure; and its memory estimated against the GPU it is meant for."""
import json
import os
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import cam
import config
import data
import evaluate
import model
import train
from conftest import ROOT
from tracking import Tracker

GPU_CONFIGS = ["t4x2", "p100", "2080ti_x2"]
MODEL_KEYS = ("arch", "img_size", "method", "deep_prompts", "trait_prompts", "train_blocks")


def shipped(name):
    return config.load_config([os.path.join(ROOT, "configs", f"{name}.yaml")], {})


# The configs that build the same model (their batch, precision and paths aside) are rehearsed once, under their names.
MODELS = {}
for _name in GPU_CONFIGS:
    MODELS.setdefault(tuple(shipped(_name)[k] for k in MODEL_KEYS), []).append(_name)


@pytest.fixture(scope="module")
def random_backbones(tmp_path_factory):
    """Each GPU config's backbone with random weights, in the official layout at its native 518 px grid."""
    folder = tmp_path_factory.mktemp("backbones")
    paths = {}
    for name in GPU_CONFIGS:
        arch = shipped(name)["arch"]
        if arch not in paths:
            paths[arch] = str(folder / f"{arch}.pth")
            torch.save(model.official_backbone_state(model.random_vit(arch, 518)), paths[arch])
    return paths


@pytest.fixture(scope="module")
def twin_faces(tmp_path_factory):
    """Three twin families of two images each, large enough for a 336-px input."""
    folder = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    info = {}
    for person in range(6):
        info[str(person)] = []
        for k in range(2):
            path = str(folder / f"{person}_{k}.png")
            Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(path)
            info[str(person)].append(path)
    import json
    (folder / "info.json").write_text(json.dumps(info))
    (folder / "pairs.json").write_text(json.dumps([["0", "1"], ["2", "3"], ["4", "5"]]))
    return str(folder)


def start(argv):
    args, cfg, resume = train.configure(argv)
    procs = train.start_processes(cfg)
    train_set = train.load_train_set(cfg, procs, resume)
    return cfg, train_set, train.start_run(cfg, train_set, procs, resume)


@pytest.mark.parametrize("names", MODELS.values(), ids="+".join)
def test_each_gpu_configs_model_trains_saves_resumes_scores_and_explains(names, random_backbones, twin_faces, tmp_path):
    name = names[0]
    config = shipped(name)
    argv = ["--cfg", os.path.join(ROOT, "configs", f"{name}.yaml"), "--arch", random_backbones[config["arch"]],
            "--train_info", f"{twin_faces}/info.json", "--train_pairs", f"{twin_faces}/pairs.json", "--path_remap", "",
            "--cache_dir", str(tmp_path / "cache"), "--out_dir", str(tmp_path / "run"), "--tracker", "none",
            "--images_per_person", "1", "--batch_size", "4", "--val_families", "1"]  # a smaller batch; the config's shapes
    cfg, train_set, run = start(argv)
    vit = run.raw.vit.cfg
    shape = model.ARCH_SHAPES[config["arch"]]
    assert (vit.embed_dim, vit.depth, vit.patch_size, vit.num_registers, vit.img_size) == \
        (shape["embed_dim"], shape["depth"], shape["patch_size"], shape["num_registers"], config["img_size"])
    assert (run.raw.method, run.raw.train_blocks) == (config["method"], config["train_blocks"])
    assert run.raw.trait_prompts.shape[0] == config["trait_prompts"] and run.raw.deep_prompts.shape[1] == config["deep_prompts"]
    family = torch.tensor([0, 2])  # one twin family, one image each: the smallest batch with a sibling in it
    losses = [float(train.train_step(run, family)) for _ in range(2)]
    assert all(np.isfinite(losses)) and losses[1] != losses[0]
    run.tracker = Tracker()
    train.save_checkpoints(run, 0, {})

    _, _, resumed = start(["--resume", str(tmp_path / "run" / "last.pt")])
    for key, value in run.raw.trainable_state().items():
        assert torch.equal(value, resumed.raw.trainable_state()[key]), key
    assert float(train.train_step(resumed, family)) == float(train.train_step(run, family))  # exactly where it stopped

    a, b, kind, _, _ = evaluate.protocol_pairs(train_set.val_split)
    scores, _, _ = evaluate.verifier_scores(run.raw, train_set.val_images, a, b, torch.device("cpu"))
    assert len(scores) == len(kind) and np.isfinite(scores).all()
    evidence, figure = cam.pair_figure(run.raw, train_set.val_images[0], train_set.val_images[2], "A", "B", None, 1,
                                       torch.device("cpu"))
    assert len(evidence.parts) == config["trait_prompts"] and figure.height == 44 + 2 * (20 + 168)


def estimate(capsys, *cfg_paths):
    """bench.py memory in this process (it measures each distinct model once), its exit status and output."""
    status = bench.main(["memory", *(a for path in cfg_paths for a in ("--cfg", path))])
    return status, capsys.readouterr().out


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_each_gpu_config_fits_its_gpu_by_the_estimate(name, capsys, tmp_path):
    status, out = estimate(capsys, os.path.join(ROOT, "configs", f"{name}.yaml"))
    peak, gpu, rest = re.search(r"estimated peak +([\d.]+) GiB per process \(\w+: ([\d.]+) GiB\), plus about ([\d.]+) "
                                r"GiB not estimated", out).groups()
    assert status == 0 and float(peak) + float(rest) < float(gpu) and float(rest) >= 0.4, out
    cfg = shipped(name)
    # the batch holding the triplet family (K more images), and the training images the GPU caches once the
    # validation families are held out: counted on the real split's shape, independently of bench.py
    K = cfg["images_per_person"]
    assert f"up to {cfg['batch_size'] // (2 * K) * 2 * K + K} with the triplet family" in out
    structure = json.load(open(os.path.join(ROOT, "tests", "fixtures", "nd_twin_split_structure.json")))["train"]
    ids = sorted(structure["images"])
    index = {pid: i for i, pid in enumerate(ids)}
    families = data.twin_families(len(ids), [(index[a], index[b]) for a, b in structure["twin_pairs"]])
    twins = [i for i, f in enumerate(families) if len(f) > 1]
    held = set(random.Random(cfg["seed"]).sample(twins, cfg["val_families"]))
    n_train = sum(len(structure["images"][ids[p]]) for i, f in enumerate(families) if i not in held for p in f)
    assert n_train < 6182 and f"{n_train:,} images train" in out
    shape = {k: v for k, v in model.ARCH_SHAPES[cfg["arch"]].items() if k != "native_grid"}
    n_backbone = sum(p.numel() for p in model.ViT(model.ViTConfig(img_size=cfg["img_size"], **shape)).parameters())
    weights = float(re.search(r"weights +([\d.]+) GiB", out).group(1))
    # the backbone, and traits' projection of each patch's 32 numbers (the prompts and the rest are a few MiB), fp32
    n_projection = (cfg["img_size"] // shape["patch_size"]) ** 2 * 32 * shape["embed_dim"]
    expected = 4 * (n_backbone + n_projection) / 2**30
    assert expected - 0.005 <= weights <= expected + 0.02
    cache = float(re.search(r"image cache +([\d.]+) GiB", out).group(1))
    assert cache == pytest.approx(n_train * 3 * cfg["img_size"] ** 2 / 2**30, abs=0.01)  # under a quarter of the GPU
    # what autograd saves grows with the largest batch
    saved = float(re.search(r"saved for backward +([\d.]+) GiB", out).group(1))
    (tmp_path / "double.yaml").write_text(f"batch_size: {2 * cfg['batch_size']}\n")
    status, doubled = estimate(capsys, os.path.join(ROOT, "configs", f"{name}.yaml"), str(tmp_path / "double.yaml"))
    largest = (cfg["batch_size"] // (2 * K) * 2 * K + K, 2 * cfg["batch_size"] // (2 * K) * 2 * K + K)
    growth = float(re.search(r"saved for backward +([\d.]+) GiB", doubled).group(1)) / saved
    assert 0.95 * largest[1] / largest[0] < growth < largest[1] / largest[0] + 0.01  # the fixed part aside
    assert status == 1  # twice the batch no longer fits


# The CPU configs as their headers layer them: the demo, the random style, the stand-in's training and its frozen use.
CPU_LAYERS = {"cpu_demo": ("synth", "ckpt"), "cpu_demo+synth_random": ("synth_random", "ckpt/random"),
              "cpu_demo+cpu_pretrain": ("synth_pretrain", "ckpt/pretrain"),
              "cpu_demo+synth_random+cpu_frozen": ("synth_random", "ckpt/frozen")}  # -> (data folder, out_dir)


@pytest.mark.parametrize("layering", CPU_LAYERS)
def test_each_cpu_config_layering_is_valid_and_builds_its_model(layering, tmp_path, monkeypatch):
    """From the folder the README's commands run in: data under data/, the stand-in backbone where cpu_pretrain
    writes it, each run in a folder of its own; the config passes every check and its model takes a batch."""
    monkeypatch.chdir(tmp_path)
    layers = layering.split("+")
    cfg = config.load_config([os.path.join(ROOT, "configs", f"{name}.yaml") for name in layers], {})
    folder, out_dir = CPU_LAYERS[layering]
    assert cfg["train_info"] == f"data/{folder}/train_info.json" and cfg["cache_dir"] == f"data/{folder}/cache"
    assert cfg["out_dir"] == out_dir
    if "cpu_frozen" in layers:  # the backbone cpu_pretrain writes, in the official layout
        assert cfg["arch"] == "ckpt/pretrain/backbone.pth" and cfg["train_blocks"] == 0
        assert [p.split(":")[0] for p in config.config_problems(cfg)] == ["arch"]  # not written yet
        os.makedirs("ckpt/pretrain")
        torch.save(model.official_backbone_state(model.load_vit("scratch_vit_tiny14", cfg["img_size"])), cfg["arch"])
    assert config.config_problems(cfg) == []
    verifier = model.build_verifier(cfg["arch"], cfg["img_size"], 5, cfg["deep_prompts"], cfg["train_blocks"],
                                    **{k: cfg[k] for k in ("method", "margin", "scale", "trait_prompts")})
    assert verifier.method == ("arcface" if "cpu_pretrain" in layers else "traits")
    assert any(p.requires_grad for p in verifier.vit.parameters()) == ("cpu_frozen" not in layers)
    with torch.no_grad():
        emb = verifier.eval().encode(torch.randn(2, 3, cfg["img_size"], cfg["img_size"]))
    assert torch.isfinite(verifier.score_pairs(emb, [0], [1])).all()
