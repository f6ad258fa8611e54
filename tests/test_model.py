import inspect
import math
import os

import pytest
import torch
import torch.nn.functional as F

import model
from config import DEFAULTS
from conftest import FIXTURES, TINY_ARCH

TRAINING_DEFAULTS = {k: DEFAULTS[k] for k in ("method", "margin", "scale", "trait_prompts")}

VIT = os.path.join(FIXTURES, "vit")


@pytest.mark.parametrize("name,sizes", [("dinov2_tiny", (224, 518)), ("dinov2_tiny_reg4", (224, 518)),
                                        ("dino_tiny16", (224, 160))])
def test_parity_with_official_code(name, sizes):
    ref = torch.load(os.path.join(VIT, f"{name}_ref.pt"), weights_only=True)
    for size in sizes:
        vit = model.load_vit(os.path.join(VIT, f"{name}.pth"), size).eval()
        with torch.no_grad():
            out = vit(ref[f"x{size}"].float())
        if name == "dino_tiny16":
            torch.testing.assert_close(out, ref[f"tokens{size}"], atol=1e-4, rtol=0)
        else:
            torch.testing.assert_close(out[:, 0], ref[f"cls{size}"], atol=1e-4, rtol=0)
            torch.testing.assert_close(out[:, vit.num_prefix:], ref[f"patch{size}"], atol=1e-4, rtol=0)


def test_architecture_is_read_from_the_checkpoint():
    vit = model.load_vit(os.path.join(VIT, "dinov2_tiny_reg4.pth"), 224)
    assert (vit.cfg.embed_dim, vit.cfg.depth, vit.cfg.patch_size, vit.cfg.num_registers) == (128, 3, 14, 4)
    assert vit.blocks[0].attn.num_heads == 2 and vit.cfg.layerscale and vit.family == "dinov2_reg"
    dino = model.load_vit(os.path.join(VIT, "dino_tiny16.pth"), 160)
    assert dino.family == "dino" and not dino.cfg.layerscale and dino.pos_embed.shape == (1, 101, 128)


@pytest.fixture
def verifier():
    torch.manual_seed(0)
    m = model.PromptCamVerifier(model.load_vit(TINY_ARCH, 56), num_classes=7, deep_prompts=2).eval()
    # non-trivial trained-like weights, so a broken path cannot hide behind zeros
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return m


def test_no_identity_in_any_inference_signature(verifier):
    for fn in (verifier.encode, verifier.score_prompts, verifier.score_pairs, verifier.pair_maps, verifier.forward):
        params = set(inspect.signature(fn).parameters)
        assert not params & {"label", "labels", "identity", "person", "person_id", "class_idx", "y"}, fn


def test_pair_score_is_a_function_of_the_two_images(verifier):
    torch.manual_seed(1)
    x = torch.randn(6, 3, 56, 56)
    with torch.no_grad():
        _, pair_scores, _, _ = verifier(x)  # uncached: the training forward
        enc = verifier.encode(x)
        a, b = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([1, 2, 3, 4, 5])
        cached = verifier.score_pairs(enc, a, b)
        torch.testing.assert_close(cached, pair_scores[a, b], atol=1e-5, rtol=0)
        torch.testing.assert_close(verifier.score_pairs(enc, b, a), cached, atol=1e-5, rtol=0)  # symmetric
        # changing one image changes the score
        changed = x.clone()
        changed[1, :, 10:30, 10:30] += 2.0
        assert abs(float(verifier.score_pairs(verifier.encode(changed[[0, 1]]), [0], [1])) - float(cached[0])) > 1e-3
        # prompt rows equal the full last block run on [prompt; image tokens] with prompts kept apart
        prompts = verifier.class_prompts.expand(6, -1, -1)
        rows, maps = verifier.score_prompts(prompts, enc)
        shared_rows, shared_maps = verifier.score_prompts(verifier.class_prompts[None], enc)  # the same on every image
        torch.testing.assert_close(shared_rows, rows)
        torch.testing.assert_close(shared_maps, maps)
        assert maps.shape == (6, 2, 7, 16) and (maps >= 0).all() and (maps.sum(-1) <= 1 + 1e-5).all()
        vit = verifier.vit
        x = verifier.last_layer_input(x)
        for c in range(7):  # one prompt at a time through the unmodified block, as Prompt-CAM computes it
            full = vit.norm(vit.blocks[-1](torch.cat([prompts[:, c:c + 1], x], 1)))[:, 0] @ verifier.score_w
            torch.testing.assert_close(rows[:, c], full, atol=1e-4, rtol=0)
        score, pair_maps = verifier.pair_maps(enc[0], enc[1])
        assert score == pytest.approx(float(cached[0]), abs=1e-5)
        assert set(pair_maps) == {"self_a", "cross_b_on_a", "cross_a_on_b", "self_b"}


def test_prompts_never_attend_to_each_other(verifier):
    """A prompt's score does not depend on which other prompts are scored with it."""
    torch.manual_seed(2)
    enc = verifier.encode(torch.randn(1, 3, 56, 56))
    with torch.no_grad():
        together, _ = verifier.score_prompts(verifier.class_prompts[None], enc)
        alone = torch.stack([verifier.score_prompts(verifier.class_prompts[None, c:c + 1], enc)[0][0, 0]
                             for c in range(7)])
    torch.testing.assert_close(together[0], alone, atol=1e-5, rtol=0)


def test_blur_of_all_heads_gives_uniform_patch_maps(verifier):
    enc = verifier.encode(torch.randn(1, 3, 56, 56))
    with torch.no_grad():
        _, maps = verifier.score_prompts(verifier.class_prompts[None, :2], enc,
                                         blurred_heads=torch.tensor([True, False]))
    blurred = maps[0, 0]
    torch.testing.assert_close(blurred, blurred[:, :1].expand_as(blurred))
    assert not torch.allclose(maps[0, 1], maps[0, 1][:, :1].expand_as(maps[0, 1]))


def test_backbone_is_frozen_and_gets_no_gradient(verifier):
    verifier.train()
    frozen = [p for p in verifier.vit.parameters()]
    assert all(not p.requires_grad for p in frozen)
    class_scores, pair_scores, prompts, _ = verifier(torch.randn(4, 3, 56, 56))
    (class_scores.sum() + pair_scores.sum() + prompts.sum()).backward()
    assert all(p.grad is None for p in frozen)
    assert verifier.deep_prompts.grad is not None and verifier.class_prompts.grad is not None
    n_train = sum(p.numel() for p in verifier.parameters() if p.requires_grad)
    assert f"{n_train:,} trainable" in verifier.summary()
    names = set(verifier.trainable_state())
    assert names == {"deep_prompts", "class_prompts", "score_w"} | {f"generator.{n}" for n, _ in
                                                                    verifier.generator.named_parameters()}


def test_last_blocks_trainable_on_request():
    m = model.PromptCamVerifier(model.load_vit(TINY_ARCH, 56), 3, train_blocks=1)
    assert all(p.requires_grad for p in m.vit.blocks[-1].parameters())
    assert not any(p.requires_grad for p in m.vit.blocks[0].parameters())


def test_scratch_backbone_is_fixed_and_trains_whole():
    a, b = model.load_vit("scratch_vit_tiny14", 112), model.load_vit("scratch_vit_tiny14", 112)
    assert a.fingerprint == b.fingerprint and a.grid == 8 and a.family == "scratch"
    assert a.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.2)
    assert (a.blocks[0].attn.qkv.bias == 0).all() and (a.norm.weight == 1).all()
    conv = model.load_vit("scratch_vit_tiny14_conv", 84)
    assert conv.grid == 6 and conv.cfg.conv_stem and conv.fingerprint != model.load_vit("scratch_vit_tiny14", 84).fingerprint
    stem = conv.patch_embed.stem[0].weight  # He-normal: std sqrt(2 / fan_in), fan_in 3 x 3 x 3
    assert stem.std().item() == pytest.approx(math.sqrt(2 / 27), rel=0.2)
    m = model.build_verifier("scratch_vit_tiny14", 112, 3, 2, train_blocks=3, **TRAINING_DEFAULTS)
    assert all(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match="no pre-trained weights, so it trains whole: set train_blocks to its depth 3"):
        model.build_verifier("scratch_vit_tiny14", 112, 3, 2, train_blocks=1, **TRAINING_DEFAULTS)


def test_bad_backbone_inputs(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'dinov3_huge'.*'scratch_vit_tiny14'"):
        model.load_vit("dinov3_huge", 224)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        model.load_vit(TINY_ARCH, 100)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(TINY_ARCH, "rb").read()[:5000])
    with pytest.raises(ValueError, match="truncated.pth: not a readable PyTorch checkpoint"):
        model.load_vit(str(truncated), 224)
    foreign = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, foreign)
    with pytest.raises(ValueError, match="not a DINO/DINOv2 ViT checkpoint"):
        model.load_vit(str(foreign), 224)
    broken = torch.load(TINY_ARCH, weights_only=True)
    del broken["blocks.1.mlp.fc2.bias"]
    broken["blocks.0.attn.qkv.weight"] = torch.zeros(10, 128)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as err:
        model.load_vit(str(tmp_path / "broken.pth"), 224)
    assert "missing key blocks.1.mlp.fc2.bias" in str(err.value)
    assert "blocks.0.attn.qkv.weight: shape (10, 128), expected (384, 128)" in str(err.value)


def trained_like(method):
    """A tiny verifier whose trainable weights are moved, so that no path hides behind initial values."""
    torch.manual_seed(0)
    m = model.build_verifier(TINY_ARCH, 56, num_classes=5, deep_prompts=2, train_blocks=1, method=method,
                             trait_prompts=4, margin=0.3, scale=30.0).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("method", ["traits", "arcface", "promptcam"])
def test_a_pairs_score_does_not_depend_on_the_batch_its_images_were_encoded_in(method):
    """What evaluate.py scores (a batch of 64 images) is what cam.py scores (two): batch-norm-like leaks would not be."""
    m = trained_like(method)
    x = torch.randn(6, 3, 56, 56)
    with torch.no_grad():
        together = m.score_pairs(m.encode(x), [0, 2, 4], [1, 3, 5])
        alone = torch.cat([m.score_pairs(m.encode(x[[i, i + 1]]), [0], [1]) for i in (0, 2, 4)])
        among_others = m.score_pairs(m.encode(torch.cat([torch.randn(3, 3, 56, 56), x[[4, 5]]])), [3], [4])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=0)
    torch.testing.assert_close(among_others, together[2:], atol=1e-5, rtol=0)
    assert len(set(together.tolist())) == 3  # three different pairs, three different scores


def test_arcface_scores_the_cosine_of_unit_embeddings():
    m = trained_like("arcface")
    assert m.method == "arcface" and not hasattr(m, "deep_prompts")
    with torch.no_grad():
        emb = m.encode(torch.randn(4, 3, 56, 56))
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(m.score_pairs(emb, [0, 1], [2, 3]), F.cosine_similarity(emb[[0, 1]], emb[[2, 3]]))


def test_arcface_loss_widens_the_true_angle_by_the_margin():
    m = model.ArcFaceVerifier(model.load_vit(TINY_ARCH, 56), num_classes=3, margin=0.3, scale=30.0)
    cos = torch.tensor([[0.8, 0.1, -0.2], [0.0, 0.5, 0.2]])
    labels = torch.tensor([0, 1])
    want = torch.tensor([[math.cos(math.acos(0.8) + 0.3), 0.1, -0.2], [0.0, math.cos(math.acos(0.5) + 0.3), 0.2]])
    loss = m.loss_terms((None, cos), labels)["class"]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(30 * want, labels))
    with torch.no_grad():  # no margin: plain softmax cross-entropy over scaled cosines
        m.margin = 0.0
        torch.testing.assert_close(m.loss_terms((None, cos), labels)["class"],
                                   torch.nn.functional.cross_entropy(30 * cos, labels))


@pytest.mark.parametrize("arch", ["scratch_vit_tiny14", "scratch_vit_tiny14_conv", TINY_ARCH,
                                  os.path.join(VIT, "dino_tiny16.pth")])
def test_backbone_in_the_official_layout_loads_strictly_with_the_same_tokens(arch, tmp_path):
    size = 84 if "16" not in arch else 96
    vit = model.load_vit(arch, size)
    with torch.no_grad():  # weights a training run moved, so nothing passes by being the initial ones
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(model.official_backbone_state(vit), tmp_path / "backbone.pth")
    again = model.load_vit(str(tmp_path / "backbone.pth"), size)
    assert again.family == ("dino" if "16" in arch else "dinov2_reg" if "reg" in arch else "dinov2")
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), vit.eval()(x), atol=1e-6, rtol=0)


def test_trait_prompts_tile_the_face_each_reading_its_own_cell_only():
    cells = model.tiling_cells(9, 6)  # 3 x 3 cells of 2 x 2 patches
    for k in range(9):
        own = {(2 * (k // 3) + i) * 6 + 2 * (k % 3) + j for i in (0, 1) for j in (0, 1)}
        assert set(cells[k].nonzero().flatten().tolist()) == own
    torch.testing.assert_close(model.tiling_cells(36, 6), torch.eye(36, dtype=torch.bool))
    uneven = model.tiling_cells(36, 16)  # DINOv2 at 224 px: cells of 3, 3, 2, 3, 3, 2 patch rows and columns
    assert (uneven.sum(0) == 1).all() and sorted(set(uneven.sum(1).tolist())) == [4, 6, 9]
    # with a pre-trained backbone's keys (the fixture ViT) and trained prompts: nothing outside a prompt's cell
    torch.manual_seed(0)
    m = model.build_verifier(TINY_ARCH, 56, num_classes=5, deep_prompts=2, train_blocks=0, method="traits",
                             trait_prompts=4, margin=0.3, scale=30.0).eval()
    with torch.no_grad():
        m.trait_prompts.normal_(0, 1)
        _, attn = m.read(*m.keys_and_tokens(torch.randn(2, 3, 56, 56)))
    outside = ~model.tiling_cells(4, 4)
    assert (attn[..., outside] == 0).all() and (attn[..., ~outside] > 0).all()
    with pytest.raises(ValueError, match="trait_prompts=5 must be a square number"):
        model.build_verifier(TINY_ARCH, 56, num_classes=5, deep_prompts=2, train_blocks=0, method="traits",
                             trait_prompts=5, margin=0.3, scale=30.0)


def test_trait_prompt_embedding_is_each_patch_gated_by_its_prompts_attention_and_split_exactly():
    torch.manual_seed(0)
    m = model.build_verifier(TINY_ARCH, 56, num_classes=5, deep_prompts=2, train_blocks=0, method="traits",
                             trait_prompts=4, margin=0.3, scale=30.0).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
        x = torch.randn(4, 3, 56, 56)
        emb = m.encode(x)
        keys, tokens = m.keys_and_tokens(x)
        out, attn = m.read(keys, tokens)
    cells = model.tiling_cells(4, 4)
    # the reading written out patch by patch: the token's head h scaled by 4 (its cell's size) times the attention
    # of the one prompt whose cell holds it, in head h; reduced, then projected by the patch's own map
    for patch in range(16):
        prompt = int(cells[:, patch].nonzero())
        gated = torch.cat([4 * attn[:, h, prompt, patch, None] * tokens[:, h, patch] for h in range(tokens.shape[1])],
                          -1)
        torch.testing.assert_close(out[:, patch], m.reduce(gated) @ m.project[patch], atol=1e-5, rtol=0)
    torch.testing.assert_close(emb, F.normalize(out.sum(1), dim=-1), atol=1e-6, rtol=0)
    # the cosine and 1 - cosine split exactly into one term per patch on each face
    score = m.score_pairs(emb, [0], [1])[0]
    held, apart = m.pair_terms(out[:2])
    assert held.shape == apart.shape == (2, 16) and not torch.allclose(apart, apart[0, 0].expand(2, 16))
    torch.testing.assert_close(held.sum(), score, atol=1e-5, rtol=0)
    torch.testing.assert_close(apart.sum(), 1 - score, atol=1e-5, rtol=0)
    # attention over the 16 patches and the prompt itself: nothing is left for CLS or the registers
    assert attn.shape == (4, m.vit.blocks[-1].attn.num_heads, 4, 16)
    assert (attn.sum(-1) <= 1 + 1e-5).all() and (attn.sum(-1) > 0).all()  # the rest is on the prompt itself
    _, cos = m(x)
    assert cos.shape == (4, 5) and cos.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(cos, emb @ F.normalize(m.class_prompts, dim=-1).T, atol=1e-5, rtol=0)
    # a patch's final token reaches its own contribution only; its key moves where its prompt looks, so the
    # contributions of its cell, and of no other patch
    with torch.no_grad():
        alone, _ = m.read(keys[:1], tokens[:1])  # the same shapes as below: an untouched row comes out bit for bit
        for patch in (0, 5, 15):
            for moved in ("key", "token"):
                k, t = keys[:1].clone(), tokens[:1].clone()
                (k if moved == "key" else t)[..., patch, :] += torch.randn(64) * 3
                rows, _ = m.read(k, t)
                changed = (rows != alone).any(-1)[0]
                expected = cells[int(cells[:, patch].nonzero())] if moved == "key" else torch.arange(16) == patch
                assert changed.tolist() == expected.tolist(), (patch, moved)


@pytest.mark.parametrize("method", ["traits", "arcface"])
def test_embeddings_stay_fp32_under_mixed_precision(method):
    """Under bf16 autocast (every GPU config) a pair's cosine must not fall on bf16's coarse steps near 1: traits'
    embedding summed in bf16 gave a trained model's 19,334 test pairs 334 distinct scores."""
    torch.manual_seed(0)
    m = model.build_verifier(TINY_ARCH, 56, num_classes=5, deep_prompts=2, train_blocks=0, method=method,
                             trait_prompts=4, margin=0.3, scale=30.0).eval()
    x = torch.randn(8, 3, 56, 56) * 0.03 + torch.randn(1, 3, 56, 56)  # similar faces: cosines near 1
    a, b = torch.triu_indices(8, 8, 1)
    with torch.no_grad():
        exact = m.score_pairs(m.encode(x), a, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = m.encode(x)
            mixed = m.score_pairs(emb, a, b)
    assert emb.dtype == torch.float32 and exact.min() > 0.95
    assert len(set(mixed.tolist())) == len(a) == 28  # no ties from rounding
    # bf16's backbone moves a score by much less than the pairs differ (measured: 17% of the range for traits,
    # 13% for arcface), so the pairs keep their order but for near neighbours
    assert (mixed - exact).abs().max() < 0.25 * (exact.max() - exact.min())


def test_promptcam_loss_terms_against_a_hand_computed_batch():
    """Four images of two people: cross-entropy over the class prompts, each image picking out its own person among
    the other three by pair score, and the squared pull of p(x) to its person's prompt."""
    m = model.PromptCamVerifier(model.load_vit(TINY_ARCH, 56), num_classes=3, deep_prompts=2)
    labels = torch.tensor([0, 0, 2, 2])
    class_scores = torch.tensor([[2.0, 0.0, 1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 0.0]])
    pairs = torch.tensor([[9.0, 1.0, 0.0, 2.0], [1.0, 9.0, 1.0, 0.0], [0.0, 1.0, 9.0, 3.0], [2.0, 0.0, 3.0, 9.0]])
    prompts, class_prompts = torch.zeros(4, 1, 2), torch.tensor([[[1.0, 1.0]], [[5.0, 5.0]], [[0.0, 2.0]]])
    terms = m.loss_terms((class_scores, pairs, prompts, class_prompts), labels)
    ce = -sum(math.log(math.exp(class_scores[i, y]) / sum(math.exp(v) for v in class_scores[i])) for i, y in
              enumerate(labels.tolist())) / 4
    # image i's one same-person partner j among the three others (the diagonal is left out)
    partner = {0: 1, 1: 0, 2: 3, 3: 2}
    episodic = -sum(math.log(math.exp(pairs[i, j]) / sum(math.exp(pairs[i, k]) for k in range(4) if k != i))
                    for i, j in partner.items()) / 4
    pull = (2 * 1.0 + 2 * 1.0 + 2 * 4.0) / 8  # |0 - P_y|^2 over 4 images x 2 values: P_0 = (1, 1), P_2 = (0, 2)
    assert float(terms["class"]) == pytest.approx(ce, rel=1e-6)
    assert float(terms["episodic"]) == pytest.approx(episodic, rel=1e-6)
    assert float(terms["pull"]) == pytest.approx(pull, rel=1e-6)
