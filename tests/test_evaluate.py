import csv
import json
import os

import numpy as np
import pytest
import torch

import evaluate as ev
from conftest import TINY_ARCH, run_py


def m(genuine, impostor, threshold=None, fars=(1e-1, 1e-2)):
    scores = np.array(genuine + impostor, dtype=float)
    labels = np.array([True] * len(genuine) + [False] * len(impostor))
    return ev.metrics(scores, labels, threshold, fars=fars)


# (genuine scores, impostor scores, threshold, FARs to report, the metrics by hand)
HAND_COUNTED = {
    "perfect separation": ([3.0, 4.0, 5.0], [i / 10 for i in range(20)], 2.0, (0.1,),
                           {"auc": 1.0, "eer": 0.0, "accuracy": 1.0, "tar_at_far": {"0.1": 1.0}}),
    # everything accepted at 0.5: only the 4 genuine pairs are right
    "identical scores are chance": ([0.5] * 4, [0.5] * 6, 0.5, (), {"auc": 0.5, "eer": 0.5, "accuracy": 0.4}),
    # genuine (1, 2) vs impostor (1, 0): pairs won 1 (tie: 0.5) + 1 + 1 + 1 of 4
    "ties count half": ([1.0, 2.0], [1.0, 0.0], None, (), {"auc": 3.5 / 4}),
    # one impostor cannot resolve a 10% false-accept rate
    "one impostor": ([0.2, 0.6, 0.9], [0.5], None, (0.1,), {"auc": 2 / 3, "eer": 1 / 3, "tar_at_far": {"0.1": None}}),
    # 10 impostors 0.0 .. 0.9: at FAR 0.1 only 0.9 is accepted, so 0.95 and 0.85 pass; FAR 1e-2 is below resolution
    "TAR at FAR": ([0.95, 0.85, 0.05], [i / 10 for i in range(10)], None, (0.1, 0.01),
                   {"tar_at_far": {"0.1": 2 / 3, "0.01": None}}),
}


@pytest.mark.parametrize("case", HAND_COUNTED)
def test_metrics_against_hand_counts(case):
    genuine, impostor, threshold, fars, want = HAND_COUNTED[case]
    scores = np.array(genuine + impostor, dtype=float)
    labels = np.array([True] * len(genuine) + [False] * len(impostor))
    got = ev.metrics(scores, labels, threshold, fars=fars)
    for key, value in want.items():
        assert got[key] == (pytest.approx(value) if key != "tar_at_far" else
                            {f: v if v is None else pytest.approx(v) for f, v in value.items()}), key


def weighted_tied_scores(seed):
    """Scores on a coarse grid (many ties), the genuine ones lifted, integer weights: (scores, genuine, weights)."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 20, 400) / 20.0
    genuine = rng.random(400) < 0.25
    scores[genuine] += 0.2
    return scores, genuine, rng.integers(1, 5, 400).astype(float)


def test_roc_auc_and_tar_agree_with_scikit_learn_on_weighted_tied_scores():
    from sklearn.metrics import roc_auc_score, roc_curve
    scores, genuine, weights = weighted_tied_scores(1)
    far, tar, thr = ev.roc(scores, genuine, weights)
    fpr, tpr, thresholds = roc_curve(genuine, scores, sample_weight=weights, drop_intermediate=False)
    np.testing.assert_allclose(far, fpr, atol=1e-12)
    np.testing.assert_allclose(tar, tpr, atol=1e-12)
    np.testing.assert_array_equal(thr[1:], thresholds[1:])  # the first is above every score in both
    r = ev.metrics(scores, genuine, None, weights, fars=(0.1, 0.01))
    assert r["auc"] == pytest.approx(roc_auc_score(genuine, scores, sample_weight=weights), abs=1e-12)
    for target in (0.1, 0.01):
        assert r["tar_at_far"][f"{target:g}"] == pytest.approx(tpr[fpr <= target].max(), abs=1e-12)


def test_weights_equal_repetition():
    scores = np.array([0.9, 0.4, 0.7, 0.1, 0.5])
    labels = np.array([True, True, False, False, False])
    w = np.array([2, 1, 1, 3, 1], dtype=float)
    rep = np.repeat(np.arange(5), w.astype(int))
    a = ev.metrics(scores, labels, 0.45, w)
    b = ev.metrics(scores[rep], labels[rep], 0.45)
    for key in ("auc", "eer", "accuracy"):
        assert a[key] == pytest.approx(b[key])
    assert a["auc"] == pytest.approx(1 - 2 / 15)  # genuine 0.4 (x1) loses to 0.7 (x1) and 0.5 (x1) of 15 pairs


def test_eer_threshold_is_the_score_where_false_accepts_meet_false_rejects():
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1])
    labels = np.array([True, True, True, False, False, False])
    # at 0.7 one impostor of three is accepted and one genuine pair of three (0.3) rejected: FAR = FRR = 1/3;
    # every higher threshold has FAR 0 and FRR at least 1/3, every lower one FAR at least 2/3
    t = ev.eer_threshold(*ev.roc(scores, labels))
    assert t == 0.7 and ev.accuracy(scores, labels, t) == pytest.approx(4 / 6)


def test_bootstrap_weighs_a_pair_by_how_often_its_families_were_drawn():
    """One resample of three families against the same pairs written out as often as the drawn families hold them:
    a pair inside a family once per draw of it, a pair across two families once per draw of each."""
    rng = np.random.default_rng(4)
    fam_a, fam_b = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    genuine = rng.random(60) < 0.4
    fam_b[genuine] = fam_a[genuine]
    scores = rng.random(60) + 0.3 * genuine
    drawn = np.random.default_rng(7).integers(0, 3, 3)  # the families bootstrap(seed=7) draws first
    copies = [np.sum(drawn == f) for f in range(3)]
    rows = [k for k in range(60) for _ in range(copies[fam_a[k]] * (1 if fam_a[k] == fam_b[k] else copies[fam_b[k]]))]
    literal = ev.metrics(scores[rows], genuine[rows], 0.6)
    sampled = ev.bootstrap(scores, genuine, fam_a, fam_b, 3, 0.6, (0.1,), n_boot=1, seed=7)
    for key in ("auc", "eer", "accuracy"):
        assert sampled[key] == [pytest.approx(literal[key])] * 2, key
    assert copies != [1, 1, 1] and len(rows) != 60  # a resample that differs from the data


def test_protocol_is_exhaustive_and_deterministic(synth_dir):
    import data
    split = data.load_split(f"{synth_dir}/test_info.json", f"{synth_dir}/test_pairs.json")
    a, b, kind, fa, fb = ev.protocol_pairs(split)
    n = len(split.paths)
    per_person = np.bincount(split.person.numpy())
    assert (kind == ev.GENUINE).sum() == sum(k * (k - 1) // 2 for k in per_person)
    twin_pairs = sum(per_person[f[0]] * per_person[f[1]] for f in split.families if len(f) == 2)
    assert (kind == ev.TWIN).sum() == twin_pairs and (fa == fb).all()
    a2, _, kind2, _, _ = ev.protocol_pairs(split, all_impostors=True)
    assert len(a2) == n * (n - 1) // 2 and (kind2 == ev.OTHER).sum() > 0


def test_evaluate_is_byte_identical_and_complete(trained_run):
    tmp, _ = trained_run
    outs = []
    for name in ("one", "two"):
        out = os.path.join(tmp, name)
        proc = run_py(["evaluate.py", "--ckpt", f"{tmp}/run/best.pt", "--out", out, "--all-impostors",
                       "--bootstrap", "200"])
        assert "encoding" in proc.stdout and "scoring" in proc.stdout
        outs.append(out)
    for f in ("metrics.json", "scores.csv"):
        assert open(os.path.join(outs[0], f), "rb").read() == open(os.path.join(outs[1], f), "rb").read()
    metrics = json.load(open(os.path.join(outs[0], "metrics.json")))
    assert {"auc", "eer", "tar_at_far", "accuracy", "threshold", "n_genuine", "n_twin", "intervals"} <= set(metrics)
    assert metrics["threshold"] is not None and set(metrics["tar_at_far"]) == {"0.1", "0.01", "0.001"}
    assert "0.0001" in metrics["all_impostors"]["tar_at_far"]
    lo, hi = metrics["intervals"]["eer"]
    assert lo <= metrics["eer"] <= hi
    with open(os.path.join(outs[0], "scores.csv")) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path_a", "path_b", "label", "kind", "score"]
    kinds = {r["kind"] for r in rows}
    assert kinds == {"genuine", "twin", "other"}
    # the counts from the test info files: every pair of one person's images, every image pair across twins
    info = json.load(open(torch.load(f"{tmp}/run/best.pt", weights_only=True)["config"]["test_info"]))
    twins = json.load(open(torch.load(f"{tmp}/run/best.pt", weights_only=True)["config"]["test_pairs"]))
    n_genuine = sum(len(v) * (len(v) - 1) // 2 for v in info.values())
    n_twin = sum(len(info[a]) * len(info[b]) for a, b in twins)
    assert (metrics["n_genuine"], metrics["n_twin"]) == (n_genuine, n_twin)
    assert [sum(r["kind"] == k for r in rows) for k in ("genuine", "twin")] == [n_genuine, n_twin]
    assert len(rows) == len(sum(info.values(), [])) * (len(sum(info.values(), [])) - 1) // 2
    from PIL import Image
    assert Image.open(os.path.join(outs[0], "roc.png")).size[0] > 1000


def counted_accuracy(folder, threshold):
    """Accuracy on the twin protocol counted from scores.csv: genuine pairs at or above the threshold, others below."""
    with open(os.path.join(folder, "scores.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] != "other"]
    return sum((float(r["score"]) >= threshold) == (r["label"] == "1") for r in rows) / len(rows)


def test_cls_baseline_threshold_is_the_frozen_backbones_own_validation_eer(trained_run, capsys):
    import data
    from model import load_vit
    tmp, _ = trained_run
    out = os.path.join(tmp, "baseline")
    ev.main(["--ckpt", f"{tmp}/run/best.pt", "--out", out, "--baseline", "cls", "--bootstrap", "20"])
    assert "CLS cosine baseline" in capsys.readouterr().out
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    # the validation families of the run (val_families 3, seed 0), their CLS cosines computed here
    cfg = torch.load(f"{tmp}/run/best.pt", weights_only=True)["config"]
    _, val = data.hold_out_families(data.load_split(cfg["train_info"], cfg["train_pairs"]), 3, 0)
    images = data.build_cache(val.paths, 56, cfg["cache_dir"], verbose=False)
    with torch.no_grad():
        cls = torch.nn.functional.normalize(load_vit(TINY_ARCH, 56).eval()(data.normalize(images))[:, 0], dim=-1)
    a, b, kind, _, _ = ev.protocol_pairs(val)
    scores = (cls[a] * cls[b]).sum(-1).numpy()
    genuine, impostor = scores[kind == ev.GENUINE], scores[kind != ev.GENUINE]
    gap = {t: abs((impostor >= t).mean() - (genuine < t).mean()) for t in np.unique(scores)}
    best = max(t for t, g in gap.items() if g == min(gap.values()))  # the highest of the ties
    assert metrics["threshold"] == pytest.approx(best, abs=1e-6)
    assert metrics["accuracy"] == pytest.approx(counted_accuracy(out, metrics["threshold"]))
    assert metrics["n_genuine"] > 0 and metrics["n_twin"] > 0


def test_threshold_flag_and_a_run_without_validation(train_once, trained_run, tmp_path, capsys):
    """`val_families: 0` trains on every family, so there is no threshold until --threshold gives one; on a validated
    run --threshold replaces the saved one. The output says which threshold it used."""
    tmp, _, printed = train_once(val_families=0, epochs=1)
    assert "give evaluate.py --threshold" in printed and not os.path.exists(f"{tmp}/run/best.pt")
    ev.main(["--ckpt", f"{tmp}/run", "--out", str(tmp_path / "none"), "--bootstrap", "20"])
    assert "accuracy n/a (no validation (val_families: 0): give --threshold, or train with --folds K" in \
        capsys.readouterr().out
    assert "accuracy" not in json.load(open(tmp_path / "none" / "metrics.json"))
    ev.main(["--ckpt", f"{tmp}/run", "--out", str(tmp_path / "given"), "--bootstrap", "20", "--threshold", "0.9"])
    assert "at threshold 0.9000 (given by --threshold)" in capsys.readouterr().out
    metrics = json.load(open(tmp_path / "given" / "metrics.json"))
    assert metrics["threshold"] == 0.9 and metrics["accuracy"] == pytest.approx(counted_accuracy(tmp_path / "given", 0.9))
    assert metrics["eer"] == json.load(open(tmp_path / "none" / "metrics.json"))["eer"]
    validated = f"{trained_run[0]}/run/best.pt"
    ev.main(["--ckpt", validated, "--out", str(tmp_path / "own"), "--bootstrap", "20"])
    saved = json.load(open(tmp_path / "own" / "metrics.json"))["threshold"]
    assert saved == torch.load(validated, weights_only=True)["threshold"]
    assert f"at threshold {saved:.4f} (the validation EER's, saved in the checkpoint)" in capsys.readouterr().out
    ev.main(["--ckpt", validated, "--out", str(tmp_path / "over"), "--bootstrap", "20", "--threshold", "0.5"])
    assert json.load(open(tmp_path / "over" / "metrics.json"))["threshold"] == 0.5


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"junk")
    proc = run_py(["evaluate.py", "--ckpt", str(tmp_path / "x.pt"), "--out", str(tmp_path)], check=False)
    assert proc.returncode != 0 and "x.pt" in proc.stderr


def test_auc_and_eer_agree_with_a_brute_force_count_over_weighted_tied_scores():
    scores, genuine, weights = weighted_tied_scores(0)
    r = ev.metrics(scores, genuine, None, weights)
    g, i = np.flatnonzero(genuine), np.flatnonzero(~genuine)
    wins = (scores[g][:, None] > scores[i][None]) + 0.5 * (scores[g][:, None] == scores[i][None])
    pair_weights = weights[g][:, None] * weights[i][None]
    assert r["auc"] == pytest.approx((wins * pair_weights).sum() / pair_weights.sum())
    # at every threshold t (same if score >= t): FAR and FRR by counting; the EER lies where they cross
    far = [(weights[i] * (scores[i] >= t)).sum() / weights[i].sum() for t in np.unique(scores)]
    frr = [(weights[g] * (scores[g] < t)).sum() / weights[g].sum() for t in np.unique(scores)]
    k = int(np.argmax(np.array(far) <= np.array(frr)))  # FAR falls and FRR rises with t: they cross before t_k
    assert k > 0 and max(far[k], frr[k - 1]) - 1e-9 <= r["eer"] <= min(far[k - 1], frr[k]) + 1e-9


def test_protocol_counts_a_triplet_family_as_three_twin_pairs():
    import data
    n = {0: 3, 1: 2, 2: 4, 3: 2, 4: 5}  # a triplet (0, 1, 2), twins (3, 4)
    person = [p for p, k in n.items() for _ in range(k)]
    split = data.Split(ids=[str(p) for p in n], paths=[f"{i}.jpg" for i in range(len(person))],
                       person=torch.tensor(person), families=[[0, 1, 2], [3, 4]])
    _, _, kind, fam_a, fam_b = ev.protocol_pairs(split)
    assert (kind == ev.GENUINE).sum() == 3 + 1 + 6 + 1 + 10
    assert (kind == ev.TWIN).sum() == 3 * 2 + 3 * 4 + 2 * 4 + 2 * 5
    assert (fam_a == fam_b).all()
    _, _, everything, _, _ = ev.protocol_pairs(split, all_impostors=True)
    assert (everything == ev.OTHER).sum() == (3 + 2 + 4) * (2 + 5)
