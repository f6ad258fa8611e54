import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import cam
from conftest import run_py


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory, synth_dir):
    """The same faces as a user might have them: grayscale PNG, RGBA PNG, a non-square JPEG."""
    tmp = tmp_path_factory.mktemp("odd")
    info = json.load(open(f"{synth_dir}/test_info.json"))
    first, second = sorted(info)[:2]
    gray = tmp / "a_gray.png"
    Image.open(info[first][0]).convert("L").resize((300, 300)).save(gray)
    rgba = tmp / "b_rgba.png"
    Image.open(info[second][0]).convert("RGBA").save(rgba)
    wide = tmp / "c_wide.jpg"
    Image.open(info[first][1]).resize((90, 60)).save(wide)
    return str(gray), str(rgba), str(wide)


def test_pair_figure_and_verdict(trained_run, odd_images, tmp_path):
    tmp, _ = trained_run
    out = tmp_path / "pair.png"
    proc = run_py(["cam.py", odd_images[0], odd_images[1], "--ckpt", f"{tmp}/run/best.pt", "--out", str(out)])
    assert "score" in proc.stdout and "threshold" in proc.stdout
    assert ("verdict: same" in proc.stdout) or ("verdict: different" in proc.stdout)
    figure = Image.open(out)
    assert figure.mode == "RGB" and figure.size[0] > 1000 and figure.size[1] > 150
    run_py(["cam.py", odd_images[0], odd_images[2], "--ckpt", f"{tmp}/run/best.pt", "--out", str(tmp_path / "w.png")])


def test_bad_inputs_are_clear(trained_run, odd_images, tmp_path):
    tmp, _ = trained_run
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    proc = run_py(["cam.py", odd_images[0], str(broken), "--ckpt", f"{tmp}/run/best.pt"], check=False)
    assert proc.returncode != 0 and f"{broken}: cannot read image" in proc.stderr
    proc = run_py(["cam.py", odd_images[0], str(tmp_path / "missing.jpg"), "--ckpt", f"{tmp}/run/best.pt"], check=False)
    assert "missing.jpg: no such image file" in proc.stderr
    torch.save({"weights": torch.zeros(3)}, tmp_path / "nomodel.pt")
    proc = run_py(["cam.py", odd_images[0], odd_images[1], "--ckpt", str(tmp_path / "nomodel.pt")], check=False)
    assert proc.returncode != 0 and "nomodel.pt: not a training checkpoint of this project" in proc.stderr


def test_greedy_blur_ranks_every_head_once(trained_run, synth_dir):
    tmp, _ = trained_run
    model, ckpt = cam.load_model(f"{tmp}/run/best.pt", torch.device("cpu"))
    info = json.load(open(f"{synth_dir}/test_info.json"))
    pid = sorted(info)[0]
    a, b = (cam.read_image(p, ckpt["config"]["img_size"]) for p in info[pid][:2])
    enc_a, enc_b = cam.encode_pair(model, a, b, torch.device("cpu"))
    order, score = cam.rank_heads(model, enc_a, enc_b)
    assert sorted(order) == list(range(model.num_heads))
    score2, heads, maps = cam.explain(model, enc_a, enc_b, top=1)
    assert score2 == score and heads == order[:1]
    np.testing.assert_allclose(maps["contrast_a"], maps["self_a"] - maps["cross_b_on_a"])
    grid = model.vit.grid
    assert maps["cross_a_on_b"].shape == (model.num_heads, grid, grid)
    # deletion of every patch and insertion of none give the same (patch-free) score
    P = grid * grid
    order_ = np.arange(P)
    deletion = cam.curves(model, enc_a, enc_b, order_, order_, insertion=False)
    insertion = cam.curves(model, enc_a, enc_b, order_, order_, insertion=True)
    assert deletion[0] == pytest.approx(score, abs=1e-5) and insertion[-1] == pytest.approx(score, abs=1e-5)
    assert deletion[-1] == pytest.approx(insertion[0], abs=1e-5)


def test_gallery_faithfulness_and_trait_hits(trained_run, synth_dir, tmp_path):
    tmp, _ = trained_run
    ckpt = f"{tmp}/run/best.pt"
    run_py(["cam.py", "--pairs", "test", "--n", "4", "--ckpt", ckpt, "--out", str(tmp_path / "gallery")])
    pages = sorted(os.listdir(tmp_path / "gallery"))
    assert pages == ["index.html", "pair_000_twin.png", "pair_001_twin.png", "pair_002_genuine.png",
                     "pair_003_genuine.png"]
    proc = run_py(["cam.py", "--faithfulness", "--n", "4", "--ckpt", ckpt])
    assert "deletion:  maps" in proc.stdout and "insertion: maps" in proc.stdout
    proc = run_py(["cam.py", "--trait-hits", f"{synth_dir}/traits.json", "--n", "4", "--ckpt", ckpt])
    assert "contrast-map peak on a differing trait:" in proc.stdout and "/8 =" in proc.stdout


def test_marks_map_to_the_patches_they_cover():
    # a mark at the centre of a 56 px image (4x4 grid of 14 px) touches the four middle patches
    assert cam.patches_with_marks([[28, 28, 2]], 56, 56, 4) == {5, 6, 9, 10}
    assert cam.patches_with_marks([[7, 7, 1]], 112, 56, 4) == {0}  # saved at 112 px, used at 56 px


def test_traits_maps_explain_the_score_evaluate_gives(tmp_path, synth_dir):
    """Verifier v2: the figure's per-prompt terms add up to the pair score evaluate.py uses and to 1 - it, the maps are
    those prompts' attention, and the deletion and insertion curves start from and return to that score."""
    from conftest import tiny_config
    import data
    from model import read_training_checkpoint, verifier_from_checkpoint
    cfg = tiny_config(tmp_path, synth_dir, epochs=1, method="traits", trait_prompts=4)
    run_py(["train.py", "--cfg", cfg])
    ckpt_path = str(tmp_path / "run" / "best.pt")
    model = verifier_from_checkpoint(read_training_checkpoint(ckpt_path), ckpt_path).eval()
    split = data.load_split(f"{synth_dir}/test_info.json", f"{synth_dir}/test_pairs.json")
    images = data.build_cache(split.paths, 56, str(tmp_path / "cache"), verbose=False)
    a, b, _ = cam.pick_pairs(split, 1)[0]
    with torch.no_grad():
        emb = model.encode(data.normalize(images[[a, b]]))
    protocol_score = float(model.score_pairs(emb, [0], [1])[0])
    _, score, held, apart, maps = cam.read_traits(model, images[a], images[b], torch.device("cpu"))
    assert held.shape == apart.shape == (4,) and score == pytest.approx(protocol_score, abs=1e-5)
    assert held.sum() == pytest.approx(score, abs=1e-5) and apart.sum() == pytest.approx(1 - score, abs=1e-5)
    assert maps.shape == (2, 4, 4, 4) and np.all(maps >= 0) and np.all(maps.sum((2, 3)) <= 1 + 1e-5)
    score_e, contrast_a, _, order_a, order_b, curves = cam.evidence(model, images[a], images[b], torch.device("cpu"), 3)
    np.testing.assert_allclose(contrast_a, (apart[:, None, None] * maps[0]).sum(0), rtol=1e-6)
    deletion, insertion = curves(order_a, order_b, False), curves(order_a, order_b, True)
    assert deletion[0] == pytest.approx(score, abs=1e-5) and insertion[-1] == pytest.approx(score, abs=1e-5)
    assert len(deletion) == 17 and not np.allclose(deletion, score)  # hiding patches moves the score
    proc = run_py(["cam.py", "--pairs", "test", "--n", "2", "--heads", "2", "--ckpt", ckpt_path,
                   "--out", str(tmp_path / "gallery")])
    assert "wrote 2 pair pages" in proc.stdout
    with Image.open(tmp_path / "gallery" / "pair_000_twin.png") as im:
        assert im.height > 2 * 150  # two trait-prompt rows
    proc = run_py(["cam.py", "--trait-hits", f"{synth_dir}/traits.json", "--n", "2", "--ckpt", ckpt_path])
    assert "/4 =" in proc.stdout
