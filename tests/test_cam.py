import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import cam
import data
import evaluate
from conftest import METHOD_RUNS, run_py
from checkpoints import read_training_checkpoint, verifier_from_checkpoint
from model import Evidence, Part, patch_masks

CPU = torch.device("cpu")


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


def protocol_score(model, image_a, image_b):
    """The pair's score as evaluate.py computes it: both images encoded in a batch, then scored from the cache."""
    enc = evaluate.encode_images(model, torch.stack([image_a, image_b]), CPU)
    return float(model.score_pairs(enc, [0], [1])[0])


@pytest.mark.xdist_group("promptcam")
def test_pair_figure_score_and_verdict(promptcam_run, odd_images, tmp_path):
    tmp, _ = promptcam_run
    out = tmp_path / "pair.png"
    proc = run_py(["cam.py", odd_images[0], odd_images[1], "--ckpt", f"{tmp}/run", "--out", str(out)])
    score, threshold, verdict = re.search(r"score ([-+.\d]+)  threshold ([-+.\d]+)  verdict: (\w+)", proc.stdout).groups()
    model, ckpt = cam.load_model(f"{tmp}/run/best.pt", CPU)
    images = [cam.read_image(p, 56) for p in odd_images[:2]]
    assert float(score) == pytest.approx(protocol_score(model, *images), abs=1e-4)
    assert float(threshold) == pytest.approx(ckpt["threshold"], abs=1e-4)
    assert verdict == ("same" if float(score) >= float(threshold) else "different")
    # a header, where they differ, and one row per head (2 heads): each row a 20-px caption over 168-px tiles
    figure = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert figure.shape[0] == 44 + 3 * (20 + 168)
    photo, a_map = figure[44 + 20 + 18:44 + 188, :150], figure[44 + 20 + 18:44 + 188, 308:458]
    assert np.abs(photo - a_map).mean() > 10  # a map is drawn over the face, not the face alone
    run_py(["cam.py", odd_images[0], odd_images[2], "--ckpt", f"{tmp}/run", "--out", str(tmp_path / "w.png")])


def test_bad_inputs_are_clear(trained_run, odd_images, tmp_path):
    tmp, _ = trained_run
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really")
    proc = run_py(["cam.py", odd_images[0], str(broken), "--ckpt", f"{tmp}/run/best.pt"], check=False)
    assert proc.returncode == 1 and f"{broken}: cannot read image" in proc.stderr
    proc = run_py(["cam.py", odd_images[0], str(tmp_path / "missing.jpg"), "--ckpt", f"{tmp}/run/best.pt"], check=False)
    assert "missing.jpg: no such image file" in proc.stderr
    torch.save({"weights": torch.zeros(3)}, tmp_path / "nomodel.pt")
    proc = run_py(["cam.py", odd_images[0], odd_images[1], "--ckpt", str(tmp_path / "nomodel.pt")], check=False)
    assert proc.returncode == 1 and "nomodel.pt: not a training checkpoint of this project" in proc.stderr


@pytest.mark.xdist_group("promptcam")
def test_promptcam_evidence_ranks_heads_by_greedy_blur_and_its_maps_are_the_prompts_attention(promptcam_run, synth_dir):
    tmp, _ = promptcam_run
    model, _ = cam.load_model(f"{tmp}/run/best.pt", CPU)
    info = json.load(open(f"{synth_dir}/test_info.json"))
    a, b = (cam.read_image(p, 56) for p in info[sorted(info)[0]][:2])
    evidence = cam.explain_pair(model, a, b, CPU)
    assert evidence.score == pytest.approx(protocol_score(model, a, b), abs=1e-5)
    with torch.no_grad():
        enc = model.encode(data.normalize(torch.stack([a, b])))
    # with two heads, greedy blur keeps last (ranks first) the head whose blur alone moves the score more
    change = [abs(model.pair_maps(enc[0], enc[1], torch.tensor([h == 0, h == 1]))[0] - evidence.score) for h in (0, 1)]
    assert evidence.parts[0].caption.startswith(f"head {int(np.argmax(change))} (rank 1")
    # a head's map on A is where p(B) looks on A: its row of the last block's attention, read on its own
    head = int(evidence.parts[0].caption.split()[1])
    with torch.no_grad():
        _, attn = model.score_prompts(enc.prompt[1][None, None], enc[0:1])
    np.testing.assert_allclose(evidence.parts[0].maps[0], attn[0, head, 0].reshape(4, 4).numpy(), atol=1e-6)
    # deleting no patch and inserting all give the score; deleting all and inserting none the same patch-free one
    order = np.arange(16)
    deletion, insertion = evidence.rescore(order, order, False), evidence.rescore(order, order, True)
    assert deletion[0] == pytest.approx(evidence.score, abs=1e-5)
    assert insertion[-1] == pytest.approx(evidence.score, abs=1e-5)
    assert deletion[-1] == pytest.approx(insertion[0], abs=1e-5)


def test_patch_masks_keep_the_first_k_patches_of_an_order():
    keep = patch_masks(np.array([2, 0, 1]), insertion=True)
    assert keep.tolist() == [[False, False, False], [False, False, True], [True, False, True], [True, True, True]]
    assert (patch_masks(np.array([2, 0, 1]), insertion=False) == ~keep).all()


def test_area_is_the_trapezoid_rule():
    assert cam.area(np.array([0.0, 1.0])) == 0.5
    assert cam.area(np.array([1.0, 1.0, 1.0, 1.0])) == 1.0
    assert cam.area(np.array([0.0, 0.5, 1.0, 0.5, 0.0])) == pytest.approx(0.5)


class StubVerifier:
    """A verifier whose evidence is fixed: where they differ peaks on one patch; rescoring follows given curves."""
    has_maps = True

    def __init__(self, peaks, grid=4):
        self.vit = type("ViT", (), {"grid": grid})()
        self.peaks = list(peaks)  # one per pair, in turn

    def evidence(self, pair):
        peak = self.peaks.pop(0)
        differ = np.zeros((2, 4, 4))
        differ[:, peak // 4, peak % 4] = 1.0
        cell = np.zeros((4, 4))  # one part whose map reaches the peak's 2 x 2 cell and peaks on it
        cell[peak // 8 * 2:peak // 8 * 2 + 2, peak % 4 // 2 * 2:peak % 4 // 2 * 2 + 2] = 0.1
        cell[peak // 4, peak % 4] = 0.5
        part = Part("stub", (cell, cell), ("", ""), 1.0, (cell, cell), ("", ""), 1.0, "")
        order = np.arange(16)
        # map order: the score leaves 1 at once on deletion and returns at once on insertion; random orders linger
        rescore = (lambda oa, ob, insertion: np.r_[1.0 if not insertion else 0.0, np.full(16, 1.0 if insertion else 0.0)]
                   if np.array_equal(oa, order) else np.linspace(1.0, 0.0, 17) if not insertion else
                   np.linspace(0.0, 1.0, 17))
        return Evidence(1.0, "stub", [part], differ, "", (order, order), rescore)


def test_trait_hits_count_peaks_on_the_marks_and_faithfulness_compares_orders(tmp_path, synth_dir, capsys):
    traits = json.load(open(f"{synth_dir}/traits.json"))["marks"]
    split = data.load_split(f"{synth_dir}/test_info.json", f"{synth_dir}/test_pairs.json")
    ckpt = {"config": {"img_size": 56, "test_info": f"{synth_dir}/test_info.json", "cache_dir": str(tmp_path),
                       "test_pairs": f"{synth_dir}/test_pairs.json", "path_remap": ""}}
    args = type("Args", (), {"n": 2, "trait_hits": f"{synth_dir}/traits.json", "test_info": None, "test_pairs": None,
                             "ckpt": "stub"})()
    twins = [p for p in cam.pick_pairs(split, 4) if p[2] == evaluate.TWIN][:2]
    # per pair, a patch that holds a mark on both twins' images; and one that holds none on any of the four
    marked = [[cam.patches_with_marks(traits[split.paths[i]], 56, 56, 4) for i in (a, b)] for a, b, _ in twins]
    on_both = [min(set.intersection(*pair)) for pair in marked]
    on_none = min(set(range(16)) - set.union(*(s for pair in marked for s in pair)))
    assert cam.trait_hits(StubVerifier(on_both), ckpt, args, CPU)[0] == 1.0
    looks, reaches = map(int, re.search(r"holds one and more: (\d+)/(\d+)", capsys.readouterr().out).groups())
    assert looks == reaches > 0  # every cell that holds a mark and a bare patch: its peak on the mark
    assert cam.trait_hits(StubVerifier([on_none] * 2), ckpt, args, CPU)[0] == 0.0
    none_found = re.search(r"holds one and more: (\d+)/", capsys.readouterr().out)
    assert none_found is None or none_found.group(1) == "0"
    summary = cam.faithfulness(StubVerifier([0] * 2), ckpt, args, CPU)
    # map order: deletion area 1 - 1/32 (one trapezoid at half height), insertion area 1/32; random: both 1/2
    assert summary["deletion_map"] == pytest.approx(1 - 1 / 32) and summary["insertion_map"] == pytest.approx(1 / 32)
    assert summary["deletion_random"] == pytest.approx(0.5) and summary["insertion_random"] == pytest.approx(0.5)
    assert summary["map_beats_random_deletion"] == summary["map_beats_random_insertion"] == 1.0
    assert "maps higher on 100% of pairs" in capsys.readouterr().out


def test_gallery_pages_and_the_checks_from_the_command_line(trained_run, synth_dir, tmp_path):
    tmp, _ = trained_run
    run_py(["cam.py", "--pairs", "test", "--n", "4", "--ckpt", f"{tmp}/run", "--out", str(tmp_path / "gallery")])
    pages = sorted(os.listdir(tmp_path / "gallery"))
    assert pages == ["index.html", "pair_000_twin.png", "pair_001_twin.png", "pair_002_genuine.png",
                     "pair_003_genuine.png"]
    out = run_py(["cam.py", "--faithfulness", "--n", "4", "--ckpt", f"{tmp}/run"]).stdout
    deletion = re.search(r"deletion:  maps ([\d.]+)  random ([\d.]+)", out)
    assert deletion and 0 <= float(deletion.group(1)) and 0 <= float(deletion.group(2))
    out = run_py(["cam.py", "--trait-hits", f"{synth_dir}/traits.json", "--n", "4", "--ckpt", f"{tmp}/run"]).stdout
    hits, total = map(int, re.search(r"trait: (\d+)/(\d+) =", out).groups())
    assert total == 8 and 0 <= hits <= total


def test_marks_map_to_the_patches_they_cover():
    # a mark at the centre of a 56 px image (4x4 grid of 14 px) touches the four middle patches
    assert cam.patches_with_marks([[28, 28, 2]], 56, 56, 4) == {5, 6, 9, 10}
    assert cam.patches_with_marks([[7, 7, 1]], 112, 56, 4) == {0}  # saved at 112 px, used at 56 px


def test_traits_evidence_splits_the_score_evaluate_gives(tmp_path, synth_dir, train_once):
    """The parts' shares add up to 1 - score, the score is the one evaluate.py uses, the maps are those prompts'
    attention, and the deletion and insertion curves start from and return to that score."""
    ckpt_path = f"{train_once(**METHOD_RUNS['traits'])[0]}/run/best.pt"
    model = verifier_from_checkpoint(read_training_checkpoint(ckpt_path), ckpt_path).eval()
    split = data.load_split(f"{synth_dir}/test_info.json", f"{synth_dir}/test_pairs.json")
    images = data.build_cache(split.paths, 56, str(tmp_path / "cache"), verbose=False)
    a, b, _ = cam.pick_pairs(split, 1)[0]
    evidence = cam.explain_pair(model, images[a], images[b], CPU)
    assert evidence.score == pytest.approx(protocol_score(model, images[a], images[b]), abs=1e-5)
    shares = [float(re.match(r"trait prompt \d+: ([-\d.]+) of", p.caption).group(1)) for p in evidence.parts]
    assert len(shares) == 4 and shares == sorted(shares, reverse=True)
    assert sum(shares) == pytest.approx(1 - evidence.score, abs=1e-3)  # captions round to 4 decimals
    # where they differ is each patch's exact term of 1 - score on each face; a part's terms are those of its cell
    assert evidence.differ.shape == (2, 4, 4) and evidence.differ.sum() == pytest.approx(1 - evidence.score, abs=1e-5)
    for share, part in zip(shares, evidence.parts):
        cell = part.maps[0] > 0
        for attention in part.maps:  # mean over heads of a softmax row restricted to the prompt's cell
            assert attention.shape == (4, 4) and (attention >= 0).all() and attention.sum() <= 1 + 1e-5
            assert (attention > 0).sum() == 4 and ((attention > 0) == cell).all()  # its 2 x 2 cell and nothing else
        terms = np.stack(part.differences)
        assert terms.sum() == pytest.approx(share, abs=1e-4)
        np.testing.assert_array_equal(np.where(cell, evidence.differ, 0), terms)
    order_a, order_b = evidence.orders
    deletion, insertion = evidence.rescore(order_a, order_b, False), evidence.rescore(order_a, order_b, True)
    assert deletion[0] == pytest.approx(evidence.score, abs=1e-5)
    assert insertion[-1] == pytest.approx(evidence.score, abs=1e-5)
    assert len(deletion) == 17 and not np.allclose(deletion, evidence.score)  # hiding patches moves the score
    proc = run_py(["cam.py", "--pairs", "test", "--n", "2", "--heads", "2", "--ckpt", ckpt_path,
                   "--out", str(tmp_path / "gallery")])
    assert "wrote 2 pair pages" in proc.stdout
    with Image.open(tmp_path / "gallery" / "pair_000_twin.png") as im:
        assert im.height == 44 + 3 * (20 + 168)  # where they differ and two trait-prompt rows


@pytest.mark.xdist_group("arcface")
def test_arcface_answers_through_the_same_path_with_no_maps(tmp_path, synth_dir, train_once):
    run = f"{train_once(**METHOD_RUNS['arcface'])[0]}/run"
    model, _ = cam.load_model(f"{run}/best.pt", CPU)
    info = json.load(open(f"{synth_dir}/test_info.json"))
    faces = info[sorted(info)[0]][:2]
    evidence = cam.explain_pair(model, *(cam.read_image(p, 56) for p in faces), CPU)
    assert evidence.parts == [] and evidence.differ is None
    assert evidence.score == pytest.approx(protocol_score(model, *(cam.read_image(p, 56) for p in faces)), abs=1e-5)
    out = run_py(["cam.py", *faces, "--ckpt", run, "--out", str(tmp_path / "pair.png")]).stdout
    assert "verdict:" in out and Image.open(tmp_path / "pair.png").height == 44 + 20 + 168
    proc = run_py(["cam.py", "--faithfulness", "--ckpt", run], check=False)
    assert proc.returncode == 1 and "method arcface has no maps, so there is nothing to check" in proc.stderr


@pytest.mark.xdist_group("traits")
def test_the_traits_maps_find_the_marks_that_tell_twins_apart(trained_run, synth_dir):
    """On the tiny run (2 x 2 patches a prompt), where-they-differ peaks on one of that face's marks far more often
    than a random patch would, and each prompt's attention peaks on a mark inside its cell more often than a random
    patch of the cell (measured: 75.0% against 36.3%, and 77.8% against 50.3%)."""
    tmp, _ = trained_run
    out = run_py(["cam.py", "--trait-hits", f"{synth_dir}/traits.json", "--n", "32", "--ckpt", f"{tmp}/run"]).stdout
    hits, total, chance = re.search(r"trait: (\d+)/(\d+) = .*would hold one ([\d.]+)%", out).groups()
    looks, reaches, look_chance = re.search(r"holds one and more: (\d+)/(\d+) = .*reach: ([\d.]+)%", out).groups()
    assert int(total) == 64 and int(hits) / 64 >= float(chance) / 100 + 0.25
    assert int(reaches) > 100 and int(looks) / int(reaches) >= float(look_chance) / 100 + 0.15
