import glob
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import data
import synth
from conftest import FIXTURES, ROOT, on_a_full_disk, run_py, write_set


def test_every_problem_is_reported_at_once(tmp_path):
    info_path, pairs_path, info = write_set(tmp_path, {"1": 3, "2": 3, "3": 1}, [["1", "2"], ["3", "99"]])
    os.remove(info["1"][0])
    info["2"].append(info["2"][0])  # the same file twice
    (tmp_path / "info.json").write_text(json.dumps(info))
    with pytest.raises(data.DataError) as err:
        data.load_split(info_path, pairs_path)
    text = str(err.value)
    assert "4 problem(s)" in text
    assert f"{info['1'][0]}: image file not found (id 1)" in text
    assert "id 99 has no images in" in text
    assert "id 3 has 1 image(s)" in text
    assert f"{info['2'][0]} is listed twice" in text


def test_unreadable_images_are_named_and_nothing_is_cached(tmp_path):
    info_path, pairs_path, info = write_set(tmp_path, {"1": 2, "2": 2}, [["1", "2"]])
    with open(info["2"][1], "wb") as f:
        f.write(b"not a jpeg")
    split = data.load_split(info_path, pairs_path)
    with pytest.raises(data.DataError, match=f"{info['2'][1]}: cannot read image"):
        data.build_cache(split.paths, 16, str(tmp_path / "cache"), verbose=False)
    assert not os.path.exists(tmp_path / "cache") or not os.listdir(tmp_path / "cache")


def test_bad_json_and_missing_files_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(data.DataError, match="bad.json: info file is not valid JSON"):
        data.load_split(str(tmp_path / "bad.json"), str(tmp_path / "bad.json"))
    with pytest.raises(data.DataError, match="nope.json: info file not found"):
        data.load_split(str(tmp_path / "nope.json"), str(tmp_path / "bad.json"))


def test_path_remap_and_families(tmp_path):
    info_path, pairs_path, info = write_set(tmp_path, {"a": 2, "b": 2, "c": 2, "d": 2, "e": 2},
                                            [["a", "b"], ["b", "c"], ["a", "c"], ["d", "e"]])
    moved = {pid: [p.replace(str(tmp_path), "/kaggle/input/nd") for p in ps] for pid, ps in info.items()}
    (tmp_path / "info.json").write_text(json.dumps(moved))
    split = data.load_split(info_path, pairs_path, f"/kaggle/input/nd={tmp_path}")
    assert split.paths[0] == info["a"][0]
    assert sorted(map(len, split.families)) == [2, 3]  # the triplet is one family


def test_a_missing_pairs_file_lists_the_json_files_that_are_there(tmp_path):
    info_path, pairs_path, _ = write_set(tmp_path, {"1": 2, "2": 2}, [["1", "2"]])
    os.replace(pairs_path, tmp_path / "train_twin_pairs.json")
    missing = str(tmp_path / "train_twin_id_pairs.json")
    with pytest.raises(data.DataError) as err:
        data.load_split(info_path, missing)
    text = str(err.value)
    assert f"{missing}: pairs file not found" in text
    assert "train_twin_pairs.json" in text and "info.json" in text
    with pytest.raises(data.DataError, match=f"the folder {tmp_path / 'gone'} does not exist"):
        data.load_split(str(tmp_path / "gone" / "info.json"), missing)


def test_a_wrong_path_remap_is_named_before_the_missing_images(tmp_path):
    info_path, pairs_path, info = write_set(tmp_path, {"1": 2, "2": 2}, [["1", "2"]])
    with pytest.raises(data.DataError) as err:
        data.load_split(info_path, pairs_path, f"/kaggle/input/nd={tmp_path}/elsewhere")
    lines = str(err.value).splitlines()
    assert "no image path in" in lines[1] and "starts with /kaggle/input/nd" in lines[1]
    assert f"the folder {tmp_path}/elsewhere does not exist" in lines[2]


def test_cache_is_reused_and_rebuilt_when_files_or_size_change(tmp_path):
    info_path, pairs_path, info = write_set(tmp_path, {"1": 2, "2": 2}, [["1", "2"]])
    split = data.load_split(info_path, pairs_path)
    cache_dir = str(tmp_path / "cache")
    first = data.build_cache(split.paths, 16, cache_dir, verbose=False)
    assert first.dtype == torch.uint8 and first.shape == (4, 3, 16, 16)
    assert len(os.listdir(cache_dir)) == 1
    assert torch.equal(data.build_cache(split.paths, 16, cache_dir, verbose=False), first)
    assert data.build_cache(split.paths, 20, cache_dir, verbose=False).shape[-1] == 20
    from PIL import Image
    red = Image.new("RGB", (30, 30), (255, 0, 0))
    red.paste((255, 255, 255), (0, 0, 4, 4))  # a corner, so that it is not one flat colour
    red.save(info["1"][0])  # same path, new content
    os.utime(info["1"][0], ns=(1, 1))
    rebuilt = data.build_cache(split.paths, 16, cache_dir, verbose=False)
    assert not torch.equal(rebuilt[0], first[0]) and rebuilt[0, 0].float().mean() > 250


def test_a_damaged_cache_is_rebuilt_and_a_full_disk_leaves_no_partial_cache(tmp_path):
    info_path, pairs_path, _ = write_set(tmp_path, {"1": 2, "2": 2}, [["1", "2"]])
    split = data.load_split(info_path, pairs_path)
    cache_dir = str(tmp_path / "cache")
    first = data.build_cache(split.paths, 16, cache_dir, verbose=False)
    (cached,) = glob.glob(f"{cache_dir}/*.pt")
    with open(cached, "r+b") as f:
        f.truncate(100)
    build = (f"import data; s = data.load_split({info_path!r}, {pairs_path!r}); "
             f"print(data.build_cache(s.paths, 16, {cache_dir!r}, verbose=False).sum().item())")
    proc = run_py(["-c", build])
    assert f"{cached} is unreadable" in proc.stdout and proc.stdout.split()[-1] == str(first.sum().item())
    os.remove(cached)
    proc = on_a_full_disk(build, 512)
    assert proc.returncode != 0 and f"could not save {cached} (OSError" in proc.stderr, proc.stderr[-500:]
    assert os.listdir(cache_dir) == []


def test_two_runs_can_build_the_same_cache_at_once(tmp_path):
    """A training run and an evaluation started together: run A is held between writing its cache and
    renaming it into place while run B builds the same cache; both must end with it."""
    info_path, pairs_path, _ = write_set(tmp_path, {"1": 2, "2": 2}, [["1", "2"]])
    build = (f"import data; s = data.load_split({info_path!r}, {pairs_path!r}); "
             f"data.build_cache(s.paths, 16, {str(tmp_path / 'cache')!r}, verbose=False)")
    held = ("import os, time; replace = os.replace\n"
            "def held_replace(*a):\n"
            f"    open({str(tmp_path / 'ready')!r}, 'w').close()\n"
            f"    while not os.path.exists({str(tmp_path / 'go')!r}): time.sleep(0.05)\n"
            "    replace(*a)\n"
            "os.replace = held_replace\n" + build)
    run_a = subprocess.Popen([sys.executable, "-c", held], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    while not (tmp_path / "ready").exists():
        assert run_a.poll() is None, run_a.stderr.read()
        time.sleep(0.05)
    run_py(["-c", build])
    (tmp_path / "go").touch()
    assert run_a.wait(timeout=60) == 0, run_a.stderr.read()
    split = data.load_split(info_path, pairs_path)
    assert data.build_cache(split.paths, 16, str(tmp_path / "cache"), verbose=False).shape == (4, 3, 16, 16)


def test_family_batches_cover_every_image_with_siblings_together(synth_dir):
    split = data.load_split(f"{synth_dir}/train_info.json", f"{synth_dir}/train_pairs.json")
    family_of = {p: f for f, members in enumerate(split.families) for p in members}
    per_rank = [data.FamilyBatches(split, 4, 3, seed=5, rank=r, world=2) for r in range(2)]
    epochs = [b.epoch(0) for b in per_rank]
    assert len(epochs[0]) == len(epochs[1]) == len(per_rank[0])
    seen = torch.cat([torch.cat(e) for e in epochs])
    assert set(seen.tolist()) == set(range(len(split.paths)))  # every image at least once per epoch
    for batch in epochs[0]:
        people = set(split.person[batch].tolist())
        for p in people:  # every person's whole family is in the batch, K images each
            assert set(split.families[family_of[p]]) <= people
            assert (split.person[batch] == p).sum() % 4 == 0
    assert all(torch.equal(x, y) for x, y in zip(per_rank[0].epoch(0), epochs[0]))  # a function of (seed, epoch)
    assert not all(torch.equal(x, y) for x, y in zip(per_rank[0].epoch(1), epochs[0]))


def test_validation_holds_out_whole_twin_families(synth_dir):
    split = data.load_split(f"{synth_dir}/train_info.json", f"{synth_dir}/train_pairs.json")
    train, val = data.hold_out_families(split, 3, seed=0)
    assert len(val.families) == 3 and all(len(f) >= 2 for f in val.families)
    assert not set(train.ids) & set(val.ids) and len(train.ids) + len(val.ids) == len(split.ids)
    assert data.hold_out_families(split, 3, seed=0)[1].ids == val.ids


def test_augmentation_is_seeded_per_sample_and_keeps_sides():
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    images[:, :, 12:20, 2:8] = 255  # a bright mark on the left side
    a = data.augment(images, torch.Generator().manual_seed(0))
    b = data.augment(images, torch.Generator().manual_seed(0))
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.allclose(a[0], a[1])  # each sample gets its own transform
    left, right = a[..., :16].mean((1, 2, 3)), a[..., 16:].mean((1, 2, 3))
    assert (left > right).all()  # no horizontal flip by default
    flipped = data.augment(images, torch.Generator().manual_seed(0), hflip=True)
    mirrored = (flipped[..., :16].mean((1, 2, 3)) < flipped[..., 16:].mean((1, 2, 3))).tolist()
    # hflip mirrors the samples whose ninth uniform draw is positive, and changes nothing else
    draws = torch.rand(4, 9, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert mirrored == (draws[:, 8] > 0).tolist() and 0 < sum(mirrored) < 4
    for i, m in enumerate(mirrored):
        torch.testing.assert_close(flipped[i], a[i].flip(-1) if m else a[i], atol=0.05, rtol=0)


@pytest.mark.parametrize("traits", ["sites", "random"])
def test_synth_real_shape_matches_the_split(tmp_path, traits):
    run_py(["synth.py", "--out", str(tmp_path), "--shape", "real", "--size", "16", "--traits", traits],
           timeout=900)
    with open(os.path.join(FIXTURES, "nd_twin_split_structure.json")) as f:
        real = json.load(f)
    for name, n_ids, n_images in (("train", 353, 6182), ("test", 62, 907)):
        split = data.load_split(str(tmp_path / f"{name}_info.json"), str(tmp_path / f"{name}_pairs.json"))
        assert len(split.ids) == n_ids and len(split.paths) == n_images
        assert sorted(map(sorted, json.load(open(tmp_path / f"{name}_pairs.json")))) == \
            sorted(map(sorted, real[name]["twin_pairs"]))
    marks = json.load(open(tmp_path / "traits.json"))["marks"]
    assert len(marks) == 6182 + 907 and all(len(v) == 3 and all(len(m) == 3 for m in v) for v in marks.values())
    from evaluate import protocol_pairs, GENUINE, TWIN, OTHER
    test = data.load_split(str(tmp_path / "test_info.json"), str(tmp_path / "test_pairs.json"))
    _, _, kind, _, _ = protocol_pairs(test, all_impostors=True)
    assert ((kind == GENUINE).sum(), (kind == TWIN).sum(), (kind != GENUINE).sum()) == (9485, 9849, 401386)
    assert (kind == OTHER).sum() == 401386 - 9849


def test_random_style_twins_in_the_same_photo_conditions_differ_only_inside_their_marks():
    import numpy as np
    size = 112
    rng = np.random.default_rng(3)
    look = synth._family_look(rng)
    marks_a, marks_b = synth._random_traits(rng, look, 2, n=4)
    kinds = {m["kind"] for m in marks_a + marks_b}
    assert len(kinds) >= 3, kinds  # marks of several kinds
    for trial in range(3):
        cond = synth._photo_conditions(np.random.default_rng(trial), size, "random")
        im_a, placed_a = synth._draw_face(look, marks_a, cond, size)
        im_b, placed_b = synth._draw_face(look, marks_b, cond, size)
        differs = np.abs(np.asarray(im_a, dtype=np.int16) - np.asarray(im_b, dtype=np.int16)).max(-1) > 0
        yy, xx = np.mgrid[0:size, 0:size] + 0.5
        inside = np.zeros_like(differs)
        for x, y, r in placed_a + placed_b:  # a mark's radius, plus the 3 px a Lanczos downsampling reaches
            inside |= (xx - x) ** 2 + (yy - y) ** 2 <= (r + 4.5) ** 2  # and a pixel's diagonal
        assert differs.any() and not (differs & ~inside).any(), np.argwhere(differs & ~inside)[:5]
        assert all(r < 9 for _, _, r in placed_a + placed_b)  # small: a mark reaches at most 8 px at 112
    # and another photo of the same person differs everywhere: pose, light and background vary
    other = synth._photo_conditions(np.random.default_rng(99), size, "random")
    im_a2, _ = synth._draw_face(look, marks_a, other, size)
    changed = np.abs(np.asarray(im_a2, dtype=np.int16) - np.asarray(im_a, dtype=np.int16)).max(-1) > 20
    assert changed.mean() > 0.5


def within_rounding(ratio, top, bottom, half_step, ratio_half_step):
    """Whether a printed ratio can be top / bottom, each printed value being off by up to its half step."""
    low, high = (top - half_step) / (bottom + half_step), (top + half_step) / (bottom - half_step)
    return low - ratio_half_step <= ratio <= high + ratio_half_step


def test_bench_data_and_scoring_print_their_figures(synth_dir, tmp_path, capsys):
    import re
    import shutil
    import bench
    from conftest import TINY_ARCH
    shutil.copytree(synth_dir, tmp_path / "synth", ignore=shutil.ignore_patterns("cache"))
    bench.main(["data", "--data", str(tmp_path / "synth"), "--size", "56", "--batch-size", "8", "--batches", "2"])
    out = capsys.readouterr().out
    for what in ("batches only     ", "with augmentation"):
        cached, decoded, ratio = map(float, re.search(
            rf"{what}: cache indexing +([\d.]+) images/s, PIL-decoding DataLoader +([\d.]+) images/s, ratio ([\d.]+)x",
            out).groups())
        # the ratio of the unrounded rates: within what the printed rates' rounding allows
        assert cached > 0 and decoded > 0 and within_rounding(ratio, cached, decoded, 0.5, 0.05)
    bench.main(["scoring", "--arch", TINY_ARCH, "--img-size", "56"])
    out = capsys.readouterr().out
    encode = float(re.search(r"encode 100 images: +([\d.]+) s", out).group(1))
    score, share = map(float, re.search(r"score 10,000 pairs \(cache\): +([\d.]+) s += ([\d.]+)% of encoding",
                                        out).groups())
    assert encode > 0 and within_rounding(share / 100, score, encode, 0.0005, 0.0005)


def test_the_training_images_sit_on_the_gpu_under_a_quarter_of_it_unless_the_config_says():
    assert data.cache_on_gpu("auto", 24, 100) and not data.cache_on_gpu("auto", 25, 100)
    assert data.cache_on_gpu("cuda", 90, 100) and not data.cache_on_gpu("cpu", 1, 100)
    assert not data.cache_on_gpu("auto", 1, None)  # no GPU named: the estimate keeps the cache in RAM
