"""Bad input: every image mode decoded as it shows, every config value range-checked, one clear line (no traceback)
from every entry point before any work, and nothing already saved lost."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from conftest import ROOT, run_py, save_edited_checkpoint, tiny_config, write_set
from errors import UserError, run_cli

SIDE = 40


def grey():
    """An 8-bit grey picture that uses the whole range."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    return ((x * 255 // (SIDE - 1) + 60 * (y % 3)) % 256).astype(np.uint8)


def colour():
    return np.random.default_rng(0).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)


def as_mode(mode):
    """(an image in `mode`, the 8-bit RGB picture it shows)."""
    g, c = grey(), colour()
    g3 = np.repeat(g[..., None], 3, -1)
    if mode == "1":
        binary = np.where(g > 127, 255, 0).astype(np.uint8)
        return Image.fromarray(binary).convert("1"), np.repeat(binary[..., None], 3, -1)
    if mode in ("L", "LA"):
        return Image.fromarray(g).convert(mode), g3
    if mode in ("P", "PA"):
        palette = Image.fromarray(c).convert("P")
        return palette.convert(mode), np.asarray(palette.convert("RGB"))
    if mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
        return Image.fromarray(c).convert(mode), c
    if mode.startswith("I;16"):  # 16-bit grey: the 8-bit picture times 257
        wide = g.astype(">u2" if mode == "I;16B" else "<u2") * 257
        return Image.frombytes(mode, (SIDE, SIDE), wide.tobytes()), g3
    if mode == "I":  # 32-bit integers holding 16-bit data, as 16-bit PNGs open in some Pillow versions
        return Image.fromarray(g.astype(np.int32) * 257, "I"), g3
    return Image.fromarray(g.astype(np.float32) / 255, "F"), g3  # F: float grey in [0, 1]


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I", "F"]


@pytest.mark.parametrize("mode", MODES)
def test_every_image_mode_decodes_to_the_picture_it_shows(mode, tmp_path):
    import cam
    image, shown = as_mode(mode)
    assert image.mode == mode
    path = str(tmp_path / "face.tif")
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == ("I;16" if mode == "I;16L" else mode)  # TIFF keeps the mode (I;16L is I;16)
    cached = data.build_cache([path], SIDE, str(tmp_path / "cache"), verbose=False)[0].permute(1, 2, 0).numpy()
    explained = cam.read_image(path, SIDE).permute(1, 2, 0).numpy()
    assert np.array_equal(cached, explained)
    tolerance = 3 if mode == "YCbCr" else 1  # YCbCr's conversion rounds
    assert np.abs(cached.astype(int) - shown.astype(int)).max() <= tolerance, mode


def test_transparency_is_laid_over_white(tmp_path):
    rgba = np.zeros((SIDE, SIDE, 4), dtype=np.uint8)
    rgba[:, : SIDE // 2] = (200, 10, 10, 255)  # opaque red on the left, transparent black on the right
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut_out.png")
    decoded = data.decode_rgb(str(tmp_path / "cut_out.png"), SIDE)
    assert (decoded[:, : SIDE // 2 - 2] == (200, 10, 10)).all() and (decoded[:, SIDE // 2 + 2:] == 255).all()


def test_an_image_too_small_for_a_face_is_refused_with_its_name_and_size(tmp_path):
    import cam
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (60, 13)).save(tmp_path / "strip.png")
    for name, size in (("dot.png", "1x1"), ("strip.png", "60x13")):
        with pytest.raises(UserError, match=f"{name}: {size} px is too small to hold a face at the model's 56-px input "
                                            r"\(at least 16 px a side\)"):
            cam.read_image(str(tmp_path / name), 56)
    with pytest.raises(data.DataError, match="dot.png: 1x1 px is too small"):
        data.build_cache([str(tmp_path / "dot.png"), str(tmp_path / "strip.png")], 56, str(tmp_path / "c"), False)


def test_a_picture_of_one_flat_colour_is_refused_by_name(tmp_path):
    import cam
    Image.new("RGB", (40, 40), (0, 0, 0)).save(tmp_path / "blank.png")
    Image.new("RGBA", (40, 40), (90, 20, 20, 0)).save(tmp_path / "clear.png")  # fully transparent: white
    with pytest.raises(UserError, match=r"blank.png: one flat colour \(0, 0, 0\), no face"):
        cam.read_image(str(tmp_path / "blank.png"), 56)
    with pytest.raises(data.DataError, match=r"clear.png: one flat colour \(255, 255, 255\), no face \(a blank or "
                                             r"fully transparent picture\?\)"):
        data.build_cache([str(tmp_path / "clear.png")], 16, str(tmp_path / "c"), False)


def train_error(argv, capsys):
    """train.py's exit status and the message it printed, run in this process."""
    status = run_cli(train.main, argv)
    return status, capsys.readouterr()


def test_every_bad_config_value_is_named_at_once_before_any_image_is_read(tmp_path, synth_dir, capsys):
    (tmp_path / "a_file").write_text("")
    cfg = tiny_config(tmp_path, synth_dir)
    bad = {"epochs": "0", "batch_size": "-5", "lr": "nan", "weight_decay": "-1", "margin": "2", "scale": "inf",
           "images_per_person": "0", "warmup_epochs": "-1", "loss_class": "nan", "seed": "-3",
           "path_remap": "nothing", "cache_dir": f"{tmp_path}/a_file/cache", "out_dir": f"{tmp_path}/a_file/run",
           "arch": "dinov2_vitb14_reg5"}
    argv = ["--cfg", cfg] + [a for k, v in bad.items() for a in (f"--{k}", v)]
    status, out = train_error(argv, capsys)
    lines = out.err.strip().splitlines()
    assert status == 1 and lines[0] == f"{len(bad)} problem(s) with the config:", out.err
    assert {line.split(":")[0].strip() for line in lines[1:]} == set(bad), lines
    assert "lr: nan must be a finite number above 0" in out.err
    assert "arch: 'dinov2_vitb14_reg5' is neither a backbone by name (dinov2_vits14, " in out.err
    assert f"cache_dir: {tmp_path}/a_file/cache cannot be a folder: {tmp_path}/a_file is a file" in out.err
    assert not os.path.exists(tmp_path / "cache") and out.out == ""  # nothing decoded, nothing built
    status, out = train_error(["--cfg", cfg, "--batch_size", "7"], capsys)  # below two families of 2 x 2 images
    assert status == 1 and "batch_size: 7 must hold two twin families" in out.err and "(at least 8)" in out.err


def test_trait_prompts_that_do_not_fit_the_patch_grid_are_refused(tmp_path, synth_dir, capsys):
    cfg = tiny_config(tmp_path, synth_dir)
    status, out = train_error(["--cfg", cfg, "--arch", "dinov2_vits14", "--img_size", "56"], capsys)
    assert status == 1 and "trait_prompts: 4" not in out.err  # 2 x 2 fits a 4 x 4 grid
    status, out = train_error(["--cfg", cfg, "--arch", "dinov2_vits14", "--img_size", "56", "--trait_prompts", "36"],
                              capsys)
    assert status == 1 and ("trait_prompts: 36 must be a square number g x g with g at most the patch grid's side "
                            "(4 at img_size 56)") in out.err
    # a backbone file's patch size is known once it is read: refused when the model is built, before training
    status, out = train_error(["--cfg", cfg, "--trait_prompts", "36"], capsys)
    assert status == 1 and ("trait_prompts=36 tile the face 6 x 6, but the patch grid is 4 x 4: some prompts would "
                            "have no patch to read (use at most 16)") in out.err
    assert "epoch 1/3" not in out.out


def one_line_exit(args, message, cwd=ROOT):
    """A user's mistake: exit 1 with its message, and no traceback."""
    proc = run_py(args, cwd=cwd, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, \
        (args, proc.returncode, proc.stderr[-2000:])
    return proc


def test_data_problems_are_one_message_from_every_entry_point(tmp_path):
    _, _, info = write_set(tmp_path, {"1": 3, "2": 3, "3": 1, "4": 2}, [["1", "2"], ["3", "99"]])
    info["2"].append(info["2"][0])  # a path listed twice
    (tmp_path / "info.json").write_text(json.dumps(info))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"train_info: {tmp_path}/info.json\ntrain_pairs: {tmp_path}/pairs.json\narch: {ROOT}/tests/fixtures/"
                   f"vit/dinov2_tiny_reg4.pth\nimg_size: 56\nout_dir: {tmp_path}/run\ncache_dir: {tmp_path}/cache\n")
    proc = one_line_exit(["train.py", "--cfg", str(cfg)], "3 problem(s) with the data")
    for problem in ("id 3 has 1 image(s); at least 2 are needed", "id 99 has no images in",
                    f"{info['2'][0]} is listed twice (ids 2 and 2)"):
        assert problem in proc.stderr
    (tmp_path / "pairs.json").write_text("[[1, 2")
    one_line_exit(["train.py", "--cfg", str(cfg)], f"{tmp_path}/pairs.json: pairs file is not valid JSON")
    # a person listed twice in an info file: JSON keeps one list silently, so the file is refused by name
    text = json.dumps(info)
    (tmp_path / "info.json").write_text(text[:-1] + ', "1": ' + json.dumps(info["1"][:1]) + "}")
    one_line_exit(["train.py", "--cfg", str(cfg)], f"{tmp_path}/info.json: info file has the key '1' twice")
    (tmp_path / "info.json").write_text("{}")
    (tmp_path / "pairs.json").write_text("[]")
    proc = one_line_exit(["train.py", "--cfg", str(cfg)], "2 problem(s) with the data")
    assert f"{tmp_path}/info.json: no people in it" in proc.stderr
    assert f"{tmp_path}/pairs.json: no twin pairs in it" in proc.stderr
    one_line_exit(["bench.py", "data", "--data", str(tmp_path / "nowhere")], "info file not found")
    (tmp_path / "blocked").write_text("")
    one_line_exit(["synth.py", "--out", str(tmp_path / "blocked" / "synth")],
                  f"--out: {tmp_path}/blocked/synth cannot be a folder: {tmp_path}/blocked is a file")


def test_a_corrupt_image_is_named_by_every_rank_of_a_run_once(tmp_path):
    write_set(tmp_path, {"1": 2, "2": 2, "3": 2, "4": 2}, [["1", "2"], ["3", "4"]])
    with open(tmp_path / "2" / "1.jpg", "wb") as f:
        f.write(b"\xff\xd8 not really a jpeg")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"train_info: {tmp_path}/info.json\ntrain_pairs: {tmp_path}/pairs.json\narch: {ROOT}/tests/fixtures/"
                   f"vit/dinov2_tiny_reg4.pth\nimg_size: 56\nout_dir: {tmp_path}/run\ncache_dir: {tmp_path}/cache\n"
                   f"val_families: 0\nbatch_size: 16\n")
    message = f"{tmp_path}/2/1.jpg: cannot read image (UnidentifiedImageError"
    one_line_exit(["train.py", "--cfg", str(cfg)], message)


def test_data_moved_before_a_resume_shows_the_path_remap_line(trained_run, synth_dir, tmp_path):
    tmp, cfg = trained_run
    moved = tmp_path / "moved"
    shutil.copytree(synth_dir, moved)
    for name in ("train_info.json", "train_pairs.json"):  # the info files stay; the images are gone
        shutil.copy(f"{synth_dir}/{name}", tmp_path / name)
    info = json.load(open(tmp_path / "train_info.json"))
    info = {k: [p.replace(synth_dir, str(tmp_path / "gone")) for p in v] for k, v in info.items()}
    (tmp_path / "train_info.json").write_text(json.dumps(info))
    proc = one_line_exit(["train.py", "--resume", f"{tmp}/run/last.pt", "--train_info", str(tmp_path / "train_info.json"),
                          "--train_pairs", str(tmp_path / "train_pairs.json"), "--epochs", "4"],
                         f"images under {tmp_path}/gone/images are missing; if the data set is elsewhere on this machine,"
                         f" add to the config: path_remap: {tmp_path}/gone/images=/where/it/is/now")
    assert proc.stderr.index("path_remap:") < proc.stderr.index("image file not found")


@pytest.mark.parametrize("given, message", [
    ("face.jpg", "face.jpg: not a checkpoint (a JPEG image)"), ("info.json", "info.json: not a checkpoint (a JSON file)"),
    ("empty.pt", "empty.pt: an empty file, not a checkpoint"), ("folder", "--resume {tmp}/folder: a folder with no last.pt in it"),
    ("missing.pt", "missing.pt: no such checkpoint")])
def test_resume_from_something_that_is_not_a_checkpoint_says_what_it_is(given, message, tmp_path, capsys):
    Image.new("RGB", (20, 20)).save(tmp_path / "face.jpg")
    (tmp_path / "info.json").write_text('{"1": []}')
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    status, out = train_error(["--resume", str(tmp_path / given)], capsys)
    assert status == 1 and message.format(tmp=tmp_path) in out.err and len(out.err.splitlines()) == 1


def test_every_place_a_command_writes_is_made_or_checked_before_its_work(trained_run, synth_dir, tmp_path):
    tmp, _ = trained_run
    (tmp_path / "a_file").write_text("")
    for script in (["evaluate.py", "--out"], ["cam.py", "--pairs", "test", "--out"]):
        proc = one_line_exit([*script, str(tmp_path / "a_file" / "out"), "--ckpt", f"{tmp}/run"],
                             f"--out: {tmp_path}/a_file/out cannot be a folder: {tmp_path}/a_file is a file")
        assert "encoding" not in proc.stdout and "wrote" not in proc.stdout
    faces = [f"{synth_dir}/images/10203/10203d0.jpg", f"{synth_dir}/images/10204/10204d0.jpg"]
    figure = tmp_path / "new" / "folder" / "pair.png"
    out = run_py(["cam.py", *faces, "--ckpt", f"{tmp}/run", "--out", str(figure)]).stdout
    assert f"wrote {figure}" in out and Image.open(figure).size[0] > 500


def test_decode_workers_end_when_their_parent_is_killed(tmp_path):
    """SIGKILL mid-decode: no worker may decode on alone."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)).save(
        tmp_path / "0.png", compress_level=0)
    for k in range(1, 400):  # the same picture under 400 names: each still decoded on its own
        os.link(tmp_path / "0.png", tmp_path / f"{k}.png")
    paths = [str(tmp_path / f"{k}.png") for k in range(400)]
    script = f"import data; data.build_cache({paths!r}, 224, {str(tmp_path / 'cache')!r})"
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert parent.stdout.readline().startswith("decoding 400 images")  # the workers are at it
    workers = children(parent.pid)
    assert workers, "no decode worker found"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 5
    while time.time() < deadline and [w for w in workers if alive(w)]:
        time.sleep(0.1)
    assert not [w for w in workers if alive(w)], "decode workers outlived their parent"


def children(pid):
    """The processes whose parent is pid (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def alive(pid):
    """Running (a zombie waiting to be reaped has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_diverging_run_stops_with_one_line_before_saving_and_its_weights_are_refused(trained_run, synth_dir,
                                                                                       tmp_path):
    """lr 1e30 turns the loss to nan in the first epoch: one line (the step, the loss, what to try), exit 1, no
    checkpoint; a checkpoint whose weights are not finite is refused by name by every command that reads it."""
    proc = run_py(["train.py", "--cfg", tiny_config(tmp_path, synth_dir, lr="1e30")], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "at step" in proc.stderr
    assert "in epoch 1: training diverged, and nothing of this epoch was saved" in proc.stderr
    assert "--lr 1e+29" in proc.stderr and not os.path.exists(tmp_path / "run" / "last.pt")
    tmp, _ = trained_run
    ckpt = torch.load(f"{tmp}/run/best.pt", weights_only=True)
    ckpt["model"]["trait_prompts"][0, 0] = float("nan")
    save_edited_checkpoint(ckpt, tmp_path / "nan.pt")  # as a diverged run writes it: the checksum fits
    for script in (["evaluate.py", "--out", str(tmp_path / "eval")], ["cam.py", "--pairs", "test"]):
        proc = run_py([*script, "--ckpt", str(tmp_path / "nan.pt")], check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{tmp_path / 'nan.pt'}: weights that are not finite (trait_prompts)" in proc.stderr


def test_evaluate_and_cam_check_every_value_before_any_work(tmp_path, capsys):
    import cam
    import evaluate
    missing = str(tmp_path / "no_such_run")  # values are checked before the checkpoint is even looked for
    assert run_cli(evaluate.main, ["--ckpt", missing, "--bootstrap", "0", "--threshold", "nan",
                                   "--path-remap", "nowhere"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("3 problem(s) with the arguments:") and "--threshold nan: must be a finite number" in err
    assert "--bootstrap 0: must be at least 1" in err and "--path-remap 'nowhere': expected OLD=NEW" in err
    assert run_cli(cam.main, ["--ckpt", missing, "--pairs", "test", "--n", "-3", "--heads", "-2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("2 problem(s) with the arguments:") and "--n -3: must be at least 1" in err
    assert "--heads -2: must be at least 1" in err


def test_more_pairs_than_the_split_holds_are_each_used_once(tmp_path, capsys):
    import cam
    info, pairs, _ = write_set(tmp_path, {"1": 2, "2": 2, "3": 2, "4": 2}, [["1", "2"], ["3", "4"]])
    chosen = cam.pick_pairs(data.load_split(info, pairs), 16)  # 4 genuine and 8 twin pairs exist
    assert len(chosen) == len(set(chosen)) == 12
    assert "--n 16: the test split has 4 genuine pairs; each is used once" in capsys.readouterr().out


def test_ctrl_c_ends_a_run_with_one_line_saying_what_was_saved_and_how_to_go_on(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir, epochs=50)
    run = subprocess.Popen([sys.executable, "train.py", "--cfg", cfg], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                                  "OMP_NUM_THREADS": "1"})
    for line in run.stdout:  # epoch 1 is saved once its line is out
        if line.startswith("epoch 1/50 |"):
            break
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1 and "Traceback" not in err, err
    assert err.startswith(f"interrupted after epoch 1: {tmp_path}/run/last.pt holds it; continue with:")
    assert f"python train.py --cfg {cfg} --resume auto" in err
    assert os.path.exists(tmp_path / "run" / "last.pt")


def test_an_out_dir_is_written_by_one_run_at_a_time_and_a_killed_run_leaves_no_lock(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir, epochs=50)
    first = subprocess.Popen([sys.executable, "train.py", "--cfg", cfg], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1",
                                                                    "OMP_NUM_THREADS": "1"})
    try:
        for line in first.stdout:
            if line.startswith("epoch 1/50 |"):
                break
        for argv in (["--cfg", cfg], ["--cfg", cfg, "--resume", "auto"], ["--resume", f"{tmp_path}/run"]):
            proc = run_py(["train.py", *argv], check=False)
            assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert f"{tmp_path}/run is being written by another run (process {first.pid} on" in proc.stderr
    finally:
        first.kill()
        first.communicate()
    (tmp_path / "run" / f"last.pt.{first.pid}.tmp").write_bytes(b"half a checkpoint")  # a save the kill cut short
    out = run_py(["train.py", "--cfg", cfg, "--resume", "auto", "--time-budget", "0.01s"]).stdout
    assert "resum" in out and not list((tmp_path / "run").glob("*.tmp"))


def flip_bytes_in_a_tensor(path, n=64):
    """n bytes inverted in the middle of a checkpoint's largest stored tensor: the file still loads."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(open(path, "rb").read())
    name_len, extra_len = struct.unpack("<HH", raw[entry.header_offset + 26:entry.header_offset + 30])
    start = entry.header_offset + 30 + name_len + extra_len + entry.file_size // 2
    raw[start:start + n] = bytes(b ^ 0xFF for b in raw[start:start + n])
    open(path, "wb").write(raw)


def test_a_damaged_checkpoint_is_refused_by_name_and_resume_falls_back_to_the_one_before(tmp_path, synth_dir):
    cfg = tiny_config(tmp_path, synth_dir, epochs=2)
    run_py(["train.py", "--cfg", cfg])
    last, previous = tmp_path / "run" / "last.pt", tmp_path / "run" / "previous.pt"
    flip_bytes_in_a_tensor(last)
    torch.load(last, weights_only=True)  # still a loadable file: only the checksum tells
    proc = run_py(["evaluate.py", "--ckpt", str(last), "--out", str(tmp_path / "eval")], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"{last}: damaged: its contents no longer match the checksum saved with them")
    out = run_py(["train.py", "--resume", str(tmp_path / "run"), "--epochs", "3", "--time-budget", "0.01s"]).stdout
    assert f"{last}: damaged" in out and f"resuming from {previous}, the epoch before" in out
    assert f"the damaged file is kept as {last}.damaged" in out  # not rotated into previous.pt by the next save
    assert torch.load(last, weights_only=True)["epoch"] == 1  # epoch 2 trained again from epoch 1's checkpoint
    assert torch.load(previous, weights_only=True)["epoch"] == 0
    os.remove(last)  # a kill between a save's two renames
    out = run_py(["train.py", "--resume", str(tmp_path / "run"), "--epochs", "3", "--time-budget", "0.01s"]).stdout
    assert f"a folder with no last.pt in it; resuming from {previous}" in out


def test_test_people_or_images_that_also_train_are_refused_before_any_work(trained_run, synth_dir, tmp_path):
    train_info = json.load(open(f"{synth_dir}/train_info.json"))
    test_info = json.load(open(f"{synth_dir}/test_info.json"))
    person = sorted(train_info)[0]
    leaked = {**test_info, person: train_info[person]}  # a training person listed again as a test person
    (tmp_path / "leak_info.json").write_text(json.dumps(leaked))
    cfg = tiny_config(tmp_path, synth_dir, test_info=f"{tmp_path}/leak_info.json")
    proc = one_line_exit(["train.py", "--cfg", cfg], f"2 problem(s) with the test split in {tmp_path}/leak_info.json")
    assert f"1 person id(s) also in the training split ({person}): test people must be unseen" in proc.stderr
    assert f"{len(train_info[person])} image path(s) also in the training split" in proc.stderr
    assert not os.path.exists(tmp_path / "cache")  # refused before the cache is built
    tmp, _ = trained_run
    one_line_exit(["evaluate.py", "--ckpt", f"{tmp}/run", "--test-info", f"{tmp_path}/leak_info.json",
                          "--out", str(tmp_path / "eval")], "1 person id(s) also in the training split")
