"""Tests for common.py and the three scripts. CPU only, built on tiny datasets written to temp dirs.

    python test_vit.py            # every test; ends with the line "N passed, N failed, N skipped"
    python test_vit.py -k resume  # the tests whose name contains "resume"
    python test_vit.py --bench    # training throughput vs torchvision (and timm if installed), FLOP/s vs matmul
    python -m pytest test_vit.py  # pytest collects the same functions (tmp_path is its fixture too)
"""
import argparse
import contextlib
import csv
import io
import json
import math
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import types
import unittest
import unittest.mock

import torch
import torch.nn.functional as F
from torchvision.io import encode_jpeg, write_png

import common
import mini_vit
import vit_cifar
import vit_imagenet
from common import ViT, create_vit, from_torchvision, resize_pos_embed

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(min(4, os.cpu_count() or 1))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize(model, std=0.02):
    """Random weights everywhere, the zero-initialised head included, so parity is not trivial; LayerNorm scales drawn
    around 1 (N(1, 0.1)): at std's scale each block's branch was too small for another eps or GELU to show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1, 0.1)
    return model


# ------------------------------------------------------------------------------------------------ common.py: model

def test_presets_shapes():
    for name, cfg in common.PRESETS.items():
        with torch.device("meta"):  # shapes only: no memory, no arithmetic
            m = create_vit(name).eval()
            x = torch.randn(1, cfg.get("in_chans", 3), cfg["img_size"], cfg["img_size"])
            feats = m.forward_features(x)
            out = m.forward_head(feats)
        grid = cfg["img_size"] // cfg["patch_size"]
        assert feats.shape == (1, grid * grid + (m.pool == "cls"), cfg["dim"]), (name, feats.shape)
        assert out.shape == (1, cfg.get("num_classes", 1000)), (name, out.shape)
    with torch.device("meta"):  # overrides win over the preset's own values (CIFAR-100 on cifar_s)
        m = create_vit("cifar_s", num_classes=100, depth=1)
    assert (m.head.out_features, len(m.blocks), m.patch_embed.grid) == (100, 1, 8)


def test_vit_b16_param_count_equals_torchvision():
    import torchvision
    n = sum(p.numel() for p in create_vit("vit_b16").parameters())
    assert n == 86_567_656 == sum(p.numel() for p in torchvision.models.vit_b_16().parameters())


def test_from_torchvision_vit_b16_same_logits():
    import torchvision
    tv = randomize(torchvision.models.vit_b_16()).eval()
    m = create_vit("vit_b16").eval()
    m.load_state_dict(from_torchvision(tv.state_dict()), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(m(x), tv(x)) < 1e-5


def test_from_torchvision_custom_size_same_logits():
    from torchvision.models import VisionTransformer
    tv = randomize(VisionTransformer(image_size=32, patch_size=4, num_layers=3, num_heads=4, hidden_dim=64,
                                     mlp_dim=96, num_classes=7), std=0.05).eval()  # 0.02: a tanh GELU 2e-5 off
    m = ViT(img_size=32, patch_size=4, num_classes=7, dim=64, depth=3, heads=4, mlp_ratio=1.5).eval()
    m.load_state_dict(from_torchvision(tv.state_dict()), strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(m(x), tv(x)) < 1e-5
    # files saved before torchvision's MLP rename (pytorch/vision#6053) name them mlp.linear_1 / linear_2, which its
    # MLPBlock still loads: the same weights
    legacy = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v
              for k, v in tv.state_dict().items()}
    m.load_state_dict(from_torchvision(legacy), strict=True)


def test_timm_state_dict_loads_strict_same_logits():
    try:
        import timm
    except ImportError:
        raise unittest.SkipTest("timm not installed")
    t = randomize(timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10)).eval()
    m = create_vit("vit_s16", num_classes=10).eval()
    m.load_state_dict(t.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(m(x), t(x)) < 1e-6


def test_sdpa_path_equals_explicit_attention_path():
    m = randomize(ViT(img_size=32, patch_size=4, num_classes=10, dim=64, depth=3, heads=4), std=0.1).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        sdpa = m.forward_features(x)
        h = m.embed(x)
        for blk in m.blocks:
            h, attn = blk(h, return_attn=True)
        explicit = m.norm(h)
    assert attn.shape == (3, 4, 65, 65)
    assert rel_err(explicit, sdpa) < 1e-5


def test_attention_maps_shape_and_rows_sum_to_one():
    m = randomize(ViT(img_size=32, patch_size=8, num_classes=3, dim=32, depth=2, heads=2), std=0.2)
    maps = m.attention_maps(torch.randn(5, 3, 32, 32))
    assert maps.shape == (2, 5, 2, 17, 17)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 5, 2, 17), atol=1e-5)
    assert (maps >= 0).all() and maps.std() > 0  # not uniform: the random weights give real attention
    m = randomize(ViT(img_size=32, patch_size=8, num_classes=3, dim=32, depth=3, heads=2, drop_path=0.5), std=0.2)
    x = torch.randn(5, 3, 32, 32)
    a = m.train().attention_maps(x)  # in training mode: drop-path must not thin the network the maps come from
    assert m.training and torch.equal(a, m.eval().attention_maps(x))


def test_mean_pool_and_sincos():
    m = ViT(img_size=32, patch_size=4, num_classes=5, dim=64, depth=2, heads=2, pool="mean", pos_embed="sincos")
    assert m.cls_token is None
    assert "pos_embed" not in m.state_dict() and m.pos_embed.shape == (1, 64, 64)  # a buffer, not saved
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    pe = common.sincos_pos_embed(8, 64)
    assert pe.shape == (64, 64) and torch.equal(pe[0], torch.tensor([0.0, 1, 0, 1]).repeat_interleave(16))
    n = ViT(img_size=32, patch_size=4, dim=64, depth=2, heads=2, pos_embed="sincos")  # cls: a zero row first
    assert n.pos_embed.shape == (1, 65, 64) and n.pos_embed[0, 0].abs().sum() == 0


def test_resize_pos_embed():
    pe = torch.randn(1, 1 + 8 * 8, 16)
    assert torch.allclose(resize_pos_embed(pe, 8), pe, atol=1e-6)
    big = resize_pos_embed(pe, 12)
    assert big.shape == (1, 1 + 12 * 12, 16) and torch.equal(big[:, 0], pe[:, 0])
    smooth = torch.linspace(0, 1, 8).repeat(8)[None, :, None].expand(1, 64, 4)  # a ramp stays a ramp
    ramp = resize_pos_embed(smooth, 16, num_prefix=0)[0, :16, 0]
    assert ramp[0] < ramp[8] < ramp[15]
    for n in (12, 5):  # bicubic, corners not aligned, no antialiasing (README): timm's resample with antialias=False
        want = F.interpolate(pe[:, 1:].reshape(1, 8, 8, 16).permute(0, 3, 1, 2), size=(n, n), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1).reshape(1, n * n, 16)
        assert torch.allclose(resize_pos_embed(pe, n)[:, 1:], want, atol=1e-6), n
    # weights trained at 32 px load into a 64 px model once the grid is resized
    a, b = ViT(img_size=32, patch_size=4, dim=32, depth=1, heads=2), ViT(img_size=64, patch_size=4, dim=32, depth=1,
                                                                           heads=2)
    sd = a.state_dict()
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], 16)
    b.load_state_dict(sd, strict=True)


def test_value_errors():
    cases = [(lambda: ViT(img_size=30, patch_size=4), "divisible by patch_size"),
             (lambda: ViT(dim=100, heads=3), "divisible by heads"),
             (lambda: ViT(pool="max"), "pool"),
             (lambda: ViT(heads=0), "sizes must be positive"),
             (lambda: create_vit("vit_huge"), "unknown preset"),
             (lambda: ViT(img_size=32, patch_size=4, dim=30, heads=3, pos_embed="sincos"), "divisible by 4"),
             (lambda: create_vit("cifar_cpu")(torch.randn(1, 3, 64, 64)), "expected input (B, 3, 32, 32)"),
             (lambda: create_vit("cifar_cpu")(torch.randn(1, 1, 32, 32)), "got (1, 1, 32, 32)"),
             (lambda: from_torchvision({"fc.weight": torch.zeros(1)}), "unexpected key"),
             (lambda: from_torchvision({"heads.pre_logits.weight": torch.zeros(1)}), "representation layer")]
    for fn, words in cases:
        try:
            fn()
        except ValueError as e:
            assert words in str(e), (words, str(e))
        else:
            raise AssertionError(f"no ValueError for {words}")


def test_overfit_tiny_batch():
    torch.manual_seed(0)
    m = ViT(img_size=16, patch_size=4, num_classes=4, dim=64, depth=2, heads=4)
    x, y = torch.randn(32, 3, 16, 16), torch.arange(32) % 4
    opt, = common.make_optimizer(m, lr=3e-3, weight_decay=0.0)
    for _ in range(150):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    m.eval()
    assert (m(x).argmax(1) == y).float().mean().item() == 1.0, loss.item()


# ---------------------------------------------------------------------------------------------- common.py: helpers

def test_lr_schedule_is_pure_warmup_cosine():
    lrs = [common.lr_at(s, 100, 1e-3, 10, min_lr=1e-5) for s in range(101)]
    assert math.isclose(lrs[0], 1e-4) and math.isclose(lrs[9], 1e-3) and math.isclose(lrs[10], 1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and math.isclose(lrs[100], 1e-5)
    assert math.isclose(lrs[55], 1e-5 + (1e-3 - 1e-5) * 0.5)
    assert common.lr_at(37, 100, 1e-3, 10) == common.lr_at(37, 100, 1e-3, 10)


def test_pick_device_and_precision():
    """auto: CUDA when there is one; --device cuda without one: one error line; CPU: fp32, no loss scaling."""
    with unittest.mock.patch.object(torch.cuda, "is_available", return_value=True):
        assert [common.pick_device(n).type for n in ("auto", "cuda", "cpu")] == ["cuda", "cuda", "cpu"]
    with unittest.mock.patch.object(torch.cuda, "is_available", return_value=False):
        assert [common.pick_device(n).type for n in ("auto", "cpu")] == ["cpu", "cpu"]
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                common.pick_device("cuda")
                raise AssertionError("--device cuda accepted without a GPU")
            except SystemExit as e:
                assert e.code == 2 and "no CUDA GPU" in err.getvalue(), err.getvalue()
    autocast, scaler, label = common.precision(torch.device("cpu"))
    assert autocast is contextlib.nullcontext and not scaler.is_enabled() and label == "fp32"


def test_optimizer_groups_skip_decay_on_norms_biases_tokens():
    m = ViT(img_size=16, patch_size=4, num_classes=3, dim=32, depth=2, heads=2)
    opt, = common.make_optimizer(m, 1e-3, 0.05)
    decay, no_decay = opt.param_groups
    assert opt.defaults["fused"]  # one kernel for every tensor, on CPU too
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias", "head.bias"} <= nd
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in m.named_parameters() if n not in nd}
    assert "blocks.0.mlp.fc1.weight" not in nd and "patch_embed.proj.weight" not in nd
    # muon=True: the blocks' weight matrices move to Muon, with their decay; the rest stays with AdamW
    adamw, muon = common.make_optimizer(m, 1e-3, 0.05, muon=True)
    mats = {n for n, p in m.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    assert {names[id(p)] for g in muon.param_groups for p in g["params"]} == mats and len(mats) == 8
    assert all(g["weight_decay"] == 0.05 for g in muon.param_groups)
    assert {names[id(p)] for g in adamw.param_groups for p in g["params"]} == set(names.values()) - mats
    # --layer-decay 0.5: block i's lr x 0.5 ** (depth - i), the embeddings one step below block 0
    opt, = common.make_optimizer(m, 1e-3, 0.05, layer_decay=0.5)
    sc = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert [sc[k] for k in ("head.weight", "blocks.1.attn.qkv.weight", "blocks.0.attn.qkv.weight", "pos_embed")] == \
        [1, 0.5, 0.25, 0.125], sc
    # ckpt.pt's optimizer states: a list, or one state from before Muon; a count that does not fit is a ValueError
    common.set_lr([opt], 1e-3)  # the scale reaches the lr
    assert sorted({g["lr"] for g in opt.param_groups}) == [1.25e-4, 2.5e-4, 5e-4, 1e-3], opt.param_groups
    common.load_optimizers([opt], opt.state_dict())
    common.load_optimizers([adamw, muon], [adamw.state_dict(), muon.state_dict()])
    try:
        common.load_optimizers([adamw, muon], [adamw.state_dict()])
        raise AssertionError("1 state loaded into 2 optimizers")
    except ValueError as e:
        assert "1 optimizer states" in str(e) and "asks for 2" in str(e)


def test_decode_rgb_16bit_gif_and_errors(tmp_path):
    from PIL import Image
    Image.fromarray((torch.arange(64).view(8, 8) * 1000).numpy().astype("uint16")).save(tmp_path / "g16.png")
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]  # an animated GIF: its first frame
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    g16, gif = common.decode_rgb(str(tmp_path / "g16.png")), common.decode_rgb(str(tmp_path / "anim.gif"))
    assert g16.dtype == torch.uint8 and g16.shape == (3, 8, 8) and g16.max() == 63000 // 256  # the top 8 bits
    assert gif.shape == (3, 8, 8) and gif[0].float().mean() > 200 and gif[2].float().mean() < 50
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "full.png").read_bytes()[:60])
    Image.new("1", (13400, 13400)).save(tmp_path / "bomb.png")  # 2 KB on disk, 180M pixels: 2 GB as floats
    for name, words in (("none.png", "not a file"), ("empty.png", "non empty"), ("", "not a file"),
                        ("cut.png", "cut.png: "), ("bomb.png", "exceeds limit")):
        try:
            common.read_image(str(tmp_path / name), 16)
            raise AssertionError(f"{name} read")
        except ValueError as e:
            assert words in str(e) and ".cpp" not in str(e) and "operator" not in str(e), str(e)


def test_evaluate_counts_top1_top5():
    class Fixed(torch.nn.Module):  # logits are the input: class i scores x[:, i]
        def forward(self, x):
            return x
    x = torch.tensor([[9., 1, 2, 3, 4, 5, 0], [0, 9, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0, 9]])
    y = torch.tensor([0, 6, 0])  # right; 6 scores 5, in the top 5; 0 scores 5, second
    loss, top1, top5, n = common.evaluate(Fixed(), [(x[:2], y[:2]), (x[2:], y[2:])]).tolist()
    assert (top1, top5, n) == (1, 3, 3)
    assert math.isclose(loss, F.cross_entropy(x, y, reduction="sum").item(), rel_tol=1e-6)
    z = torch.tensor([[6., 5, 4, 3, 2, 1, 0]])  # class 4 ranks 5th: in the top 5; class 5 ranks 6th
    assert [common.evaluate(Fixed(), [(z, torch.tensor([c]))])[2] for c in (4, 5)] == [1, 0]
    assert common.evaluate(Fixed(), [(z.repeat(3, 1), torch.tensor([4, 4, 5]))])[2] == 2  # per row, not per column
    assert common.evaluate(Fixed(), [(z[:, :3], torch.tensor([2]))])[1:3].tolist() == [0, 1]  # 3 classes: all top 5

    class Row(torch.nn.Module):  # logits: the image's top row; flip=True mirrors left-right
        def forward(self, x):
            return x[:, 0, 0]
    img = torch.tensor([[[[3., 0, 1], [0, 0, 0]]]])
    loss = common.evaluate(Row(), [(img, torch.tensor([2]))], flip=True)[0].item()
    assert math.isclose(loss, F.cross_entropy(torch.tensor([[2., 0, 2]]), torch.tensor([2])).item(), rel_tol=1e-6)
    empty = common.evaluate(torch.nn.Linear(7, 7), [])  # a rank with no validation images still all_reduces
    assert empty.tolist() == [0, 0, 0, 0] and empty.dtype == torch.float64

    class Mode(Fixed):  # records the mode it ran in
        def forward(self, x):
            self.ran_training = self.training
            return x
    for training in (True, False):  # evaluated in eval mode, then left in the mode it was in
        m = Mode().train(training)
        common.evaluate(m, [(x, y)])
        assert m.ran_training is False and m.training is training


def test_plot_curves_every_epoch_and_errors(tmp_path):
    """curves.png: the train loss of every epoch, the test numbers of the evaluated epochs; no matplotlib, or a write
    that fails, is one line and the finished run stands. A fake matplotlib records the calls (CI has none)."""
    path, png, plots = tmp_path / "log.csv", str(tmp_path / "curves.png"), {}
    path.write_text("epoch,train_loss,test_loss,test_acc\n1,2.0,,\n2,1.5,1.4,50.0\n3,1.2,,\n")

    class Ax:
        def __init__(self, name):
            self.name = name

        def plot(self, x, y, **kw):
            plots[self.name, kw.get("label")] = (x, y)

        def set(self, **kw):
            pass

        def legend(self):
            pass

    class Fig:
        def savefig(self, *a, **kw):
            raise OSError(28, "No space left on device")
    plt = types.ModuleType("matplotlib.pyplot")
    plt.subplots, plt.close = lambda *a, **kw: (Fig(), (Ax("loss"), Ax("acc"))), lambda fig: None
    mpl = types.ModuleType("matplotlib")
    mpl.use, mpl.pyplot = lambda name: None, plt
    for mods, words in (({"matplotlib": mpl, "matplotlib.pyplot": plt}, "cannot write " + png),
                        ({"matplotlib": None}, "matplotlib not installed")):
        with unittest.mock.patch.dict(sys.modules, mods), contextlib.redirect_stdout(io.StringIO()) as out:
            common.plot_curves(str(path), png)
        assert words in out.getvalue(), out.getvalue()
    assert plots == {("loss", "train"): ([1.0, 2.0, 3.0], [2.0, 1.5, 1.2]), ("loss", "test"): ([2.0], [1.4]),
                     ("acc", None): ([2.0], [50.0])}, plots


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    m = ViT(img_size=16, patch_size=4, num_classes=3, dim=32, depth=1, heads=2)
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint({"model": m.state_dict(), "args": {"lr": 1e-3}, "step": 7}, path)
    assert not os.path.exists(path + ".tmp")
    ck = common.load_checkpoint(path)
    m2 = ViT(img_size=16, patch_size=4, num_classes=3, dim=32, depth=1, heads=2)
    common.load_weights(m2, ck["model"])
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), m2.state_dict().values()))
    assert ck["step"] == 7 and ck["args"] == {"lr": 1e-3}

    def torn(obj, f):  # a write that dies half-way (disk full): the previous checkpoint must survive
        open(f, "wb").write(b"half")
        raise OSError(28, "No space left on device")
    with unittest.mock.patch.object(torch, "save", torn), contextlib.redirect_stderr(io.StringIO()):
        try:
            common.save_checkpoint({"step": 8}, path)
            raise AssertionError("a failed save went unnoticed")
        except SystemExit:
            pass
    assert common.load_checkpoint(path)["step"] == 7 and not os.path.exists(path + ".tmp")  # its space is free
    bad = {k: v.clone() for k, v in m.state_dict().items()}
    bad["head.weight"][0, 0] = float("nan")  # diverged weights (a finite loss, an inf gradient): the old file stays
    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            common.save_checkpoint({"model": bad, "step": 8}, path)
            raise AssertionError("NaN weights were saved")
        except SystemExit as e:
            assert e.code == 2 and "NaN or inf" in err.getvalue() and len(err.getvalue().splitlines()) == 1
    assert common.load_checkpoint(path)["step"] == 7
    log = common.Logger(str(tmp_path / "logdir"), ["epoch"])
    os.remove(tmp_path / "logdir" / "log.txt")
    os.makedirs(tmp_path / "logdir" / "log.txt")  # a write that fails mid-run (a full disk): one line, not a traceback
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            log("ep 1")
            raise AssertionError("a failed log write went unnoticed")
        except SystemExit as e:
            assert e.code == 2 and "error: cannot write" in err.getvalue() and "log.txt" in err.getvalue()
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    errors = [(lambda: common.load_checkpoint(path), "corrupt, truncated"),
              (lambda: common.load_checkpoint(str(tmp_path / "none.pt")), "not found"),
              (lambda: common.load_checkpoint(str(tmp_path)), "is a folder"),
              (lambda: common.load_weights(ViT(img_size=16, patch_size=4, num_classes=5, dim=32, depth=1, heads=2),
                                           m.state_dict()), "head.weight (3, 32) vs (5, 32)"),
              (lambda: common.load_weights(m2, {"fc.weight": torch.zeros(1)}), "unexpected (e.g. fc.weight)"),
              (lambda: common.load_weights(m2, {k: v for k, v in m.state_dict().items() if k != "norm.bias"}),
               "1 missing (e.g. norm.bias)")]
    for fn, words in errors:
        try:
            fn()
        except common.CheckpointError as e:
            assert words in str(e) and "\n" not in str(e), str(e)
        else:
            raise AssertionError(f"no CheckpointError for {words}")
    err = io.StringIO()  # an --out-dir that cannot be written (a file is in the way): one line, exit 2
    with contextlib.redirect_stderr(err):
        try:
            common.Logger(os.path.join(path, "sub"), ["epoch"])
            raise AssertionError("Logger wrote under a file")
        except SystemExit as e:
            assert e.code == 2 and "cannot write" in err.getvalue() and len(err.getvalue().splitlines()) == 1
    err = io.StringIO()  # a checkpoint that cannot be written: one line, the old one kept
    with contextlib.redirect_stderr(err):
        try:
            common.save_checkpoint({"step": 8}, os.path.join(path, "sub", "ckpt.pt"))
            raise AssertionError("saved under a file")
        except SystemExit as e:
            assert e.code == 2 and "cannot write" in err.getvalue() and len(err.getvalue().splitlines()) == 1
    logs = tmp_path / "logs"  # no ckpt.pt here: a fresh run's folder
    logs.mkdir()
    cols = ["epoch", "train_loss", "test_loss", "test_acc"]
    (logs / "log.csv").write_text(",".join(cols) + "\n")  # a header alone: a run stopped in its 1st epoch, may go
    common.Logger(str(logs), cols).row(epoch=1, train_loss=1, test_loss=1, test_acc=1)
    with contextlib.redirect_stderr(io.StringIO()):  # rows of an earlier run: kept
        try:
            common.Logger(str(logs), cols)
            raise AssertionError("an earlier run's log.csv overwritten")
        except SystemExit as e:
            assert e.code == 2


def flag_error(get_args, argv):
    """get_args(argv) in-process (its checks run before anything else): (exit code, last stderr line)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            get_args(argv)
        except SystemExit as e:
            return e.code, (err.getvalue().splitlines() or [""])[-1]
    return None, f"{argv} accepted"


# ------------------------------------------------------------------------------------------------- mini_vit.py

MINI_HEADER = 'epoch,train_loss,test_loss,test_acc,lr,img_per_s,elapsed_s'


@contextlib.contextmanager
def kept_signals_and_threads():
    """A script's main() run in this process installs its StopFlag's SIGINT / SIGTERM handlers and sets --threads:
    the test process gets its own back after, however main() ended."""
    handlers, threads = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)], torch.get_num_threads()
    try:
        yield
    finally:
        for s, h in zip((signal.SIGINT, signal.SIGTERM), handlers):
            signal.signal(s, h)
        torch.set_num_threads(threads)


def _write_tiny_mnist(root, folder='MNIST', n_train=512, n_test=128):
    """Real idx files (big-endian magic 2051 images / 2049 labels) holding a learnable toy task that small shifts
    do not change: class c is one of 10 stripe / checker textures, on noise."""
    raw = os.path.join(root, folder, 'raw')
    os.makedirs(raw, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    y, x = torch.meshgrid(torch.arange(28), torch.arange(28), indexing='ij')
    textures = torch.stack([y % 2, y // 2 % 2, x % 2, x // 2 % 2, (x + y) % 2, (x + y) // 2 % 2, (x - y) // 2 % 2,
                            (x // 2 + y // 2) % 2, torch.ones_like(x), torch.zeros_like(x)]).to(torch.uint8) * 190
    for split, n in (('train', n_train), ('t10k', n_test)):
        labels = torch.arange(n) % 10
        imgs = textures[labels] + torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
        with open(os.path.join(raw, f'{split}-images-idx3-ubyte'), 'wb') as f:
            f.write(struct.pack('>IIII', 2051, n, 28, 28) + imgs.numpy().tobytes())
        with open(os.path.join(raw, f'{split}-labels-idx1-ubyte'), 'wb') as f:
            f.write(struct.pack('>II', 2049, n) + labels.to(torch.uint8).numpy().tobytes())


def _run_mini(*args, env=None):
    return subprocess.run([sys.executable, 'mini_vit.py', *args], cwd=HERE, capture_output=True, text=True,
                          timeout=120, env=env)


def _env():
    # an unreachable proxy makes every download fail at once, online or not; one thread: tiny models gain nothing
    # from more, and a busy machine makes thread barriers very slow
    env = {k: v for k, v in os.environ.items() if k.lower() not in ('no_proxy', 'http_proxy', 'https_proxy')}
    env.update(http_proxy='http://127.0.0.1:9', https_proxy='http://127.0.0.1:9', OMP_NUM_THREADS='1')
    return env


def test_mini_short_run(tmp_path):
    _write_tiny_mnist(str(tmp_path))
    out = tmp_path / 'out'
    r = _run_mini('--data-dir', str(tmp_path), '--out-dir', str(out), '--epochs', '3', '--batch-size', '16',
                  '--dim', '32', '--depth', '2', '--heads', '2', '--patch-size', '7', '--lr', '1e-2',
                  '--warmup', '0.5', '--tta', 'on', '--device', 'cpu', env=_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith('done: test_acc') and 'with test-time flip' in r.stdout
    with open(out / 'log.csv') as f:
        assert f.readline().strip() == MINI_HEADER
    with open(out / 'log.csv') as f:
        rows = list(csv.DictReader(f))
    assert [int(row['epoch']) for row in rows] == [1, 2, 3]
    assert float(rows[-1]['train_loss']) < float(rows[0]['train_loss']) - 0.3, rows
    assert float(rows[-1]['test_acc']) > 50, rows
    for row in rows:  # the lr of each epoch's last step: 32 steps an epoch, 16 of warmup, cosine over the other 80
        s = 32 * int(row['epoch']) - 1
        assert math.isclose(float(row['lr']), 1e-2 * 0.5 * (1 + math.cos(math.pi * (s - 16) / 80)), rel_tol=1e-3), row
    assert 'test_acc' in r.stdout and 'img/s' in r.stdout and 'eta' in r.stdout
    ckpt = torch.load(out / 'model.pt', weights_only=True)
    assert ckpt['args']['dim'] == 32 and 'head.weight' in ckpt['model'] and 'blocks.1.attn.qkv.weight' in ckpt['model']
    assert not os.path.exists(str(out / 'model.pt.tmp'))
    import torchvision
    save, calls = torch.save, []

    def torn(obj, f):  # the 2nd epoch's write dies half-way (disk full): the 1st epoch's model.pt stays
        calls.append(f)
        if len(calls) == 2:
            open(f, 'wb').write(b'half')
            raise OSError(28, 'No space left on device')
        save(obj, f)
    tiny = ['--data-dir', str(tmp_path), '--batch-size', '16', '--dim', '32', '--depth', '2', '--heads', '2',
            '--device', 'cpu', '--optimizer', 'adamw']
    with unittest.mock.patch.object(torch, 'save', torn):
        try:
            mini_vit.main(tiny + ['--out-dir', str(tmp_path / 'torn'), '--epochs', '2', '--warmup', '0'])
        except SystemExit as e:
            assert 'cannot write' in str(e.code) and 'No space left' in str(e.code), e.code
    assert torch.load(tmp_path / 'torn' / 'model.pt', weights_only=True)['args']['epochs'] == 2
    assert not os.path.exists(str(tmp_path / 'torn' / 'model.pt.tmp'))
    with open(tmp_path / 'torn' / 'log.csv') as f:  # the row goes in after the save: none for the lost epoch
        assert [row['epoch'] for row in csv.DictReader(f)] == ['1']

    def full(path, mode='r', *a, **k):  # the log.csv append fails (a full disk): one line, epoch 1's weights stay
        if str(path).endswith('log.csv') and mode == 'a':
            raise OSError(28, 'No space left on device')
        return open(path, mode, *a, **k)
    with unittest.mock.patch.object(mini_vit, 'open', full, create=True):
        try:
            mini_vit.main(tiny + ['--out-dir', str(tmp_path / 'full'), '--epochs', '1', '--warmup', '0'])
            raise AssertionError('a failed log.csv append went unnoticed')
        except SystemExit as e:
            assert 'cannot write' in str(e.code) and 'log.csv in epoch 1 (No space left' in str(e.code), e.code
    assert (tmp_path / 'full' / 'model.pt').is_file()
    (tmp_path / 'dir' / 'model.pt.tmp').mkdir(parents=True)  # a folder in the way: torch.save raises a RuntimeError
    try:
        mini_vit.main(tiny + ['--out-dir', str(tmp_path / 'dir'), '--epochs', '1', '--warmup', '0'])
        raise AssertionError('a failed save went unnoticed')
    except SystemExit as e:
        assert str(e.code).startswith(f"error: cannot write {tmp_path / 'dir' / 'model.pt'} in epoch 1 ("), e.code
    for i, text in enumerate([b'my,own,results\n', b'a\xff\xfe\n',  # a one-line file not ours, one not UTF-8,
                              f'{MINI_HEADER}\n1,2.3,2.2,15.00,1.000e-03,99.0,5.0\n'.encode()]):  # a row, no model.pt
        (tmp_path / f'own{i}').mkdir()
        (tmp_path / f'own{i}' / 'log.csv').write_bytes(text)
        try:
            mini_vit.main(tiny + ['--out-dir', str(tmp_path / f'own{i}')])
        except SystemExit as e:
            assert '--overwrite' in str(e.code), e.code
        assert (tmp_path / f'own{i}' / 'log.csv').read_bytes() == text
    (tmp_path / 'own_pt').mkdir()
    (tmp_path / 'own_pt' / 'model.pt').write_bytes(b'mine')
    try:
        mini_vit.main(tiny + ['--out-dir', str(tmp_path / 'own_pt'), '--epochs', '1'])
        raise AssertionError('a model.pt alone was overwritten')
    except SystemExit as e:
        assert '--overwrite' in str(e.code), e.code
    assert (tmp_path / 'own_pt' / 'model.pt').read_bytes() == b'mine'
    # a second run into the same folder refuses to clobber it (in-process: it stops before loading data)
    try:
        mini_vit.main(['--data-dir', str(tmp_path), '--out-dir', str(out), '--device', 'cpu'])
        msg = None
    except SystemExit as e:
        msg = str(e.code)
    assert msg is not None and msg.startswith('error:') and '--overwrite' in msg
    # a diverging run stops with one line, before any weights are written
    try:
        mini_vit.main(['--data-dir', str(tmp_path), '--out-dir', str(tmp_path / 'nan'), '--epochs', '1', '--batch-size',
                       '16', '--dim', '32', '--depth', '2', '--heads', '2', '--lr', '1e30', '--warmup', '0',
                       '--device', 'cpu', '--optimizer', 'adamw'])  # the short run above used the default, Muon
        msg = None
    except SystemExit as e:
        msg = str(e.code)
    assert msg is not None and msg.startswith('error:') and 'loss became nan' in msg, msg
    assert not os.path.exists(str(tmp_path / 'nan' / 'model.pt'))
    step, calls = mini_vit.Muon.step, []

    def poison(self):  # the epoch's last step leaves NaN weights behind a finite loss (an inf gradient): no save
        step(self)
        calls.append(1)
        if len(calls) == 512 // 16:
            self.param_groups[0]['params'][0].data.fill_(float('nan'))
    with unittest.mock.patch.object(mini_vit.Muon, 'step', poison):
        try:
            mini_vit.main(tiny[:-2] + ['--out-dir', str(tmp_path / 'nanw'), '--epochs', '1', '--warmup', '0'])
            msg = None
        except SystemExit as e:
            msg = str(e.code)
    assert msg is not None and 'weights became NaN or inf in epoch 1' in msg, msg
    assert not os.path.exists(str(tmp_path / 'nanw' / 'model.pt'))
    plain, steps = F.cross_entropy, []

    def inf_loss(*a, **k):  # the first step's loss inf (logits past fp32's log-softmax), its gradients finite: no save
        steps.append(1)
        return plain(*a, **k) + (math.inf if len(steps) == 1 else 0.0)
    with unittest.mock.patch.object(F, 'cross_entropy', inf_loss):
        try:
            mini_vit.main(tiny + ['--out-dir', str(tmp_path / 'inf'), '--epochs', '1', '--warmup', '0'])
            msg = None
        except SystemExit as e:
            msg = str(e.code)
    assert msg is not None and 'training loss became inf in epoch 1' in msg, msg
    assert not os.path.exists(str(tmp_path / 'inf' / 'model.pt'))
    # the same command with a sane lr may run there again: a log.csv of only its header is from a run that stopped
    tiny += ['--epochs', '1', '--warmup', '0']
    made, opts, augs, seen, ce, aug, adamw = [], [], [], [], F.cross_entropy, mini_vit.augment, torch.optim.AdamW
    load = mini_vit.load_data

    def slow_aug(x, *a):  # 32 steps of >= 10 ms: img_per_s <= 1600; elapsed_s counts from before the 0.5 s load
        augs.append(a)
        time.sleep(0.01)
        return aug(x, *a)

    def slow_load(args):
        time.sleep(0.5)
        return load(args)

    class SpyViT(mini_vit.ViT):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    class SpyMuon(mini_vit.Muon):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            opts.append(self)

    def spy_adamw(*a, **k):
        opts.append(adamw(*a, **k))
        return opts[-1]

    def spy_ce(logits, y, **k):
        loss = ce(logits, y, **k)
        seen.append((torch.is_grad_enabled(), k.get('label_smoothing', 0.0), loss.item(), len(y)))
        return loss
    spy = unittest.mock.patch.object
    with spy(mini_vit, 'ViT', SpyViT), spy(mini_vit, 'Muon', SpyMuon), spy(torch.optim, 'AdamW', spy_adamw), \
            spy(mini_vit, 'augment', slow_aug), spy(mini_vit, 'load_data', slow_load), \
            spy(F, 'cross_entropy', spy_ce), contextlib.redirect_stdout(io.StringIO()) as log:
        mini_vit.main(tiny + ['--out-dir', str(tmp_path / 'nan'), '--rotate', '10', '--scale', '0.1', '--optimizer',
                              'muon', '--pool', 'cls', '--drop-path', '0.1'])  # + affine path
    assert os.path.exists(str(tmp_path / 'nan' / 'model.pt'))
    assert 'test-time flip' not in log.getvalue() and set(augs) == {(1, False, 10.0, 0.1)}  # MNIST: no flips
    m = made[0]
    assert m.training and [d.p for d in m.modules() if isinstance(d, torchvision.ops.StochasticDepth)] == [0.1, 0.1]
    names = {id(p): n for n, p in m.named_parameters()}
    groups = {(type(o).__name__, g['weight_decay']): {names[id(p)] for p in g['params']} for o in opts
              for g in o.param_groups}
    assert groups == {('SpyMuon', 0.05): {n for n in names.values() if n.startswith('blocks') and n.endswith('weight')
                                          and 'norm' not in n},
                      ('AdamW', 0.05): {'patch_embed.proj.weight', 'head.weight'},
                      ('AdamW', 0.0): {n for n in names.values() if n.endswith('bias') or 'norm' in n
                                       or n in ('pos_embed', 'cls_token')}}, groups
    with open(tmp_path / 'nan' / 'log.csv') as f:  # train_loss: the mean smoothed loss of the 32 steps; test: plain
        row = next(csv.DictReader(f))
    assert [s[:2] for s in seen] == [(True, 0.1)] * 32 + [(False, 0.0)], seen
    assert math.isclose(float(row['train_loss']), sum(s[2] for s in seen[:32]) / 32, abs_tol=2e-4), row
    assert math.isclose(float(row['test_loss']), seen[32][2], abs_tol=2e-4) and seen[32][3] == 128, row
    assert all(p.grad is None for p in m.parameters())  # cleared after each step
    lrs = {g['lr'] for o in opts for g in o.param_groups}  # Muon's and AdamW's groups on the one schedule
    assert len(lrs) == 1 and math.isclose(lrs.pop(), float(row['lr']), rel_tol=1e-3), lrs
    assert 0.32 <= 512 / float(row['img_per_s']) <= float(row['elapsed_s']) - 0.5 + 0.05, row
    mini_vit.main(tiny + ['--out-dir', str(tmp_path / 'again')])  # --seed: the 'full' run's command, its weights
    a, b = (torch.load(tmp_path / d / 'model.pt', weights_only=True)['model'] for d in ('full', 'again'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    mini_vit.main(tiny + ['--out-dir', str(tmp_path / 'seed1'), '--seed', '1'])  # another --seed: other weights
    assert not torch.equal(a['pos_embed'], torch.load(tmp_path / 'seed1' / 'model.pt', weights_only=True)['model'][
        'pos_embed'])
    # the affine path: a near-zero rotation and zoom, no shift, resamples each pixel at its own centre; shifts move
    # the ink by up to --translate px, not more
    x = torch.zeros(64, 28, 28, dtype=torch.uint8)
    x[:, 10:18, 12:16] = 255
    assert (mini_vit.augment(x, 0, False, 1e-9, 1e-9) - x).abs().max() < 0.01
    y = mini_vit.augment(x, 2, False, 1e-9, 1e-9)
    assert y.dtype == torch.float32 and y.shape == x.shape and 0 <= y.min() and y.max() <= 255.01
    assert not torch.allclose(y, x.float()) and (y[:, 8:20, 10:18].sum((1, 2)) - 255 * 32).abs().max() < 1
    # --overwrite, then a stop in epoch 1: no earlier run's model.pt is left beside the new log
    try:
        mini_vit.main(tiny + ['--out-dir', str(out), '--overwrite', '--lr', '1e30'])
    except SystemExit as e:
        assert 'loss became nan' in str(e.code), e.code
    assert not os.path.exists(str(out / 'model.pt'))


def test_muon_equals_torch_muon():
    # mini_vit.Muon and common.Muon: torch.optim.Muon(adjust_lr_fn='match_rms_adamw')'s maths; torch's casts to bf16
    # first, so they are compared in fp64 with that cast made a copy: matrices of two shapes, both orientations, over
    # steps with momentum and decay
    if not hasattr(torch.optim, 'Muon'):
        raise unittest.SkipTest(f'torch {torch.__version__} has no torch.optim.Muon (new in 2.9)')
    for cls in (mini_vit.Muon, common.Muon):
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(0.02 * torch.randn(s, dtype=torch.float64)) for s in [(96, 32)] * 3 + [(32, 64)] * 2]
        qs, p_start = [torch.nn.Parameter(p.detach().clone()) for p in ps], [p.detach().clone() for p in ps]
        mine = cls(ps, lr=3e-3, weight_decay=0.05)
        ref = torch.optim.Muon(qs, lr=3e-3, weight_decay=0.05, adjust_lr_fn='match_rms_adamw')
        for _ in range(3):
            for p, q in zip(ps, qs):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            mine.step()
            with unittest.mock.patch.object(torch.Tensor, 'bfloat16', lambda t: t.clone()):
                ref.step()
        for p, q, p0 in zip(ps, qs, p_start):
            assert (p - p0).abs().max() > 1e-3  # the steps moved the weights
            assert torch.allclose(p, q, rtol=0, atol=1e-12), (cls, (p - q).abs().max())
            assert torch.equal(mine.state[p]['momentum_buffer'], ref.state[q]['momentum_buffer'])
        # the update is near-orthogonal: singular values in (0.5, 1.5), as Newton-Schulz's quintic stops early
        s = torch.linalg.svdvals(sys.modules[cls.__module__].orthogonalise(torch.randn(2, 40, 24, dtype=torch.float64)))
        assert s.min() > 0.5 and s.max() < 1.5, s


def test_mini_state_dict_parity_with_common(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(5, 1, 28, 28)
    for pool, patch in (('cls', 4), ('mean', 7)):
        mini = mini_vit.ViT(patch_size=patch, dim=48, depth=2, heads=3, mlp_ratio=2.0, pool=pool)
        with torch.no_grad():  # head is zero-initialised: perturb everything so the logits mean something
            for p in mini.parameters():
                p.add_(0.05 * torch.randn_like(p))
        path = tmp_path / f'{pool}.pt'
        torch.save(mini.state_dict(), path)
        ref = common.ViT(img_size=28, patch_size=patch, in_chans=1, num_classes=10, dim=48, depth=2, heads=3,
                         mlp_ratio=2.0, pool=pool, pos_embed='learn')
        ref.load_state_dict(torch.load(path, weights_only=True), strict=True)
        mini.eval(), ref.eval()
        with torch.no_grad():
            a, b = mini(x), ref(x)
        assert a.shape == (5, 10) and a.abs().max() > 1e-3
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (a - b).abs().max()
    # augment: per-sample shifts of up to 1 px; a flip of about half the images, each whole
    torch.manual_seed(0)
    xs = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    assert (mini_vit.augment(xs, 1, False) != xs).flatten(1).any(1).float().mean() > 0.5
    b = mini_vit.augment(xs, 0, True)
    fl = (b == xs.flip(2)).flatten(1).all(1)
    assert 0 < fl.sum() < 64 and (fl | (b == xs).flatten(1).all(1)).all()
    # --tta: the test accuracy of the mean logits of each image and its mirror image
    xu, y = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8), torch.arange(6)
    with torch.no_grad():
        inp = mini_vit.to_input(xu, 0.3, 0.4)
        logits = (mini(inp) + mini(inp.flip(3))) / 2
    loss, acc = mini_vit.evaluate(mini, xu, y, 0.3, 0.4, contextlib.nullcontext(), flip=True)
    assert abs(loss - torch.nn.functional.cross_entropy(logits, y).item()) < 1e-5
    assert acc == 100.0 * (logits.argmax(1) == y).sum().item() / 6


def test_mini_lr_augment_units_eval_mode():
    lrs = [mini_vit.get_lr(s, 100, 10, 1.0) for s in range(100)]  # warmup from 1/10 of the peak, then cosine to ~0
    assert math.isclose(lrs[0], 0.1) and math.isclose(lrs[9], 1.0) and math.isclose(lrs[10], 1.0), lrs[:11]
    assert math.isclose(lrs[55], 0.5) and lrs[99] < 1e-3 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    torch.manual_seed(0)
    x = torch.zeros(256, 28, 28, dtype=torch.uint8)
    x[:, 10:18, 12:16] = 255  # a bar centred in the image
    cols = torch.arange(28.0)

    def cx(im, dim=1):  # the ink's centre column (dim 2: row)
        return (im.float().sum(dim) * cols).sum(1) / im.float().sum((1, 2))
    for rot in (0.0, 1e-9):  # whole-pixel and affine shifts: both ways, up to --translate 2 px, across and down apart
        a = mini_vit.augment(x, 2, False, rot, rot)
        d, e = cx(a) - cx(x), cx(a, 2) - cx(x, 2)
        assert d.min() < -1.5 and d.max() > 1.5 and d.abs().max() < 2.01, (rot, d.min(), d.max())
        assert e.min() < -1.5 and e.max() > 1.5 and e.abs().max() < 2.01 and ((d - e).abs() > 0.5).float().mean() > 0.6
    sq = torch.zeros(512, 28, 28, dtype=torch.uint8)
    sq[:, 10:18, 10:18] = 255  # --scale 0.5: a zoom by 0.5 to 1.5, so the square's area times 0.25 to 2.25
    area = mini_vit.augment(sq, 0, False, 0.0, 0.5).sum((1, 2)) / (255 * 64)
    assert 0.24 < area.min() < 0.3 and 2.15 < area.max() < 2.26, (area.min(), area.max())
    xs = torch.randint(0, 256, (1000, 28, 28), dtype=torch.uint8)  # --hflip: each image with probability 1/2
    assert 0.43 < (mini_vit.augment(xs, 0, True) != xs).flatten(1).any(1).float().mean() < 0.57
    assert (mini_vit.augment(x, 0, False, 1.0, 0.0) - x).abs().max() < 40  # 1 degree: the corners move < 0.1 px
    assert ((mini_vit.augment(x, 0, False, 90.0, 0.0) - x).abs().amax((1, 2)) > 128).float().mean() > 0.5
    assert torch.allclose(mini_vit.to_input(torch.full((1, 28, 28), 255, dtype=torch.uint8), 0.1307, 0.3081),
                          torch.full((1, 1, 28, 28), (1 - 0.1307) / 0.3081))
    m, calls = mini_vit.ViT(dim=16, depth=1, heads=2).train(), []
    m.register_forward_hook(lambda mod, i, o: calls.append((torch.is_grad_enabled(), mod.training)))
    mini_vit.evaluate(m, x[:4], torch.zeros(4, dtype=torch.long), 0.1, 0.3, contextlib.nullcontext())
    assert calls == [(False, False)] and m.training, calls
    # over 1000 images (two chunks), every one counted; the zero-initialised head gives every class the same logit
    y = (torch.arange(1001) == 1000).long()
    loss, acc = mini_vit.evaluate(m, torch.zeros(1001, 28, 28, dtype=torch.uint8), y, 0.1, 0.3,
                                  contextlib.nullcontext())
    assert math.isclose(loss, math.log(10), rel_tol=1e-6) and acc == 100 * 1000 / 1001, (loss, acc)
    assert (mini_vit.fmt_time(5000.9), mini_vit.fmt_time(65)) == ('83m20s', '1m05s')


def test_mini_progress_lines_and_log_on_a_fake_clock(tmp_path):
    # a clock that moves 1 s a training step, 7 s an evaluation, 5 s to load the data: each progress line and log.csv
    # row is known to the digit (2 epochs of 32 steps, 16 of warmup)
    _write_tiny_mnist(str(tmp_path))
    now, batches, losses = [1000.0], [], []
    aug, ev, load, ce = mini_vit.augment, mini_vit.evaluate, mini_vit.load_data, F.cross_entropy

    def step_aug(x, *a):
        now[0] += 1
        batches.append(x)
        return aug(x, *a)

    def slow_eval(*a, **k):
        now[0] += 7
        return ev(*a, **k)

    def slow_load(args):
        now[0] += 5
        return load(args)

    def spy_ce(logits, y, **k):
        loss = ce(logits, y, **k)
        if torch.is_grad_enabled():
            losses.append(loss.item())
        return loss
    spy = unittest.mock.patch.object
    for every, n_lines in (('0.5', 64), ('30', 4)):  # 0.5: a line a step; 30: one at step 31 of each epoch
        batches.clear(), losses.clear()
        with spy(mini_vit, 'time', types.SimpleNamespace(time=lambda: now[0])), spy(mini_vit, 'augment', step_aug), \
                spy(mini_vit, 'evaluate', slow_eval), spy(mini_vit, 'load_data', slow_load), \
                spy(F, 'cross_entropy', spy_ce), contextlib.redirect_stdout(io.StringIO()) as log:
            with kept_signals_and_threads():
                mini_vit.main(['--data-dir', str(tmp_path), '--out-dir', str(tmp_path / every), '--batch-size', '16',
                               '--dim', '16', '--depth', '1', '--epochs', '2', '--device', 'cpu', '--threads', '1',
                               '--log-every', every])
                assert torch.get_num_threads() == 1
        lines = [line.split(' | ') for line in log.getvalue().splitlines() if line.startswith('ep ')]
        with open(tmp_path / every / 'log.csv') as f:
            rows = list(csv.DictReader(f))
        assert len(lines) == n_lines and len(rows) == 2, (lines, rows)
        for line in lines:
            epoch, step = int(line[0].split()[1][0]), int(line[1].split()[1].split('/')[0])
            end = step == 32 * epoch  # the epoch's line: its test scores, the log.csv row's numbers
            train_s = step + 7 * (epoch - 1 + end)  # the clock since the data was loaded
            assert line[0] == f'ep {epoch}/2' and line[1] == f'step {step}/64', line
            assert line[2] == f'loss {sum(losses[32 * epoch - 32:step]) / (step - 32 * epoch + 32):.4f}', line
            assert line[-4] == f'lr {mini_vit.get_lr(step - 1, 64, 16, 4e-3):.1e}' and line[-3] == '16 img/s', line
            assert line[-2:] == [f'elapsed {mini_vit.fmt_time(5 + train_s)}',
                                 f'eta {mini_vit.fmt_time(train_s / step * (64 - step))}'], line
            if end:
                row = rows[epoch - 1]
                assert line[3:5] == [f"test_loss {row['test_loss']}", f"test_acc {row['test_acc']}"], (line, row)
                assert (row['img_per_s'], row['elapsed_s']) == ('16.0', f'{5 + train_s}.0'), row
            else:
                assert len(line) == 7, line
    assert [int(line[1].split()[1].split('/')[0]) for line in lines] == [31, 32, 63, 64]
    x_train = load(mini_vit.get_args(['--data-dir', str(tmp_path)]))[0]  # each epoch: all images, a new order

    def ids(xs):
        return (xs.flatten(1).long() * torch.arange(784)).sum(1).tolist()
    ep1, ep2 = ids(torch.cat(batches[:32])), ids(torch.cat(batches[32:]))
    assert sorted(ep1) == sorted(ep2) == sorted(ids(x_train)) and len(set(ep1)) == 512
    assert ep1 != ep2 and ids(x_train) not in (ep1, ep2)


def test_mini_fashion_flips_and_test_time_flip(tmp_path):
    # --hflip auto flips Fashion-MNIST's training images, not MNIST's; --tta auto follows it; on / off override both.
    # The done line's second number is the accuracy of evaluate(flip=True)
    _write_tiny_mnist(str(tmp_path), 'FashionMNIST')
    _write_tiny_mnist(str(tmp_path))
    aug, ev, flips, evals, spy = mini_vit.augment, mini_vit.evaluate, set(), [], unittest.mock.patch.object

    def spy_aug(x, translate, hflip, *a):
        flips.add(hflip)
        return aug(x, translate, hflip, *a)

    def spy_eval(*a, **k):
        evals.append((k.get('flip', False), ev(*a, **k)))
        return evals[-1][1]
    for i, (flags, hflip, tta) in enumerate([(['--dataset', 'fashion'], True, True),
                                             (['--dataset', 'fashion', '--tta', 'off'], True, False),
                                             (['--dataset', 'fashion', '--hflip', 'off'], False, False),
                                             (['--dataset', 'fashion', '--hflip', 'off', '--tta', 'on'], False, True),
                                             (['--hflip', 'on'], True, True), ([], False, False)]):
        flips.clear(), evals.clear()
        with spy(mini_vit, 'augment', spy_aug), spy(mini_vit, 'evaluate', spy_eval), \
                contextlib.redirect_stdout(io.StringIO()) as log:
            with kept_signals_and_threads():  # --threads 1: much faster on a busy CPU; the old count back after
                mini_vit.main(flags + ['--data-dir', str(tmp_path), '--out-dir', str(tmp_path / str(i)), '--epochs',
                                       '1', '--batch-size', '64', '--dim', '16', '--depth', '1', '--device', 'cpu',
                                       '--threads', '1'])
        done = log.getvalue().splitlines()[-1]
        assert flips == {hflip} and [e[0] for e in evals] == [False] + [True] * tta, (flags, flips, evals)
        want = f'done: test_acc {evals[0][1][1]:.2f}' + (f', {evals[1][1][1]:.2f} with test-time flip' if tta else '')
        assert done.startswith(want + ' in '), (flags, done, want)


def test_mini_ctrl_c_and_out_of_memory_end_in_one_line(tmp_path):
    # the script's __main__ in-process (runpy): Ctrl-C and out of memory mid-run end with one line, no traceback;
    # another RuntimeError still raises
    import runpy
    _write_tiny_mnist(str(tmp_path))
    for i, (exc, want) in enumerate([
            (KeyboardInterrupt(), '\nstopped: model.pt and log.csv hold the last finished epoch, if any'),
            (torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB.\nmore'),
             'error: out of memory (CUDA out of memory. Tried to allocate 2.00 GiB.): try a smaller --batch-size'),
            (RuntimeError('CUDA error: an illegal memory access was encountered'), None)]):
        def boom(*a, **k):
            raise exc
        argv = ['mini_vit.py', '--data-dir', str(tmp_path), '--out-dir', str(tmp_path / str(i)), '--device', 'cpu',
                '--epochs', '1', '--batch-size', '64', '--dim', '16', '--depth', '1']  # (a short run if not raised)
        with unittest.mock.patch.object(sys, 'argv', argv), unittest.mock.patch.object(torch, 'randperm', boom), \
                contextlib.redirect_stdout(io.StringIO()):
            try:
                runpy.run_path(os.path.join(HERE, 'mini_vit.py'), run_name='__main__')
                raise AssertionError(f'{exc!r} went unnoticed')
            except SystemExit as e:
                assert want is not None and str(e.code).startswith(want), (exc, e.code)
            except RuntimeError as e:
                assert want is None and e is exc, e
            except KeyboardInterrupt:
                raise AssertionError('Ctrl-C ended in a traceback')


def test_mini_init_and_drop_path():
    # timm's init: Linear weights of std 0.02, zero biases, a zero head. --drop-path 0.5 in training: each image skips
    # each of the two residual branches on its own, so 64 copies of one input come out in 4 ways; in eval mode in 1
    torch.manual_seed(0)
    m = mini_vit.ViT()
    for name, lin in m.named_modules():
        if isinstance(lin, torch.nn.Linear):
            assert not lin.bias.any() and (not lin.weight.any() if name == 'head' else 0.018 < lin.weight.std() < 0.022)
    blk, x = mini_vit.Block(8, 2, 2.0, 0.5), torch.randn(1, 5, 8).expand(64, 5, 8)
    with torch.no_grad():
        assert len(torch.unique(blk(x).round(decimals=3), dim=0)) == 4
        assert len(torch.unique(blk.eval()(x).round(decimals=3), dim=0)) == 1


def test_mini_missing_dataset_offline(tmp_path):
    r = _run_mini('--dataset', 'fashion', '--data-dir', str(tmp_path), '--out-dir', str(tmp_path / 'out'),
                  '--device', 'cpu', env=_env())
    assert r.returncode != 0
    assert 'Traceback' not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and 'the download failed' in lines[0], r.stderr
    assert os.path.join(str(tmp_path), 'FashionMNIST', 'raw') in lines[0] and 'train-images-idx3-ubyte' in lines[0]
    assert r.stdout == '', r.stdout  # torchvision's per-mirror chatter silenced
    assert not os.path.exists(str(tmp_path / 'out' / 'log.csv'))
    # files there but corrupt: a label out of 0..9, a truncated image file; in-process, no download
    _write_tiny_mnist(str(tmp_path))
    raw = tmp_path / 'MNIST' / 'raw'
    (raw / 't10k-labels-idx1-ubyte').unlink()  # one of four missing: a download would replace the other three
    try:
        mini_vit.load_data(mini_vit.get_args(['--data-dir', str(tmp_path)]))
        raise AssertionError('a missing idx file accepted')
    except SystemExit as e:
        assert str(e.code).startswith('error:') and 'lacks t10k-labels-idx1-ubyte' in str(e.code), e.code
    for d in (raw.parent, raw):  # the dataset's own folder or its raw/ as --data-dir: a download would land inside
        try:
            mini_vit.load_data(mini_vit.get_args(['--data-dir', str(d)]))
            raise AssertionError(f'--data-dir {d} accepted')
        except SystemExit as e:
            assert 'holds the idx files itself' in str(e.code) and not (d / 'MNIST').exists(), e.code
    mnist = mini_vit.DATASETS['mnist']
    for name, cut in (('t10k-labels-idx1-ubyte', lambda b: b[:-1] + bytes([12])),  # a label past 9, a cut file
                      ('train-images-idx3-ubyte', lambda b: b[:5000]),
                      ('train-labels-idx1-ubyte', lambda b: b[:-1] + bytes([10])),
                      ('train-images-idx3-ubyte', lambda b: struct.pack('>IIII', 2051, 512, 32, 32)  # 32 x 32 images
                       + (b[16:] * 2)[:512 * 32 * 32]),
                      ('t10k-labels-idx1-ubyte', lambda b: struct.pack('>II', 2049, 127) + b[8:-1])):  # 127 labels
        _write_tiny_mnist(str(tmp_path))
        (raw / name).write_bytes(cut((raw / name).read_bytes()))
        try:
            mini_vit.load_data(mini_vit.get_args(['--data-dir', str(tmp_path)]))
            raise AssertionError(f'bad {name} accepted')
        except SystemExit as e:
            assert 'truncated or corrupt' in str(e.code), e.code
    gz = tmp_path / 'gz'  # --data-dir holding only a packed train-images file: no download into it either
    gz.mkdir()
    (gz / 'train-images-idx3-ubyte.gz').write_bytes(b'')

    def half(self):  # a download that stops after the first file: not called truncated files; its chatter unseen
        print('Downloading https://example.com/train-images-idx3-ubyte.gz')  # (older torchvision's)
        os.makedirs(self.raw_folder, exist_ok=True)
        shutil.copy(raw / 'train-images-idx3-ubyte', self.raw_folder)
        raise RuntimeError('Error downloading train-labels-idx1-ubyte.gz:\nTried ...')
    with unittest.mock.patch.object(mnist, 'download', half), contextlib.redirect_stdout(io.StringIO()) as out:
        for d, want in ((gz, 'holds the idx files itself'), (tmp_path / 'half', 'and the download failed (Error '
                                                                'downloading train-labels-idx1-ubyte.gz)')):
            try:
                mini_vit.load_data(mini_vit.get_args(['--data-dir', str(d)]))
                raise AssertionError(f'--data-dir {d} accepted')
            except SystemExit as e:
                assert want in str(e.code), e.code
    assert not (gz / 'MNIST').exists() and out.getvalue() == '', out.getvalue()


def test_mini_bad_flags(tmp_path):
    # the script once end to end, then get_args in-process: each subprocess pays the torch import
    r = _run_mini('--patch-size', '5', '--data-dir', str(tmp_path), '--out-dir', str(tmp_path / 'out'), env=_env())
    assert r.returncode == 2 and 'Traceback' not in r.stderr and '--patch-size 5' in r.stderr.splitlines()[-1]
    bad = [(['--batch-size', '0'], 'batch-size'), (['--epochs', '-1'], 'epochs'), (['--dim', '30', '--heads', '4'],
           'heads'), (['--patch-size', '0'], 'patch-size'), (['--label-smoothing', '1.5'], 'label-smoothing'),
           (['--label-smoothing', 'nan'], 'label-smoothing'), (['--threads', '-1'], 'threads'),
           (['--seed', '-1'], 'seed'), (['--warmup', '1e308'], 'warmup'), (['--translate', '28'], 'translate'),
           (['--rotate', '181'], 'rotate'), (['--scale', '1'], 'scale'),
           (['--mlp-ratio', '0.001'], 'mlp-ratio'), (['--log-every', '-1'], 'log-every'),
           (['--threads', str(10 ** 5)], 'threads'), (['--out-dir', ''], 'out-dir'),  # huge --threads: a segfault
           (['--out-dir', __file__], 'a file, not a folder'), (['--label-smoothing', '1'], 'label-smoothing'),
           (['--drop-path', '1'], 'drop-path'), (['--lr', 'inf'], 'lr'), (['--warmup', '3', '--epochs', '2'], 'warmup'),
           (['--mlp-ratio', str(2 ** 14)], 'mlp-ratio'), (['--seed', str(2 ** 32)], 'seed')]
    if not torch.cuda.is_available():
        bad.append((['--device', 'cuda'], 'CUDA'))
    for flags, word in bad:
        code, line = flag_error(mini_vit.get_args, flags)
        assert code == 2 and 'error' in line and word in line, (flags, line)
    # the ends of the ranges are accepted: 0 for --log-every / --weight-decay, --warmup of all the epochs, ...
    edge = ['--log-every', '0', '--weight-decay', '0', '--epochs', '3', '--warmup', '3', '--rotate', '180',
            '--threads', str(os.cpu_count()), '--seed', str(2 ** 32 - 1), '--translate', '27', '--scale', '0.99',
            '--mlp-ratio', str((2 ** 20 - 1) / 64), '--label-smoothing', '0.99', '--dataset', 'fashion']
    code, line = flag_error(mini_vit.get_args, edge)
    assert code is None, line
    assert mini_vit.get_args(['--dataset', 'fashion']).out_dir == 'out/mini_vit_fashion'
    _write_tiny_mnist(str(tmp_path))  # an --out-dir that cannot be written: a file is in the way
    (tmp_path / 'file').write_text('')
    try:
        mini_vit.main(['--data-dir', str(tmp_path), '--out-dir', str(tmp_path / 'file' / 'out'), '--device', 'cpu'])
        raise AssertionError('wrote under a file')
    except SystemExit as e:
        assert str(e.code).startswith('error: cannot write'), e.code
    try:  # more images in a batch than in the training set: not a run of 0 steps
        mini_vit.main(['--data-dir', str(tmp_path), '--out-dir', str(tmp_path / 'big'), '--batch-size', '513',
                       '--device', 'cpu'])
        raise AssertionError('--batch-size 513 ran on 512 images')
    except SystemExit as e:
        assert str(e.code).startswith('error: --batch-size 513 is larger than the training set (512'), e.code


# ------------------------------------------------------------------------------------------------ vit_cifar.py

CIFAR_TINY = ["--device", "cpu", "--recipe", "full", "--model", "cifar_cpu", "--dim", "32", "--depth", "2", "--heads",
              "2", "--batch-size", "32", "--lr", "5e-3", "--warmup", "0.2", "--log-every", "2", "--threads", "1"]

# crop and flip only: learns in 20 steps
CIFAR_LIGHT = ["--policy", "none", "--mixup", "0", "--cutmix", "0", "--erase", "0"]


def write_cifar10(root, n_train=320, n_test=100, seed=0):
    """The python-version layout: 5 pickled train batches, a test batch, batches.meta. Each class has its own mean
    colour, so a tiny model learns it within two epochs."""
    import numpy as np
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)

    def batch(n):
        y = rng.integers(0, 10, n)
        x = np.clip((y[:, None] * 25 + 10) + rng.normal(0, 10, (n, 3072)), 0, 255).astype(np.uint8)
        return {"data": x, "labels": y.tolist()}

    for i in range(5):
        with open(os.path.join(d, f"data_batch_{i + 1}"), "wb") as f:
            pickle.dump(batch(n_train // 5), f)
    with open(os.path.join(d, "test_batch"), "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(os.path.join(d, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)
    return str(root)


def run_cifar(*args, ok=True):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, os.path.join(HERE, "vit_cifar.py"), *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=300)
    if ok:
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


def check_error(p, *words):
    """A clear failure: non-zero exit, one 'error:' line naming the problem, no traceback."""
    assert p.returncode != 0, p.stdout[-1000:]
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines and "error" in lines[-1], p.stderr
    for w in words:
        assert w in lines[-1], (w, lines[-1])


def test_cifar_train_files_eval_predict(tmp_path):
    data, out = write_cifar10(tmp_path / "data"), tmp_path / "out"
    run_cifar("--data-dir", data, "--out-dir", out, "--epochs", 2, *CIFAR_TINY, *CIFAR_LIGHT)
    for f in ("ckpt.pt", "log.csv", "log.txt", "args.json", "attention.png"):
        assert (out / f).is_file(), f
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["epoch", "train_loss", "test_loss", "test_acc", "lr", "img_per_s", "elapsed_s"]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[1]["train_loss"]) < float(rows[0]["train_loss"])
    assert float(rows[1]["test_acc"]) > 20  # 10 classes: chance is 10%
    log = (out / "log.txt").read_text()
    assert "img/s" in log and "eta" in log and "final model with test-time flip" in log
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["batch"] == 0 and ck["step"] == 20 and ck["ema"] is not None
    # the lr of each epoch's last step: --warmup 0.2 epochs = 2 of the 10 steps, then cosine over the 20
    assert [float(r["lr"]) for r in rows] == [float(f"{common.lr_at(s, 20, 5e-3, 2):.3e}") for s in (9, 19)], rows
    # a fresh run into the same out-dir must not clobber it
    check_error(run_cifar("--data-dir", data, "--out-dir", out, "--epochs", 2, *CIFAR_TINY, ok=False), "--resume")
    p = run_cifar("--eval-only", "--resume", out / "ckpt.pt", "--data-dir", data)
    lines = {ln.split(" | ")[0]: ln for ln in p.stdout.splitlines() if " | test loss " in ln}
    assert set(lines) >= {"model", "ema"} and lines["model"][5:] != lines["ema"][3:], p.stdout  # two sets of weights
    # the run's final line agrees with eval-only's flip numbers: the same weights, the same evaluation
    flip = lines["model"].split("with flip: loss ")[1].split()[0]
    assert f"final model with test-time flip | test loss {flip} " in log, (flip, log[-400:])
    from torchvision.io import write_png
    img = tmp_path / "red.png"
    write_png(torch.tensor([200, 30, 30], dtype=torch.uint8).view(3, 1, 1).expand(3, 20, 24).contiguous(), str(img))
    ck = torch.load(out / "ckpt.pt", weights_only=True)  # --predict uses the EMA's weights
    ck["ema"]["head.bias"][3] = 100.0
    torch.save(ck, out / "ckpt.pt")
    p = run_cifar("--predict", img, "--out-dir", out)  # the default checkpoint is <out-dir>/ckpt.pt
    assert p.stdout.startswith(f"{img}: cat 100.0%") and p.stdout.count("%") == 5, p.stdout
    # <out-dir>/ckpt.pt is --eval-only's default checkpoint too, without --resume
    assert vit_cifar.get_args(["--eval-only", "--out-dir", str(out)]).ckpt == str(out / "ckpt.pt")
    check_error(run_cifar("--predict", tmp_path / "nope.png", "--out-dir", out, ok=False), "nope.png")
    # the printed classes are those of the mean logits of each image and its mirror image (large random EMA weights
    # and a noise image, so that the plain logits would print another line)
    noise = tmp_path / "noise.png"
    (tmp_path / "r").mkdir()
    write_png(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
              str(noise))
    m = randomize(ViT(num_classes=10, **ck["args"]["arch"]), std=0.3).eval()
    torch.save({**ck, "ema": m.state_dict()}, tmp_path / "r" / "ckpt.pt")
    x = (common.read_image(str(noise), 32)[None] - torch.tensor(ck["args"]["mean"]).view(1, 3, 1, 1)) / \
        torch.tensor(ck["args"]["std"]).view(1, 3, 1, 1)
    want = {}
    for k, logits in (("plain", m(x)), ("flip", (m(x) + m(x.flip(-1))) / 2)):
        with contextlib.redirect_stdout(io.StringIO()) as o, torch.no_grad():
            common.print_top5(logits.detach(), [str(noise)], ck["classes"])
        want[k] = o.getvalue()
    p = run_cifar("--predict", noise, "--resume", tmp_path / "r" / "ckpt.pt")
    assert want["plain"] != want["flip"] and p.stdout == want["flip"], (p.stdout, want)


def test_cifar_exact_resume_after_sigterm(tmp_path):
    """--epochs 2 straight == the same run killed (SIGTERM, at step 15 of 20) in epoch 2 and resumed."""
    data = write_cifar10(tmp_path / "data")
    # every random draw: policy, erasing, MixUp/CutMix (off by default), drop-path; EMA. Chunks of 3 batches, as on
    # CUDA: the stop falls inside one (batch 5 of 10), so the resumed run must draw that chunk again
    base = ["--data-dir", data, "--epochs", 2, *CIFAR_TINY, "--drop-path", "0.1", "--aug-chunk", 3, "--mixup", 0.8,
            "--cutmix", 1.0, "--optimizer", "muon"]  # Muon's and AdamW's states both go through ckpt.pt
    run_cifar(*base, "--out-dir", tmp_path / "a")
    p = run_cifar(*base, "--out-dir", tmp_path / "b", "--interrupt-at", 15, ok=False)
    assert p.returncode == 130 and "resume with: python" in p.stdout and "--interrupt-at" not in p.stdout.split(
        "resume with:")[1], p.stdout + p.stderr
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 15
    run_cifar(*base, "--out-dir", tmp_path / "b", "--resume", tmp_path / "b" / "ckpt.pt")
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    for k in ("model", "ema"):
        assert a[k].keys() == b[k].keys() and all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
    assert a["step"] == b["step"] == 20 and a["ema_n"] == b["ema_n"] == 20  # the EMA's count goes on too
    rows = {}
    for d in "ab":  # the same rows: epoch 2's train loss counts the steps before the stop too
        with open(tmp_path / d / "log.csv") as f:
            rows[d] = [(r["epoch"], r["train_loss"], r["test_loss"], r["test_acc"], r["lr"]) for r in csv.DictReader(f)]
    assert [r[0] for r in rows["b"]] == ["1", "2"] and rows["a"] == rows["b"], rows
    # a stop at an epoch's last step (10 of 10) resumes into that epoch's end: its test, log row and save
    run_cifar(*base, "--out-dir", tmp_path / "c", "--interrupt-at", 10, ok=False)
    c = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)
    torch.save({**c, "elapsed": 1e5}, tmp_path / "c" / "ckpt.pt")  # the time before the stop counts on: elapsed_s
    run_cifar(*base, "--out-dir", tmp_path / "c", "--resume", tmp_path / "c" / "ckpt.pt")
    c = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)
    assert c["step"] == 20 and all(torch.equal(a["model"][n], c["model"][n]) for n in a["model"])
    with open(tmp_path / "c" / "log.csv") as f:
        rows_c = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows_c] == ["1", "2"] and 1e5 <= float(rows_c[0]["elapsed_s"]) < 1e5 + 300, rows_c
    # the straight run's rows: epoch 1's lr is that of its last step, taken before the stop; no img/s (no step since)
    assert [(r["epoch"], r["train_loss"], r["test_loss"], r["test_acc"], r["lr"]) for r in rows_c] == rows["a"], rows_c
    assert rows_c[0]["img_per_s"] == "" and float(rows_c[1]["img_per_s"]) > 0, rows_c
    # a flag given again wins (--weight-decay too, which the optimizer's saved state held); --epochs may not end
    # before the checkpoint's step; another run's log.csv in --out-dir stays; a checkpoint made on another device
    run_cifar("--resume", tmp_path / "c" / "ckpt.pt", "--epochs", 3, "--weight-decay", 0.5)
    groups = torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["optimizer"][0]["param_groups"]
    assert sorted({g["weight_decay"] for g in groups}) == [0.0, 0.5], groups
    check_error(run_cifar("--resume", tmp_path / "b" / "ckpt.pt", "--epochs", 1, ok=False), "--epochs 1 ends before")
    (tmp_path / "d").mkdir()
    shutil.copy(tmp_path / "a" / "log.csv", tmp_path / "d" / "log.csv")
    check_error(run_cifar("--resume", tmp_path / "b" / "ckpt.pt", "--out-dir", tmp_path / "d", "--epochs", 3,
                          ok=False), "holds an earlier run's rows")
    for text, ok in ((b"epoch,train_loss,test_loss,test_acc,lr\n\n", True), (b"my,epoch,results\n", False),
                     (b"epoch,x\n", False), (b"a\xff\xfe\n", False)):  # a header of ours alone may go, not a user's
        (tmp_path / "d" / "log.csv").write_bytes(text)
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                common.check_out_dir(str(tmp_path / "d"))
            except SystemExit:
                pass
        assert ("another file" not in err.getvalue()) == ok, (text, err.getvalue())
    ck = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    ck["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
    torch.save(ck, tmp_path / "d" / "gpu.pt")
    check_error(run_cifar("--resume", tmp_path / "d" / "gpu.pt", "--out-dir", tmp_path / "e", "--epochs", 3,
                          ok=False), "made on cuda")
    # what a checkpoint fixes (dataset, model, batch size, seed, the optimizer's set-up), and shape flags beside
    # --pretrained (the weights fix the shape); another run's ckpt.pt in --out-dir; other data
    for flags, word in ((["--pretrained", "w.pth", "--dim", "64"], "comes from the weights"),
                        (["--freeze"], "needs --pretrained")):
        code, line = flag_error(vit_cifar.get_args, flags)
        assert code == 2 and word in line, (flags, line)
    for flags, word in ((["--batch-size", "16"], "--batch-size 16"), (["--dataset", "cifar100"], "cifar100"),
                        (["--dim", "64"], "--dim 64"), (["--optimizer", "adamw"], "--optimizer adamw"),
                        (["--seed", "3"], "--seed 3"), (["--layer-decay", "0.7"], "--layer-decay 0.7"),
                        (["--weight-decay", "0"], "--weight-decay 0")):  # 0 merges the optimizer's groups
        code, line = flag_error(vit_cifar.get_args, ["--resume", str(tmp_path / "b" / "ckpt.pt"), *flags])
        assert code == 2 and word in line and "keeps its dataset" in line, (flags, line)
    for flags in (["--img-size", "0"], ["--mlp-ratio", "2"], ["--log-every", "1" + "0" * 400]):  # these match or fit
        assert flag_error(vit_cifar.get_args, ["--resume", str(tmp_path / "b" / "ckpt.pt"), *flags])[0] is None, flags
    check_error(run_cifar("--resume", tmp_path / "b" / "ckpt.pt", "--out-dir", tmp_path / "a", "--epochs", 3,
                          ok=False), "exists")
    write_cifar10(tmp_path / "data2", n_train=160)
    check_error(run_cifar("--resume", tmp_path / "b" / "ckpt.pt", "--data-dir", tmp_path / "data2", "--epochs", 3,
                          ok=False), "cannot resume", "320 training images")
    with open(tmp_path / "data2" / "cifar-10-batches-py" / "batches.meta", "wb") as f:  # other class names
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    check_error(run_cifar("--eval-only", "--resume", tmp_path / "b" / "ckpt.pt", "--data-dir", tmp_path / "data2",
                          ok=False), "the checkpoint's model 10 (airplane")


def test_cifar_clear_errors(tmp_path):
    data, out = write_cifar10(tmp_path / "data", n_train=80, n_test=20), tmp_path / "out"
    base = ["--data-dir", data, "--out-dir", out, "--epochs", 1, *CIFAR_TINY]
    # the flag checks in-process: they run before anything else
    x = torch.zeros(256, 3, 32, 32, dtype=torch.uint8)  # augment() flips about half of the images: dark left half
    x[..., 16:] = 255
    a = vit_cifar.augment(x, torch.Generator().manual_seed(0), argparse.Namespace(policy="none", erase=0),
                          torch.zeros(1, 3, 1, 1))
    assert 0.3 < (a[..., :16].mean((1, 2, 3)) > a[..., 16:].mean((1, 2, 3))).float().mean() < 0.7
    x = torch.zeros(512, 3, 32, 32, dtype=torch.uint8)  # one bright pixel: the padded crop moves it 4 px at most
    x[..., 16, 16] = 255
    a = vit_cifar.augment(x, torch.Generator().manual_seed(0), argparse.Namespace(policy="none", erase=0),
                          torch.zeros(1, 3, 1, 1))
    at = a[:, 0].flatten(1).argmax(1)
    dy, dx = at // 32 - 16, at % 32 - 16  # a flip puts column 16 at 15: dx in -5..4
    assert (a[:, 0] > 0.5).flatten(1).sum(1).eq(1).all() and set(dy.tolist()) == set(range(-4, 5))
    assert dx.min() == -5 and dx.max() == 4, (dy, dx)
    for flags, word in ((["--batch-size", "0"], "--batch-size"), (["--patch", "5"], "--patch 5"),
                        (["--epochs", "-1"], "--epochs"), (["--lr", "0"], "--lr"),
                        (["--layer-decay", "0"], "--layer-decay"), (["--img-size", "-8"], "--img-size"),
                        (["--aug-chunk", "-1"], "--aug-chunk"), (["--heads", "0"], "--heads"),
                        (["--clip-grad", "-1"], "--clip-grad"), (["--warmup", "inf"], "--warmup"),
                        (["--pretrained", "vit_b_16", "--predict", "a.png"], "--resume CKPT"),
                        (["--compile", "fast"], "--compile"), (["--seed", "-1"], "--seed"),
                        (["--seed", str(2 ** 32)], "--seed"), (["--epochs", "2", "--warmup", "3"], "--warmup 3"),
                        (["--device", "cpu", "--dim", "128"], "--heads 3 (the CPU recipe's)"),
                        (["--recipe", "full", "--dim", "100"], "--heads 6 (the cifar_s preset's)"),
                        (["--recipe", "full", "--heads", "5"], "--dim 384 (the cifar_s preset's) is not divisible by "
                                                               "--heads 5: give --dim too")):
        code, line = flag_error(vit_cifar.get_args, ["--data-dir", data, *flags])
        assert code == 2 and word in line, (flags, line)
    # --compile alone keeps its meaning (torch.compile's default mode); a mode may follow it
    assert [vit_cifar.get_args(f).compile for f in ([], ["--compile"], ["--compile", "reduce-overhead"])] == \
        [None, "default", "reduce-overhead"]
    # on a CPU the CPU recipe fills the flags not given; --recipe full keeps the defaults of --help
    a = vit_cifar.get_args(["--device", "cpu", "--epochs", "3", "--heads", "4"])
    assert (a.recipe, a.model, a.dim, a.depth, a.heads, a.epochs, a.optimizer, a.ema) == \
        ("cpu", "cifar_cpu", 96, 4, 4, 3, "muon", 0.0)
    a = vit_cifar.get_args(["--device", "cpu", "--model", "cifar_ti"])  # a preset given keeps its own sizes
    assert (a.model, a.dim, a.heads, a.depth, a.epochs) == ("cifar_ti", None, None, None, 11)
    a = vit_cifar.get_args(["--device", "cpu", "--recipe", "full"])
    assert (a.recipe, a.model, a.dim, a.epochs, a.optimizer, a.ema) == ("full", "cifar_s", None, 100, "adamw", 0.999)
    check_error(run_cifar(*base, "--heads", 3, ok=False), "heads")  # dim 32 is not divisible by 3 heads
    check_error(run_cifar(*base, "--batch-size", 500, ok=False), "--batch-size 500")
    # missing data: torchvision tries to download, which fails offline (or, here, is made to fail)
    env_off = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    p = subprocess.run([sys.executable, os.path.join(HERE, "vit_cifar.py"), "--data-dir", str(tmp_path / "empty"),
                        "--out-dir", str(out), "--epochs", "1", *CIFAR_TINY], capture_output=True, text=True,
                       env=env_off,
                       timeout=300)
    check_error(p, "cifar-10-batches-py", "data_batch_1")
    # Ctrl-C before training (here while the data loads): one line and exit 130, no traceback
    code = ("import runpy, sys, common; sys.argv = sys.argv[1:]\n"
            "def boom(*a): raise KeyboardInterrupt\n"
            "common.pick_device = boom\nrunpy.run_path(sys.argv[0], run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code, os.path.join(HERE, "vit_cifar.py"), *map(str, base)],
                       capture_output=True, text=True, cwd=HERE, timeout=300)
    assert p.returncode == 130 and "interrupted" in p.stderr and "Traceback" not in p.stderr, p.stderr
    # --data-dir at the batches folder itself: a download would land inside it
    check_error(run_cifar(*base, "--data-dir", os.path.join(data, "cifar-10-batches-py"), ok=False),
                "the batches folder itself")
    # a truncated batch
    with open(os.path.join(data, "cifar-10-batches-py", "data_batch_3"), "r+b") as f:
        f.truncate(1000)
    check_error(run_cifar(*base, ok=False), "data_batch_3")
    # wrong-shape images in a batch
    with open(os.path.join(data, "cifar-10-batches-py", "data_batch_3"), "wb") as f:
        pickle.dump({"data": torch.zeros(16, 1024, dtype=torch.uint8).numpy(), "labels": [0] * 16}, f)
    check_error(run_cifar(*base, ok=False), "data_batch_3")
    # floats in [0, 1] (a hand-made batch): uint8 is required, as a cast would make them zeros
    with open(os.path.join(data, "cifar-10-batches-py", "data_batch_3"), "wb") as f:
        pickle.dump({"data": torch.rand(16, 3072).numpy(), "labels": [0] * 16}, f)
    check_error(run_cifar(*base, ok=False), "data_batch_3", "float32, not uint8")
    # corrupt and mismatched checkpoints
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    check_error(run_cifar("--eval-only", "--resume", bad, ok=False), "bad.pt")
    check_error(run_cifar("--resume", tmp_path / "missing.pt", ok=False), "missing.pt")
    torch.save({"model": {"w": torch.zeros(1)}, "args": {"dataset": "cifar10"}, "classes": ["a"]}, bad)
    check_error(run_cifar("--eval-only", "--resume", bad, "--data-dir", data, ok=False), "does not fit")
    torch.save({"model": {}, "args": {"data_dir": data, "depth": 0}, "classes": ["a"]}, bad)  # vit_imagenet.py's
    check_error(run_cifar("--eval-only", "--resume", bad, ok=False), "not one of vit_cifar.py", "--pretrained")
    torch.save({"model": {}, "args": None, "classes": None}, bad)
    check_error(run_cifar("--eval-only", "--resume", bad, ok=False), "no args dict")
    # a diverging run stops at the next log line, before any checkpoint takes NaN weights
    write_cifar10(tmp_path / "data", n_train=80, n_test=20)
    check_error(run_cifar(*base, "--out-dir", tmp_path / "nan", "--lr", "1e30", "--warmup", 0, ok=False),
                "loss became nan", "lower --lr")
    assert not (tmp_path / "nan" / "ckpt.pt").exists()


def test_cifar_flags_recipe_presets_resume_in_process(tmp_path):
    """get_args alone, no data, no training: which recipe fills the flags not given (--flag=value counts as given),
    presets against size flags, the bounds, --pretrained's recipe and shape flags, and what --resume takes from a
    checkpoint (a forged one: get_args reads only its args)."""

    def get(*argv, cuda=False):
        with unittest.mock.patch.object(torch.cuda, "is_available", return_value=cuda), \
                contextlib.redirect_stdout(io.StringIO()):  # the recipe's note
            return vit_cifar.get_args(list(map(str, argv)))
    a = get("--device", "cpu", "--epochs=3", "--batch-size=16", "--model", "cifar_ti")
    assert (a.recipe, a.epochs, a.batch_size, a.model, a.dim, a.lr) == ("cpu", 3, 16, "cifar_ti", None, 2e-3), a
    a = get()  # no GPU: the CPU recipe of the README (0.31M params)
    assert (a.recipe, a.model, a.dim, a.heads, a.depth, a.epochs, a.batch_size, a.optimizer) == \
        ("cpu", "cifar_cpu", 96, 3, 4, 11, 64, "muon"), a
    for argv, cuda, recipe in (([], True, "auto"), (["--device", "cpu"], True, "cpu"),
                               (["--recipe", "cpu"], True, "cpu"), (["--recipe", "full"], False, "full")):
        a = get(*argv, cuda=cuda)
        assert (a.recipe, a.epochs) == (recipe, 11 if recipe == "cpu" else 100), (argv, cuda, a)
    for flags in (["--recipe", "full", "--epochs", "5"], ["--threads", str(os.cpu_count())]):  # on the bounds
        assert flag_error(vit_cifar.get_args, flags)[0] is None, flags
    for flags, word in ((["--epochs", "0"], "--epochs must be > 0"), (["--ema", "1"], "--ema must be < 1"),
                        (["--lr", "inf"], "--lr must be finite"), (["--recipe", "full", "--epochs", "4"], "--warmup 5"),
                        (["--device", "cpu", "--model", "cifar_ti", "--dim", "100"], "(the cifar_ti preset's)"),
                        *(([f, v, "--pretrained", "w.pth"], f"{f}: with --pretrained the model's shape") for f, v in
                          (("--model", "cifar_ti"), ("--patch", "8"), ("--dim", "64"), ("--depth", "2"),
                           ("--mlp-ratio", "2"), ("--pool", "cls"), ("--pos-embed", "learn")))):
        code, line = flag_error(vit_cifar.get_args, flags)
        assert code == 2 and word in line, (flags, line)
    # --pretrained: its recipe for the flags not given, --freeze's lr unless given; --eval-only reads no ckpt.pt
    a = get("--pretrained", "w.pth", "--epochs", 2)
    assert (a.epochs, a.batch_size, a.lr, a.warmup, a.drop_path, a.optimizer, a.ckpt) == (2, 128, 1e-4, 1, 0.1, "adamw",
                                                                                          None), a
    assert (get("--pretrained", "w.pth", "--freeze").lr, get("--pretrained", "w.pth", "--freeze", "--lr", 5e-4).lr) == \
        (1e-3, 5e-4)
    assert get("--eval-only", "--pretrained", "w.pth", "--out-dir", tmp_path).ckpt is None
    cwd = os.getcwd()
    os.chdir(tmp_path)  # --eval-only's default checkpoint: runs/<dataset>/ckpt.pt, none here
    try:
        code, line = flag_error(vit_cifar.get_args, ["--eval-only", "--dataset", "cifar100"])
    finally:
        os.chdir(cwd)
    assert code == 2 and os.path.join("runs", "cifar100", "ckpt.pt") + " not found" in line, line
    # --resume: the run's args, flags given again win, its folder is the out-dir (not the one saved); what it fixes
    saved = vars(get("--device", "cpu", "--weight-decay", 0, "--out-dir", tmp_path / "elsewhere"))  # 0: one group
    saved["arch"] = dict(img_size=32, patch_size=4, dim=96, depth=4, heads=3, mlp_ratio=2.0, pool="mean",
                         pos_embed="sincos")
    ck = tmp_path / "run" / "ckpt.pt"
    ck.parent.mkdir()
    torch.save({"model": {}, "args": saved, "classes": [str(i) for i in range(10)]}, ck)
    a = get("--resume", ck, "--epochs", 20, "--eval-every", 2)
    assert (a.out_dir, a.epochs, a.eval_every, a.lr, a.weight_decay) == (str(ck.parent), 20, 2, 2e-3, 0), a
    assert get("--resume", ck, "--pretrained", "w.pth", "--dim", 96).pretrained is None  # the checkpoint wins
    for flags, word in ((["--weight-decay", "0.05"], "--weight-decay 0.05"), (["--pool", "cls"], "--pool cls"),
                        (["--pos-embed", "learn"], "--pos-embed learn"), (["--freeze"], "--freeze True")):
        code, line = flag_error(vit_cifar.get_args, ["--resume", str(ck), *flags])
        assert code == 2 and word in line and "keeps its dataset" in line, (flags, line)


CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))  # the published mean and std per channel


def _cifar_main(*argv, patches=()):
    """vit_cifar.main() in this process (a fraction of a subprocess's time), inside patches (context managers, e.g.
    spies): (its exit code, None when it returned; stdout; stderr)."""
    with contextlib.ExitStack() as stack:
        command_line = unittest.mock.patch.object(sys, "argv", ["vit_cifar.py", *map(str, argv)])
        for p in (command_line, kept_signals_and_threads(), *patches):
            stack.enter_context(p)
        out, err = (stack.enter_context(r(io.StringIO())) for r in (contextlib.redirect_stdout,
                                                                    contextlib.redirect_stderr))
        try:
            vit_cifar.main()
            code = None
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _cifar_batches(root, *names):
    """The pickled python batches of a write_cifar10() tree, as written."""
    found = []
    for name in names:
        with open(os.path.join(root, "cifar-10-batches-py", name), "rb") as f:
            found.append(pickle.load(f))
    return found


def _augmented(x, op=None, seed=0, erase=0.0, mean=(0.0, 0.0, 0.0)):
    """vit_cifar.augment of uint8 images x, erasing off unless asked. op None: --policy none (crop and flip only); else
    the policy with every sample's op pinned to op through augment's own draw of it (torch.randint(0, 13)), so that one
    op's maths shows over the whole range of its random magnitude."""
    args, randint = argparse.Namespace(policy="none" if op is None else "trivial", erase=erase), torch.randint

    def pinned(*a, **k):
        return torch.full(a[2], op, dtype=torch.long) if a[:2] == (0, 13) else randint(*a, **k)
    with unittest.mock.patch.object(torch, "randint", pinned):
        return vit_cifar.augment(x, torch.Generator().manual_seed(seed), args, torch.tensor(mean).view(1, 3, 1, 1))


def _slopes(bright, dim):
    """Per (32, 32) mask of a batch, the least-squares slope of its mean row in each column against the column (dim 1:
    a horizontal bar's tilt), or of its mean column in each row against the row (dim 2: an upright bar's lean)."""
    m, ar = (bright if dim == 1 else bright.transpose(1, 2)).float(), torch.arange(32.0)
    n = m.sum(1)
    used, k = n > 0, (n > 0).sum(1)  # the columns (rows) the bar reaches
    centre = (m * ar[:, None]).sum(1) / n.clamp_min(1)  # (B, 32): the mean row (column) in each
    cu, cc = torch.where(used, ar, 0.0).sum(1) / k, torch.where(used, centre, 0.0).sum(1) / k
    du = torch.where(used, ar - cu[:, None], 0.0)
    return (du * (centre - cc[:, None])).sum(1) / (du * du).sum(1)


def test_cifar_load_cifar_both_datasets_download_and_bad_labels(tmp_path):
    """load_cifar: each row of a batch is an image of R, G, B planes of 32 x 32, the train batches in their order;
    CIFAR-100's fine labels and class names (not the coarse ones) and its own statistics in a run; a missing dataset is
    downloaded through torchvision's class of that dataset into --data-dir; labels that do not fit their images or the
    classes: one line naming the batch."""
    import numpy as np
    root = write_cifar10(tmp_path / "c10", n_train=50, n_test=10)
    raw = _cifar_batches(root, *[f"data_batch_{i}" for i in range(1, 6)], "test_batch")
    data, classes = vit_cifar.load_cifar("cifar10", root)
    assert classes[:3] == ["airplane", "automobile", "bird"] and len(classes) == 10, classes
    for split, bs in (("train", raw[:5]), ("test", raw[5:])):
        x, y = data[split]
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.uint8, x.shape
        assert torch.equal(x.reshape(len(x), -1), torch.from_numpy(np.concatenate([b["data"] for b in bs]))), split
        assert torch.equal(y, torch.tensor(sum((b["labels"] for b in bs), []))), split
    for labels in ([0] * 9, [-1] + [0] * 9, [10] + [0] * 9):  # one short; below 0; past the 10 classes
        with open(os.path.join(root, "cifar-10-batches-py", "data_batch_2"), "wb") as f:
            pickle.dump({"data": raw[1]["data"], "labels": labels}, f)
        code, line = flag_error(lambda r: vit_cifar.load_cifar("cifar10", r), root)
        assert code == 2 and "data_batch_2" in line and "N labels < 10" in line, (labels, line)
    g, c100 = np.random.default_rng(0), str(tmp_path / "c100")

    def download(where, download):  # torchvision's CIFAR100(root, download=True), offline
        d = os.path.join(where, "cifar-100-python")
        os.makedirs(d)
        for name, n in (("train", 32), ("test", 8)):
            with open(os.path.join(d, name), "wb") as f:
                pickle.dump({"data": g.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels":
                             list(range(99, 99 - n, -1)), "coarse_labels": [19] * n}, f)
        with open(os.path.join(d, "meta"), "wb") as f:
            pickle.dump({"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": ["c"] * 20}, f)
    import torchvision.datasets as tvd
    with unittest.mock.patch.object(tvd, "CIFAR100", side_effect=download) as c, \
            unittest.mock.patch.object(tvd, "CIFAR10") as c10:
        code, _, err = _cifar_main("--dataset", "cifar100", "--data-dir", c100, "--out-dir", tmp_path / "o", "--epochs",
                                   1, *CIFAR_TINY, *CIFAR_LIGHT, "--batch-size", 16, "--depth", 1)
    assert code is None and c.call_args_list == [unittest.mock.call(c100, download=True)] and not c10.called, err
    data, classes = vit_cifar.load_cifar("cifar100", c100)
    assert classes == [f"f{i}" for i in range(100)] and data["train"][1].tolist() == list(range(99, 67, -1))
    args = json.loads((tmp_path / "o" / "args.json").read_text())
    assert (args["mean"], args["std"]) == ([0.5071, 0.4865, 0.4409], [0.2673, 0.2564, 0.2762]), args
    assert torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)["model"]["head.bias"].shape == (100,)


def test_cifar_augment_geometric_ops_per_sample():
    """The crop, flip and 5 geometric ops of the policy, each pinned for a batch: nearest-pixel resampling (no new
    values), reflection at the borders (a uniform image stays uniform), areas kept (rotation and shear are rigid or
    area-preserving), and each op's range: rotation up to 30 degrees either way, shear up to 0.3 (one op along x, one
    along y), translation up to 8 px (one op across, one down) on top of the +-4 px crop."""
    n, axis = 128, {}  # axis: for the shears and translations, which of (y, x) each op moves along
    x = torch.zeros(4, n, 3, 32, 32, dtype=torch.uint8)  # a 4 x 20 horizontal bar, a vertical one, a dot, all white
    x[0, :, :, 14:18, 6:26] = x[1, :, :, 6:26, 14:18] = x[2, ..., 16, 16] = x[3] = 255
    for op in [None] + list(range(6)):  # none, identity, shear, shear, translate, translate, rotate
        kinds = 1 if op == 5 else 2 if op in (1, 2) else 3  # the bar, the upright one, the dot
        a = _augmented(torch.cat([x[:kinds].flatten(0, 1), x[3, :8]]), op)
        assert torch.equal(a[-8:], torch.ones(8, 3, 32, 32)), op  # 255 -> exactly 1, and no border
        assert ((a[:-8] == 0) | (a[:-8] == 1)).all(), op  # whole pixels moved, none blended
        bar = a[:n, 0] > 0.5
        assert (bar.sum((1, 2)) - 80).abs().max() <= 12, (op, bar.sum((1, 2)))
        if op == 5:  # rotate: the bar's tilt up to tan(30 degrees) = 0.577, either way
            tilt = _slopes(bar, 1)
            assert 0.52 < tilt.abs().max() < 0.62 and (tilt > 0.2).any() and (tilt < -0.2).any(), op
            continue
        bent = [_slopes(bar, 1).abs().max(), _slopes(a[n:2 * n, 0] > 0.5, 2).abs().max()]  # (a shear along y, x)
        if op in (1, 2):  # one bar sheared up to 0.3, the other one straight (but for its slanted ends)
            assert min(bent) < 0.05 and 0.26 < max(bent) < 0.34, (op, bent)
            axis[op] = int(bent[1] > bent[0])
            continue
        assert max(bent) < 0.05, (op, bent)
        at = a[2 * n:3 * n, 0].flatten(1).argmax(1)  # the dot: the crop's +-4 px (a flip puts column 16 at 15)
        moved = [(at // 32 - 16).abs().max().item(), (at % 32 - 15.5).abs().max().item() - 0.5]  # (y, x)
        if op in (None, 0):
            assert moved == [4, 4], (op, moved)
        else:  # and the translation's 8 px more along one axis
            assert min(moved) == 4 and 10 <= max(moved) <= 12, (op, moved)
            axis[op] = int(moved[1] > moved[0])
    assert axis[1] != axis[2] and axis[3] != axis[4], axis


def test_cifar_augment_colour_ops_per_sample():
    """The policy's 7 colour ops, each pinned for a batch of 128, on images that show its maths: a factor 1 + 0.9 m
    (m uniform in -1..1) for brightness, saturation (luminance kept), contrast (the mean kept) and sharpness (PIL's
    SMOOTH kernel); posterize to 2..8 bits; solarize above a uniform threshold; per-channel autocontrast; results
    clamped to [0, 1]. Then the op drawn per sample, 1/13 each: autocontrast's mark on 1/13 of an unpinned batch."""
    n, v = 128, lambda *c: torch.tensor(c, dtype=torch.uint8).view(1, -1, 1, 1).expand(n, -1, 32, 32)

    def factors(f):  # the factor of every sample: within (0.1, 1.9), and near both ends and 1 in a batch of 128
        assert f.min() > 0.1 - 1e-4 and f.max() < 1.9 + 1e-4 and f.min() < 0.2 and f.max() > 1.8, (f.min(), f.max())
        assert 0.3 < (f < 1).float().mean() < 0.7, f
    a = _augmented(torch.cat([v(100, 100, 100), v(200, 200, 200)]), 6)  # brightness: x * f, clamped at 1
    factors(a[:n, :, 5, 5].flatten() * 2.55)
    assert a[n:].max() == 1 and (a[n:] == 1).any() and torch.equal(a.flatten(2).amin(2), a.flatten(2).amax(2))
    c = torch.tensor([150.0, 120.0, 100.0]) / 255  # saturation: the grey (luminance) stays, the colour moves by f
    lum = torch.tensor([0.299, 0.587, 0.114])
    a = _augmented(v(150, 120, 100), 7)[:, :, 0, 0]
    assert torch.allclose(a @ lum, (c @ lum).expand(n), atol=1e-5), a @ lum
    f = (a - c @ lum) / (c - c @ lum)
    assert torch.allclose(f, f[:, :1].expand(-1, 3), atol=1e-4), f
    factors(f[:, 0])
    x = v(80, 80, 80).clone()  # contrast: two greys; their gap times f, the image's mean grey kept
    x[:, :, :, 16:] = 160
    a = _augmented(x, 8)[:, 0]
    lo, hi = a.flatten(1).amin(1), a.flatten(1).amax(1)
    f = (hi - lo) * 255 / 80
    factors(f)
    share = (a == hi[:, None, None]).float().mean((1, 2))  # the bright half's share after the crop
    assert torch.allclose(a.mean((1, 2)), (80 + 80 * share) / 255, atol=1e-5) and (share != 0.5).any()
    x = v(100, 100, 100).clone()  # sharpness: one brighter pixel (+50); blur + f * (x - blur), blur = SMOOTH
    x[..., 16, 16] = 150
    a = _augmented(x, 9)[:, 0] * 255 - 100
    at = a.flatten(1).argmax(1)
    centre, side = a.flatten(1).amax(1), a[torch.arange(n), at // 32, at % 32 - 1]
    assert torch.allclose(centre + 8 * side, torch.full((n,), 50.0), atol=1e-3), centre + 8 * side  # sum kept
    factors((centre * 13 / 50 - 5) / 8)  # centre 50 (5 + 8 f) / 13, each of its 8 neighbours 50 (1 - f) / 13
    a = _augmented(v(255, 255, 255), 10)[:, 0, 0, 0] * 255  # posterize: 255 keeps its top 2..8 bits
    assert set(a.round().tolist()) == {192, 224, 240, 248, 252, 254, 255}, a.unique()
    x = v(204, 204, 204).clone()  # solarize: 0.2 in a quarter, 0.8 elsewhere; at or above a threshold, uniform in
    x[:, :, :16, :16] = 51  # 0..1, a pixel is inverted: neither (p 0.2), the 0.8 ones (0.6), or both (0.2)
    a = _augmented(x, 11)[:, 0]
    low = (a - 0.2).abs() < 1e-6
    assert low.logical_or((a - 0.8).abs() < 1e-6).all()
    share = low.float().mean((1, 2))  # of 0.2: the quarter's share after the crop (< 0.5), all, or 1 - that share
    neither, light, both = share < 0.5, share == 1, (share > 0.5) & (share < 1)
    assert all(0.1 < k.float().mean() < 0.3 for k in (neither, both)) and 0.5 < light.float().mean() < 0.7, share
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randint(lo, lo + k, (n, 32, 32), generator=g) for lo, k in ((100, 11), (30, 31), (200, 2))],
                    1).to(torch.uint8)
    a = _augmented(x, 12)  # autocontrast: each channel (none flat) stretched to 0..1; R's 11 values to tenths
    assert (a.amin((2, 3)) == 0).all() and (a.amax((2, 3)) == 1).all()
    assert torch.allclose(a[:, 0] * 10, (a[:, 0] * 10).round(), atol=1e-5)
    flat = x.clone()
    flat[:, 1] = 77  # a flat channel stays as it is (PIL's and torchvision's autocontrast), not black
    assert torch.equal(_augmented(flat, 12)[:, 1], torch.full((n, 32, 32), 77 / 255))
    args = argparse.Namespace(policy="trivial", erase=0.0)  # unpinned: only autocontrast spans 0..1 in R here
    a = vit_cifar.augment(torch.cat([x] * 5), torch.Generator().manual_seed(0), args, torch.zeros(1, 3, 1, 1))
    k = ((a[:, 0].amin((1, 2)) == 0) & (a[:, 0].amax((1, 2)) == 1)).sum()
    assert 30 < k < 70, k  # 640 / 13 = 49


def test_cifar_augment_erasing_and_its_generator():
    """Random erasing: with --erase 1 each image gets one filled box of the mean colour, of 2-33% of the area and an
    aspect of 0.3-3.3, placed alike across and down; with --erase 0.25 a quarter of the images do. And augment draws
    from its generator alone, per sample: the same seed gives the same images, another seed others, and the global
    RNG (MixUp / CutMix's and drop-path's) is not moved."""
    n, mean = 1500, torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    x = torch.full((n, 3, 32, 32), 204, dtype=torch.uint8)
    a = _augmented(x, erase=1.0, mean=mean.flatten().tolist())
    box = (a == mean).all(1)
    assert ((a - 0.8).abs() < 1e-6).all(1).logical_or(box).all()
    rows, cols = box.any(2), box.any(1)
    h, w = rows.sum(1), cols.sum(1)
    assert torch.equal(box.sum((1, 2)), h * w)  # one filled rectangle each
    area, aspect = (h * w).float() / 1024, h.float() / w
    assert 0.01 < area.min() < 0.03 and 0.28 < area.max() < 0.4 and aspect.min() < 0.4 and aspect.max() > 2.5, area
    edges = torch.stack([rows[:, 0], rows[:, -1], cols[:, 0], cols[:, -1]]).float().mean(1)  # top, bottom, left, right
    assert (edges - edges.mean()).abs().max() < 0.02 and edges.min() > 0.02, edges  # the first row too (pixel centres)
    erased = (_augmented(x, erase=0.25, mean=mean.flatten().tolist()) == mean).all(1).flatten(1).any(1)
    assert 0.2 < erased.float().mean() < 0.3, erased.float().mean()
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    state, args = torch.get_rng_state(), argparse.Namespace(policy="trivial", erase=0.5)
    same, again, other = (vit_cifar.augment(x.expand(64, -1, -1, -1), torch.Generator().manual_seed(s), args, mean)
                          for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state) and torch.equal(same, again) and not torch.equal(same, other)
    assert len({im.numpy().tobytes() for im in same}) >= 60  # one image 64 times: each copy its own draws


def test_cifar_build_model_and_attention_picture(tmp_path):
    """build_model: the preset, the size flags over it, --img-size, --pool, --pos-embed, --drop-path (the last block's
    rate) and the class count; a model's own arch (from weights or a checkpoint) over the flags. save_attention: per
    test image the image, the last block's attention map (heads averaged; the class token's to the patches, or with mean
    pooling the mean over the queries), scaled to 0..1 and upsampled bilinearly, and the image dimmed to 25% where the
    map is 0; each tile 3x, six a row."""
    a = argparse.Namespace(arch=None, model="cifar_ti", patch=8, dim=96, depth=2, heads=None, mlp_ratio=2.0,
                           img_size=48, pool="cls", pos_embed="learn", drop_path=0.3)
    m = vit_cifar.build_model(a, 100)
    assert a.arch == dict(img_size=48, patch_size=8, dim=96, depth=2, heads=3, mlp_ratio=2.0, pool="cls",
                          pos_embed="learn"), a.arch
    assert (m.patch_embed.grid, len(m.blocks), m.blocks[0].attn.heads, m.blocks[0].mlp.fc1.out_features,
            m.head.out_features, m.blocks[0].drop_path.p, m.blocks[1].drop_path.p) == (6, 2, 3, 192, 100, 0.0, 0.3)
    assert m.cls_token is not None and isinstance(m.pos_embed, torch.nn.Parameter)
    b = argparse.Namespace(**{**vars(a), "arch": None, "patch": None, "dim": None, "depth": 1, "mlp_ratio": None,
                              "img_size": 0, "pool": "mean", "pos_embed": "sincos"})
    m = vit_cifar.build_model(b, 10)  # the cifar_ti preset but for its depth, at 32 px
    assert b.arch == dict(img_size=32, patch_size=4, dim=192, depth=1, heads=3, pool="mean", pos_embed="sincos")
    assert m.cls_token is None and "pos_embed" not in dict(m.named_parameters())
    c = argparse.Namespace(**{**vars(b), "arch": dict(a.arch)})
    assert vit_cifar.build_model(c, 100).patch_embed.grid == 6 and c.arch == a.arch
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for pool in ("cls", "mean"):
        m = randomize(ViT(img_size=32, patch_size=8, dim=32, depth=2, heads=2, pool=pool), std=0.3)
        with unittest.mock.patch.object(vit_cifar, "save_image", wraps=vit_cifar.save_image) as save:
            vit_cifar.save_attention(m, x, lambda t: (t - 0.5) / 0.25, str(tmp_path / "a.png"))
        attn = m.attention_maps((x - 0.5) / 0.25)[-1].mean(1)  # (8, 17 or 16, same)
        heat = (attn[:, 0, 1:] if pool == "cls" else attn.mean(1)).view(8, 1, 4, 4)
        lo, hi = heat.amin((2, 3), keepdim=True), heat.amax((2, 3), keepdim=True)
        heat = F.interpolate((heat - lo) / (hi - lo), size=32, mode="bilinear", align_corners=False)
        want = torch.stack([x, heat.expand(-1, 3, -1, -1), x * (0.25 + 0.75 * heat)], 1).flatten(0, 1)  # per image
        (tiles, path), kw = save.call_args
        assert path == str(tmp_path / "a.png") and kw["nrow"] == 6 and tiles.shape == (24, 3, 96, 96), (path, kw)
        assert torch.allclose(tiles, want.repeat_interleave(3, 2).repeat_interleave(3, 3), atol=1e-5), pool
    from torchvision.io import read_image
    assert read_image(str(tmp_path / "a.png")).shape == (3, 4 * 98 + 2, 6 * 98 + 2)


def test_cifar_training_loop_on_a_fake_clock(tmp_path):
    """main() on 80 images (5 steps of 16 an epoch, 3 epochs, --eval-every 2), stopped by --interrupt-at 7 and resumed,
    on a clock that moves 1 s an augmentation, 3 s an optimizer step and 7 s an evaluation: each step's learning rate
    (warmup, cosine, times each group's layer-decay scale), the EMA (decay 0.5) of the weights after each step, each
    progress and epoch line to the digit (the loss since the last line, img/s, aug %, eta: also right after the
    resume), log.csv's rows, what each save holds, the test scores as computed again from the saved weights (inputs
    resized to --img-size, normalised by the CIFAR-10 statistics), the 8 test images spread over the test set that
    attention.png shows, beside the raw model's attention, and curves.png; a loss gone infinite stops it, unsaved."""
    root, out = write_cifar10(tmp_path / "data", n_train=80, n_test=20), tmp_path / "out"
    now, seen = [0.0], {k: [] for k in ("lrs", "ema", "losses", "saves", "attention", "curves")}
    aug, step, ema_update, evaluate, save, ce = (vit_cifar.augment, common.optimizer_step, common.ema_update,
                                                 common.evaluate, common.save_checkpoint, F.cross_entropy)
    lr_at, sd = (lambda s: common.lr_at(s, 15, 5e-3, 5)), (lambda m: {k: v.clone() for k, v in m.state_dict().items()})

    def spy_aug(*a):
        now[0] += 1
        return aug(*a)

    def spy_step(opts, *a):
        seen["lrs"].append([(g["lr"], g["lr_scale"]) for o in opts for g in o.param_groups])
        now[0] += 3
        return step(opts, *a)

    def spy_ema(ema, model, first):
        ema_update(ema, model, first=first)
        seen["ema"].append((first, sd(model)))

    def spy_eval(*a, **k):
        now[0] += 7
        return evaluate(*a, **k)

    def spy_save(obj, path):
        seen["saves"].append({**{k: obj[k] for k in ("epoch", "batch", "step", "ema_n", "n_train", "elapsed")},
                              "perm": obj["perm"] is not None, "model": {k: v.clone() for k, v in obj["model"].items()},
                              "ema": {k: v.clone() for k, v in obj["ema"].items()}})
        return save(obj, path)

    def spy_ce(*a, **k):
        loss = ce(*a, **k)
        seen["losses"] += [loss.item()] if torch.is_grad_enabled() else []
        return loss
    spy = unittest.mock.patch.object
    patches = [spy(vit_cifar, "time", types.SimpleNamespace(time=lambda: now[0], perf_counter=lambda: now[0])),
               spy(vit_cifar, "augment", spy_aug), spy(common, "optimizer_step", spy_step),
               spy(common, "ema_update", spy_ema), spy(common, "evaluate", spy_eval),
               spy(common, "save_checkpoint", spy_save), spy(F, "cross_entropy", spy_ce),
               spy(vit_cifar, "save_attention", lambda m, x, *a: seen["attention"].append((sd(m), x))),
               spy(common, "plot_curves", lambda *a: seen["curves"].append(a))]
    flags = ["--data-dir", root, "--out-dir", out, "--epochs", 3, *CIFAR_TINY, *CIFAR_LIGHT, "--batch-size", 16,
             "--depth", 1, "--warmup", 1, "--eval-every", 2, "--ema", 0.5, "--img-size", 48, "--optimizer", "muon",
             "--layer-decay", 0.5, "--weight-decay", 0.1, "--drop-path", 0]
    code, out1, _ = _cifar_main(*flags, "--interrupt-at", 7, patches=patches)
    code2, out2, err = _cifar_main("--resume", out / "ckpt.pt", "--threads", 1, patches=patches)
    assert (code, code2) == (130, None), err
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    for i, groups in enumerate(seen["lrs"]):  # two optimizers (Muon, AdamW), each group at lr times its scale
        assert all(abs(lr - lr_at(i) * scale) < 1e-12 for lr, scale in groups), (i, groups)
    assert len(seen["lrs"]) == 15 and {s for _, s in seen["lrs"][0]} == {1.0, 0.5, 0.25} and len(ck["optimizer"]) == 2
    assert {g["weight_decay"] for o in ck["optimizer"] for g in o["param_groups"]} == {0.0, 0.1}
    assert [first for first, _ in seen["ema"]] == [True] + [False] * 14, seen["ema"]
    avg = None  # the EMA: the first step's weights, then halfway to each next step's (across the resume too)
    for first, w in seen["ema"]:
        avg = w if first else {k: (avg[k] + w[k]) / 2 for k in w}
    assert all(torch.equal(v, ck["model"][k]) and torch.allclose(avg[k], ck["ema"][k], atol=1e-6)
               for k, v in seen["ema"][-1][1].items())
    saves = [tuple(s[k] for k in ("epoch", "batch", "step", "ema_n", "n_train", "elapsed", "perm"))
             for s in seen["saves"]]
    assert saves == [(1, 0, 5, 5, 80, 20.0, False), (1, 2, 7, 7, 80, 28.0, True), (2, 0, 10, 10, 80, 54.0, False),
                     (3, 0, 15, 15, 80, 88.0, False)], saves  # each epoch's end, and the stop's (mid-epoch: its order)
    b = _cifar_batches(root, "test_batch")[0]
    x, y = torch.from_numpy(b["data"]).view(-1, 3, 32, 32).float() / 255, torch.tensor(b["labels"])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR10_STATS)
    resized = (F.interpolate(x, size=(48, 48), mode="bilinear", align_corners=False) - mean) / std

    def score(weights, flip=False):  # (loss, accuracy) as the lines print them
        m = ViT(num_classes=10, **ck["args"]["arch"])
        m.load_state_dict(weights)
        s = common.evaluate(m, [(resized, y)], flip=flip).tolist()
        return f"{s[0] / s[3]:.4f}", f"{100 * s[1] / s[3]:.2f}"
    lines, want, last = [ln for ln in (out1 + out2).splitlines() if ln.startswith("ep ")], [], 0
    for s in (2, 4, 5, 6, 7, 8, 10, 12, 14, 15):  # every 2nd step, each epoch's last and the stop's
        want.append(f"ep {(s - 1) // 5 + 1}/3 | step {s}/15 | loss {sum(seen['losses'][last:s]) / (s - last):.4f} | "
                    f"lr {lr_at(s - 1):.2e} | 4 img/s | aug 25.0% | eta {common.fmt_time((15 - s) * 4)}")
        last = s
    assert [ln for ln in lines if " | step " in ln] == want, lines
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    saved, ends = {s["epoch"]: s for s in seen["saves"] if not s["perm"]}, [ln for ln in lines if " | step " not in ln]
    assert len(rows) == len(ends) == 3, (rows, ends)
    for e, (line, row, elapsed) in enumerate(zip(ends, rows, (20.0, 54.0, 88.0)), 1):  # evaluated: epochs 2 and 3
        train, (lo, acc), ema = f"{sum(seen['losses'][5 * e - 5:5 * e]) / 5:.4f}", score(saved[e]["model"]), \
            score(saved[e]["ema"])
        assert row == dict(epoch=str(e), train_loss=train, test_loss=lo if e > 1 else "", test_acc=acc if e > 1 else "",
                           lr=f"{lr_at(5 * e - 1):.3e}", img_per_s="4.0", elapsed_s=f"{elapsed:.1f}"), (e, row)
        scores = f" | test loss {lo} acc {acc}% | ema {ema[0]} acc {ema[1]}%" if e > 1 else ""
        assert line == f"ep {e}/3 | train loss {train}{scores} | 4 img/s | {common.fmt_time(elapsed)}", (line, e)
    assert [ln for ln in out2.splitlines() if ln.startswith("final ")] == [
        f"final {k} with test-time flip | test loss {lo} acc {acc}% | {t}" for k, (lo, acc), t in
        (("model", score(ck["model"], True), "1m35s"), ("ema", score(ck["ema"], True), "1m42s"))], out2
    head = (f"cifar10: 80 train / 20 test images on cpu (fp32) | cifar_cpu 48px patch 4 dim 32 depth 1 "
            f"{sum(v.numel() for v in ck['model'].values()) / 1e6:.2f}M params | 5 steps/epoch | from step ")
    assert out1.splitlines()[0] == head + "0" and head + "7" in out2.splitlines(), (out1[:300], out2[:300])
    (weights, shown), = seen["attention"]
    assert torch.equal(shown, x[[0, 2, 5, 8, 10, 13, 16, 19]])
    assert all(torch.equal(v, weights[k]) for k, v in ck["model"].items())  # the raw model's, not the EMA's
    assert seen["curves"] == [(os.path.join(str(out), "log.csv"), os.path.join(str(out), "curves.png"))], seen["curves"]
    code, _, err = _cifar_main(*flags[:2], "--out-dir", tmp_path / "inf", "--epochs", 1, *CIFAR_TINY, "--log-every", 1,
                               patches=[spy(F, "cross_entropy", lambda *a, **k: ce(*a, **k) * math.inf)])
    assert code == 2 and "the training loss became inf by step 1" in err, err
    assert not (tmp_path / "inf" / "ckpt.pt").exists()


def test_cifar_mixup_cutmix_labels_order_and_seeds(tmp_path):
    """What the model trains on, batch by batch: the augmented images, normalised by the CIFAR-10 statistics, with
    their own labels, mixed by MixUp or CutMix (one picked per batch; given alone, that one) into soft targets; each
    epoch n // batch-size whole batches of distinct images, in a new order; another --seed another order and another
    initial model."""
    root = write_cifar10(tmp_path / "data", n_train=85, n_test=20)  # 5 steps of 16 an epoch, 5 images left out
    batches = _cifar_batches(root, *[f"data_batch_{i}" for i in range(1, 6)])
    label = {row.tobytes(): k for b in batches for row, k in zip(b["data"], b["labels"])}
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR10_STATS)
    aug, forward, build, ce = vit_cifar.augment, common.ViT.forward, vit_cifar.build_model, F.cross_entropy

    def run(seed, *mixing):  # per training step: (source images, augmented, model input, targets); the initial weights
        seen, spy = {"src": [], "aug": [], "x": [], "y": [], "init": []}, unittest.mock.patch.object

        def spy_aug(x, *a):
            seen["src"].append(x)
            seen["aug"].append(aug(x, *a))
            return seen["aug"][-1]

        def spy_forward(self, x):
            seen["x"] += [x.detach().clone()] if torch.is_grad_enabled() else []
            return forward(self, x)

        def spy_ce(logits, y, **k):
            seen["y"] += [y.clone()] if torch.is_grad_enabled() else []
            return ce(logits, y, **k)

        def spy_build(*a):
            m = build(*a)
            seen["init"].append(m.patch_embed.proj.weight.detach().clone())
            return m
        code, _, err = _cifar_main("--data-dir", root, "--out-dir", tmp_path / str(seed), "--epochs", 2, *CIFAR_TINY,
                                   *CIFAR_LIGHT, "--batch-size", 16, "--depth", 1, "--seed", seed, *mixing, patches=[
                                       spy(vit_cifar, "augment", spy_aug), spy(common.ViT, "forward", spy_forward),
                                       spy(F, "cross_entropy", spy_ce), spy(vit_cifar, "build_model", spy_build)])
        assert code is None and len(seen["y"]) == 10, err
        kinds = []
        for src, a, x, y in zip(seen["src"], seen["aug"], seen["x"], seen["y"]):
            assert y.shape == (16, 10), y.shape  # soft targets
            one = F.one_hot(torch.tensor([label[r.numpy().tobytes()] for r in src.flatten(1)]), 10).float()
            lam = ((y - one.roll(1, 0)) * (one - one.roll(1, 0))).sum() / ((one - one.roll(1, 0)) ** 2).sum()
            assert torch.allclose(y, lam * one + (1 - lam) * one.roll(1, 0), atol=1e-6), (y, one)  # its own labels
            p = (a - mean) / std  # each image mixed with the one before it in the batch
            blend = torch.allclose(x, lam * p + (1 - lam) * p.roll(1, 0), atol=1e-5)
            pasted = (x == p) | (x == p.roll(1, 0))
            box = (x != p).flatten(0, 1).any(0)  # (32, 32): where the images before them were pasted in
            cut = bool(pasted.all()) and abs(box.float().mean() - (1 - lam)) < 1e-6  # a box of 1 - lam of the area
            assert blend or cut, lam
            kinds.append("cutmix" if not blend else "mixup" if not cut else "either")
        return seen, kinds
    both, kinds = run(0, "--mixup", 0.8, "--cutmix", 1.0)
    assert {"mixup", "cutmix"} <= set(kinds), kinds
    cut, kinds = run(1, "--cutmix", 1.0)
    assert "mixup" not in kinds and "cutmix" in kinds, kinds
    images = {r.tobytes() for b in batches for r in b["data"]}
    orders = [torch.cat(s["src"][i:i + 5]).flatten(1) for s in (both, cut) for i in (0, 5)]
    for order in orders:  # 80 of the 85 once each (5 batches of 16), in an order of its own
        assert len({r.numpy().tobytes() for r in order} & images) == 80, len(order)
    first80 = torch.cat([torch.from_numpy(b["data"]) for b in batches])[:80]  # the files' order
    assert len({o.numpy().tobytes() for o in orders + [first80]}) == 5
    assert not torch.equal(both["init"][0], cut["init"][0])


def test_cifar_freeze_trains_only_the_new_head(tmp_path):
    """--pretrained FILE --freeze: a linear probe; the new head learns, every other weight stays the file's."""
    src = randomize(ViT(img_size=32, patch_size=8, dim=32, depth=1, heads=2, num_classes=5)).state_dict()
    torch.save(src, tmp_path / "w.pth")
    code, _, err = _cifar_main("--data-dir", write_cifar10(tmp_path / "data", n_train=80, n_test=20), "--out-dir",
                               tmp_path / "out", "--pretrained", tmp_path / "w.pth", "--heads", 2, "--freeze",
                               "--epochs", 1, "--batch-size", 16, "--device", "cpu", "--threads", 1)
    weights = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["model"]
    assert code is None and weights["head.weight"].shape == (10, 32) and weights["head.weight"].any(), err
    assert all(torch.equal(v, src[k]) for k, v in weights.items() if not k.startswith("head.")), err


# ---------------------------------------------------------------------------------- pretrained weights (#6)

def _tv_small(num_classes=10):
    """A random torchvision ViT of a custom size (heads = dim / 64, as the published ViTs)."""
    import torchvision
    return randomize(torchvision.models.VisionTransformer(32, 8, 2, 2, 128, 256, num_classes=num_classes)).eval()


def _tv_features(tv, x):
    head, tv.heads = tv.heads, torch.nn.Identity()  # the class token after the last LayerNorm
    try:
        return tv(x)
    finally:
        tv.heads = head


def test_pretrained_files_torchvision_timm_same_logits(tmp_path):
    x = torch.randn(3, 3, 32, 32)
    tv = _tv_small()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    m, info = common.load_pretrained(str(tmp_path / "tv.pth"), 10)  # same classes: the head is kept
    assert info["head_kept"] and info["style"] == "torchvision" and info["img_size"] == 32
    assert info["arch"]["heads"] == 2 and info["mean"] == common.IMAGENET_MEAN
    with torch.no_grad():
        assert rel_err(m.eval()(x), tv(x)) < 1e-5
        m, info = common.load_pretrained(str(tmp_path / "tv.pth"), 7)  # new classes: a new zero head, same features
        assert not info["head_kept"] and m.head.weight.shape == (7, 128) and not m.head.weight.any()
        assert rel_err(m.eval().forward_head(m.forward_features(x), pre_logits=True), _tv_features(tv, x)) < 1e-5
        m48, _ = common.load_pretrained(str(tmp_path / "tv.pth"), 7, img_size=48)  # grid 4x4 -> 6x6, bicubic
        assert m48.pos_embed.shape == (1, 37, 128) and m48(torch.randn(2, 3, 48, 48)).shape == (2, 7)
        # heads are not in a state_dict: the guess (width / 64) fits the published ViTs; heads= (--heads) others
        import torchvision
        tv4 = randomize(torchvision.models.VisionTransformer(32, 8, 2, 4, 128, 256, num_classes=10)).eval()
        torch.save(tv4.state_dict(), tmp_path / "tv4.pth")
        m, info = common.load_pretrained(str(tmp_path / "tv4.pth"), 10, heads=4)
        assert info["arch"]["heads"] == 4 and rel_err(m.eval()(x), tv4(x)) < 1e-5
    try:  # a timm-named state_dict: timm's own when installed, else this ViT's (the same names)
        import timm
        src = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, num_classes=5,
                                                               embed_dim=128, depth=2, num_heads=2)
    except ImportError:
        src = ViT(img_size=32, patch_size=8, num_classes=5, dim=128, depth=2, heads=2)
    randomize(src).eval()
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "timm.pth")
    m, info = common.load_pretrained(str(tmp_path / "timm.pth"), 5)  # DDP-saved and wrapped, as training scripts do
    assert info["style"] == "timm" and info["head_kept"]
    with torch.no_grad():
        assert rel_err(m.eval()(x), src(x)) < 1e-5
    # a checkpoint of these scripts keeps its head only for the same class names, not merely as many
    mine = randomize(ViT(img_size=32, patch_size=8, num_classes=3, dim=64, depth=1, heads=2))
    stats = dict(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), crop_pct=0.9)  # e.g. vit_cifar's: not ImageNet's
    torch.save({"model": mine.state_dict(), "args": {"arch": dict(img_size=32, patch_size=8, dim=64, depth=1,
                                                                  heads=2), **stats}, "classes": ["a", "b", "c"]},
               tmp_path / "ckpt.pt")
    for names, kept in ((["a", "b", "c"], True), (["x", "y", "z"], False), (None, True)):
        m, info = common.load_pretrained(str(tmp_path / "ckpt.pt"), 3, classes=names)
        assert info["style"] == "this project" and info["head_kept"] == kept and m.head.weight.any() == kept, names
        assert {k: info[k] for k in stats} == stats, info  # its own input statistics and eval crop
    try:  # its heads are known: heads= (--heads) would build another model from the same weights
        common.load_pretrained(str(tmp_path / "ckpt.pt"), 3, heads=4)
        raise AssertionError("heads=4 accepted")
    except common.CheckpointError as e:
        assert "has 2 heads" in str(e), e


def test_pretrained_files_without_class_token_qkv_bias_or_learned_positions(tmp_path):
    """Plain ViTs of other layouts load as they are, at their size and resized: mean pooling with learned positions
    (no prefix row: every row is the grid), no qkv bias, fixed sin-cos positions (none in the state_dict)."""
    x = torch.randn(2, 3, 32, 32)
    for kw in (dict(pool="mean", pos_embed="learn", qkv_bias=False), dict(pool="mean", pos_embed="sincos")):
        src = randomize(ViT(img_size=32, patch_size=8, num_classes=5, dim=128, depth=2, heads=2, **kw)).eval()
        torch.save(src.state_dict(), tmp_path / "w.pth")
        m, info = common.load_pretrained(str(tmp_path / "w.pth"), 5, img_size=32)
        assert info["head_kept"] and {k: info["arch"][k] for k in kw} == kw, info["arch"]
        with torch.no_grad():
            assert rel_err(m.eval()(x), src(x)) < 1e-6, kw
        m48, _ = common.load_pretrained(str(tmp_path / "w.pth"), 5, img_size=48)  # grid 4x4 -> 6x6
        assert m48.pos_embed.shape == (1, 36, 128) and m48(torch.randn(1, 3, 48, 48)).shape == (1, 5), kw


def test_pretrained_clear_errors(tmp_path):
    import torchvision
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet.pth")
    sd = ViT(img_size=32, patch_size=8, num_classes=5, dim=128, depth=2, heads=2).state_dict()
    torch.save({**sd, "fc_norm.weight": torch.ones(128)}, tmp_path / "extra.pth")  # e.g. timm's avg-pool ViTs
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    torch.save(ViT(img_size=28, patch_size=7, in_chans=1, dim=32, depth=1, heads=2).state_dict(), tmp_path / "gray.pth")
    swiglu = {k.replace("mlp.fc1", "mlp.fc1_g"): v for k, v in sd.items()}  # e.g. EVA-02: no mlp.fc1
    torch.save({**swiglu, **{k.replace("fc1", "fc1_x"): v for k, v in sd.items() if "fc1" in k}}, tmp_path / "glu.pth")
    torch.save({**sd, "pos_embed": torch.zeros(1, 1 + 16 + 4, 128)}, tmp_path / "reg.pth")  # 4 register tokens
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a whole pickled module
    torch.save({k: v for k, v in sd.items() if not k.startswith("head.")}, tmp_path / "headless.pth")
    os.makedirs(tmp_path / "folder.pth")
    for src, words in (("resnet.pth", ["not a ViT state_dict", "conv1.weight"]), ("extra.pth", ["fc_norm.weight"]),
                       ("junk.pth", ["corrupt"]), ("vit_zz_99", ["vit_b_16"]), ("gray.pth", ["1-channel"]),
                       ("glu.pth", ["does not fit", "fc1_"]), ("reg.pth", ["not a square grid", "extra tokens"]),
                       ("module.pth", ["state_dict()"]), ("folder.pth", ["is a folder"]),
                       ("resnet50", ["no such file, nor torchvision ViT weights"]),  # not fetched: not a ViT
                       ("headless.pth", ["no classifier head"]), ("vit_l16", ["such as vit_l_16:"])):
        try:
            common.load_pretrained(str(tmp_path / src) if src.endswith(".pth") else src,
                                   None if src == "headless.pth" else 10, img_size=64 if src == "reg.pth" else None)
            raise AssertionError(f"{src} loaded")
        except common.CheckpointError as e:
            assert all(w in str(e) for w in words), (src, str(e))
    # these load: a timm / DeiT training checkpoint (its args an argparse.Namespace); an MLP width that int(dim *
    # (hidden / dim)) rounds down (959); a published width whose heads are not dim // 64 (SO400M: 1152, 16 heads)
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1)}, tmp_path / "timm_train.pth.tar")
    odd = ViT(img_size=16, patch_size=8, dim=704, depth=1, heads=11, mlp_ratio=960.5 / 704)
    torch.save(odd.state_dict(), tmp_path / "odd.pth")
    torch.save(ViT(img_size=16, patch_size=8, dim=1152, depth=1, heads=16, mlp_ratio=0.25).state_dict(),
               tmp_path / "so400m.pth")
    assert common.load_pretrained(str(tmp_path / "timm_train.pth.tar"), 5)[1]["head_kept"]
    assert odd.blocks[0].mlp.fc1.out_features == 960 and int(704 * (960 / 704)) == 959
    assert common.load_pretrained(str(tmp_path / "odd.pth"), 10, heads=11)[0].blocks[0].mlp.fc1.out_features == 960
    assert common.load_pretrained(str(tmp_path / "so400m.pth"), 10)[1]["arch"]["heads"] == 16


def test_pretrained_torchvision_name_cached_and_offline(tmp_path):
    """A torchvision weights name resolves through torchvision's API: its cache file is read without a network (a
    small stand-in file under the real name), and offline with nothing cached it is one clear line."""
    import torchvision
    w = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(_tv_small(1000).state_dict(), cache / os.path.basename(w.url))
    env = {"TORCH_HOME": str(tmp_path), "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # a closed port: offline
    code = ("import common; m, i = common.load_pretrained('vit_b_16', None); "
            "print(i['classes'][:2], i['head_kept'], i['mean'], m.head.weight.shape[0], i['crop_pct'])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE,
                       env={**os.environ, **env}, timeout=120)
    assert p.returncode == 0 and "['tench', 'goldfish'] True (0.485, 0.456, 0.406) 1000 0.875" in p.stdout, p.stderr
    (cache / os.path.basename(w.url)).unlink()
    data = write_cifar10(tmp_path / "data", n_train=80, n_test=20)
    p = subprocess.run([sys.executable, os.path.join(HERE, "vit_cifar.py"), "--data-dir", data, "--out-dir",
                        str(tmp_path / "o"), "--device", "cpu", "--pretrained", "vit_b_16"], capture_output=True,
                       text=True, env={**os.environ, **env}, timeout=120)
    check_error(p, "cannot get torchvision weights", "offline", "--pretrained FILE")


def test_pretrained_finetune_cifar_and_imagenet(tmp_path):
    """--pretrained FILE in both scripts: the recipe, a new head, --freeze keeps the body, the ckpt evaluates again
    through --pretrained (its classes match: the head is kept) and --resume."""
    torch.save(_tv_small(1000).state_dict(), tmp_path / "tv.pth")
    data, out = write_cifar10(tmp_path / "data", n_train=160, n_test=40), tmp_path / "out"
    p = run_cifar("--data-dir", data, "--out-dir", out, "--pretrained", tmp_path / "tv.pth", "--epochs", 1,
                  "--batch-size", 32, "--device", "cpu", "--threads", 1, "--log-every", 2)
    args = json.loads((out / "args.json").read_text())
    assert args["lr"] == 1e-4 and args["mixup"] == 0 and args["img_size"] == 32 and args["arch"]["dim"] == 128
    assert args["mean"] == list(common.IMAGENET_MEAN), args["mean"]
    acc = re_acc = None
    for line in p.stdout.splitlines():
        if line.startswith("final model"):
            acc = line.split("acc ")[1].split("%")[0]
    p = run_cifar("--eval-only", "--pretrained", out / "ckpt.pt", "--data-dir", data, "--out-dir", tmp_path / "o2")
    re_acc = p.stdout.split("with flip: loss ")[1].split("acc ")[1].split("%")[0]
    assert acc is not None and acc == re_acc, (acc, p.stdout)
    p = run_cifar("--eval-only", "--resume", out / "ckpt.pt", "--data-dir", data)
    assert f"acc {acc}%" in p.stdout, p.stdout
    ck = torch.load(out / "ckpt.pt", weights_only=True)  # as many classes, other names (e.g. Imagenette's ten):
    torch.save({**ck, "classes": [f"c{i}" for i in range(10)]}, tmp_path / "other.pt")  # its head is not CIFAR's
    check_error(run_cifar("--eval-only", "--pretrained", tmp_path / "other.pt", "--data-dir", data, "--out-dir",
                          tmp_path / "o3", ok=False), "has no head for these 10 classes")
    imnet = _imagenet_tree(str(tmp_path / "imnet"))
    _run("--data-dir", imnet, "--out-dir", tmp_path / "fz", "--pretrained", tmp_path / "tv.pth", "--freeze",
         "--epochs", 1, "--batch-size", 8, "--warmup", 1, "--device", "cpu", "--workers", 0, "--crop-pct", 1)
    ck = torch.load(tmp_path / "fz" / "ckpt.pt", weights_only=True)
    src = from_torchvision(torch.load(tmp_path / "tv.pth", weights_only=True))
    head = ck["model"]["head.weight"]
    assert ck["args"]["lr"] == 1e-3 and head.shape == (3, 128) and head.any()
    assert all(torch.equal(v, src[k]) for k, v in ck["model"].items() if not k.startswith("head."))
    # a linear probe's --resume may say --freeze again
    assert flag_error(vit_imagenet.get_args, ["--resume", str(tmp_path / "fz" / "ckpt.pt"), "--freeze"])[0] is None
    r = _run("--data-dir", imnet, "--eval-only", "--pretrained", tmp_path / "fz" / "ckpt.pt", "--workers", 0,
             "--out-dir", tmp_path / "fz2")
    assert "eval model | 12 images" in r.stdout, r.stdout
    img = tmp_path / "imnet" / "val" / "n01" / "n01_val_1.JPEG"
    r = _run("--pretrained", tmp_path / "tv.pth", "--predict", img, "--workers", 0, "--out-dir", tmp_path / "fz3")
    assert f"{img}: " in r.stdout and r.stdout.count("%") == 5, r.stdout  # the weights' own 1000-class head


# --------------------------------------------------------------------------------------------- vit_imagenet.py

IMAGENET = os.path.join(HERE, "vit_imagenet.py")
IMNET_TINY = ["--model", "cifar_cpu", "--depth", "2", "--img-size", "32", "--batch-size", "8", "--warmup", "2",
        "--device", "cpu", "--crop-pct", "1", "--log-every", "1000"]
# one thread per process: faster on 2 shared cores, as under torchrun
IMNET_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _imagenet_tree(root, tiny=False, classes=3, n_train=8, n_val=4, size=32):
    """ImageFolder tree (train/<c>/, val/<c>/; PNG and JPEG) or the TinyImageNet-200 layout (train/<wnid>/images/,
    val/images/ + val/val_annotations.txt). Class c has a bright channel c: learnable in a few steps."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in range(classes):
            wnid = f"n0{c}"
            d = os.path.join(root, split, wnid)
            if tiny:  # train/<wnid>/images/, val/images/
                d = os.path.join(d, "images") if split == "train" else os.path.join(root, "val", "images")
            os.makedirs(d, exist_ok=True)
            for i in range(n):
                img = (torch.rand(3, size, size, generator=g) * 80).to(torch.uint8)
                img[c] += 150
                name = f"{wnid}_{split}_{i}.JPEG" if tiny or i % 2 else f"{wnid}_{split}_{i}.png"
                if name.endswith(".png"):
                    write_png(img, os.path.join(d, name))
                else:
                    with open(os.path.join(d, name), "wb") as f:
                        f.write(encode_jpeg(img, quality=95).numpy().tobytes())
                if tiny and split == "val":
                    with open(os.path.join(root, "val", "val_annotations.txt"), "a") as f:
                        f.write(f"{name}\t{wnid}\t0\t0\t{size - 1}\t{size - 1}\n")
    return root


def _run(*args, procs=1, ok=True):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"] if procs > 1 else []
    r = subprocess.run([sys.executable, *launcher, IMAGENET, *map(str, args)], capture_output=True, text=True,
                       env=IMNET_ENV, timeout=300)
    if ok:
        assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    return r


def _rows(out):
    with open(os.path.join(out, "log.csv")) as f:
        return list(csv.DictReader(f))


def test_imagenet_train_resume_ddp_eval_predict(tmp_path):
    data = _imagenet_tree(str(tmp_path / "data"))
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    base = ["--data-dir", data, "--epochs", 3, "--mixup", 0, *IMNET_TINY,  # global batch 8; RandAugment, crops stay on
            "--optimizer", "muon", "--heads", 2, "--ema", 0.9]  # Muon's and AdamW's states and the EMA through
    # ckpt.pt and DDP (the next test: AdamW alone); cifar_cpu has 4 heads
    _run(*base, "--out-dir", a, "--workers", 1)
    rows = _rows(a)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert float(rows[-1]["test_loss"]) < float(rows[0]["test_loss"]) < 1.0986  # below ln 3: it learns
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert [float(r["lr"]) for r in rows] == [common.lr_at(s, 9, 1e-3, 2) for s in (2, 5, 8)], rows  # one schedule
    # stopped in the middle of epoch 2 (as Ctrl-C does), resumed with other worker counts: the straight run's weights
    r = _run(*base, "--out-dir", b, "--workers", 0, "--stop-after", 4)
    assert "--resume" in r.stdout and len(_rows(b)) == 1
    ck = torch.load(b / "ckpt.pt", weights_only=True)
    torch.save({**ck, "elapsed": 1e5}, b / "ckpt.pt")  # the time before the stop counts on: elapsed_s
    _run("--resume", b / "ckpt.pt", "--workers", 2)
    assert all(1e5 <= float(r["elapsed_s"]) < 1e5 + 300 for r in _rows(b)[1:]), _rows(b)
    ca, cb = (torch.load(d / "ckpt.pt", weights_only=True) for d in (a, b))
    assert ca["step"] == cb["step"] == 9 and ca["epoch"] == cb["epoch"] == 3 and ca["args"]["arch"]["heads"] == 2
    assert all(torch.equal(ca[m][k], cb[m][k]) for m in ("model", "ema") for k in ca[m])
    assert [r["train_loss"] for r in _rows(b)] == [r["train_loss"] for r in rows]
    # 2 processes (torchrun, gloo) x 2 accumulated micro-batches x 2 images, stopped in epoch 2 and resumed in one
    # process (4 images x 2): the losses of 1 process x 8 images, the resumed epoch's too
    _run(*base, "--out-dir", c, "--workers", 0, "--accum-steps", 2, "--stop-after", 4, procs=2)
    _run("--resume", c / "ckpt.pt", "--workers", 0)
    assert len(_rows(c)) == len(rows), (_rows(c), rows)
    for r0, r in zip(rows, _rows(c)):  # zip(strict=True): Python 3.10 and newer
        for k in ("train_loss", "test_loss"):
            assert abs(float(r[k]) - float(r0[k])) <= 1e-4 * float(r0[k]), (k, r, r0)
    # eval-only reproduces the last epoch's numbers; predict names the top classes
    assert "its run is complete" in _run("--resume", a / "ckpt.pt").stdout  # nothing left to train
    r = _run("--resume", a / "ckpt.pt", "--eval-only", "--workers", 0)
    assert f"top1 {float(rows[-1]['test_acc']):.2f}%" in r.stdout and f"{float(rows[-1]['test_loss']):.4f}" in r.stdout
    ck = torch.load(a / "ckpt.pt", weights_only=True)  # its std and its patch weights doubled: the same logits, with
    ck["args"]["std"] = tuple(2 * v for v in ck["args"]["std"])  # its own input statistics (not ImageNet's)
    ck["model"]["patch_embed.proj.weight"] *= 2
    torch.save(ck, tmp_path / "std2.pt")
    r = _run("--pretrained", tmp_path / "std2.pt", "--eval-only", "--data-dir", data, "--workers", 0)  # as its run
    assert f"test_loss {float(rows[-1]['test_loss']):.4f}" in r.stdout, r.stdout  # evaluated: --crop-pct 1, not 0.875
    more = tmp_path / "more"  # other data: more steps per epoch than the checkpoint's run had
    shutil.copytree(data, more)
    for f in os.listdir(more / "train" / "n00"):  # 8 more images: 32, 4 steps of 8
        shutil.copy(more / "train" / "n00" / f, more / "train" / "n00" / f"copy_{f}")
    r = _run("--resume", a / "ckpt.pt", "--data-dir", more, "--workers", 0, ok=False)
    assert r.returncode == 2 and "gives 4 steps per epoch, the checkpoint's run 3" in r.stderr, r.stderr[-2000:]
    files = [os.path.join(data, "val", "n02", f) for f in sorted(os.listdir(os.path.join(data, "val", "n02")))[:2]]
    lines = _run("--resume", a / "ckpt.pt", "--predict", *files).stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith(f + ": n02 ") for line, f in zip(lines, files)), lines
    ck = torch.load(a / "ckpt.pt", weights_only=True)  # --predict uses the EMA's weights
    ck["ema"]["module.head.bias"][0] = 100.0
    torch.save(ck, tmp_path / "forged.pt")
    lines = _run("--resume", tmp_path / "forged.pt", "--predict", files[0], "--out-dir", a).stdout.strip().splitlines()
    assert lines[-1].startswith(files[0] + ": n00 100.0%"), lines


def test_imagenet_tinyimagenet_layout_mixup_ema_bad_image(tmp_path):
    data = _imagenet_tree(str(tmp_path / "tiny"), tiny=True)
    with open(os.path.join(data, "train", "n01", "images", "n01_train_0.JPEG"), "wb") as f:
        f.write(b"not a jpeg")  # one unreadable image: skipped and counted
    os.symlink("..", os.path.join(data, "train", "n01", "images", "up"))  # link loops: each folder is walked once
    os.symlink(".", os.path.join(data, "train", "n02", "self"))  # (torchvision's make_dataset: 40 times)
    base = ["--data-dir", data, "--epochs", 2, "--cutmix", 1, "--drop-path", 0.1, "--ema", 0.9, *IMNET_TINY]
    r = _run(*base, "--out-dir", tmp_path / "o", "--workers", 1)  # each epoch meets the bad image again: still 1
    epochs = [line for line in r.stdout.splitlines() if "train_loss" in line]
    assert "24 train / 12 val images, 3 classes" in r.stdout and all("skipped 1 unreadable" in e for e in epochs)
    assert "ema top1" in r.stdout and len(_rows(tmp_path / "o")) == 2 == len(epochs)
    # stopped in epoch 2 and resumed: the same weights, CutMix's and drop-path's draws included (reseeded per step)
    _run(*base, "--out-dir", tmp_path / "s", "--workers", 0, "--stop-after", 4)
    _run("--resume", tmp_path / "s" / "ckpt.pt", "--workers", 0)
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "os")
    assert a["step"] == b["step"] == 6 and all(torch.equal(a[m][k], b[m][k]) for m in ("model", "ema") for k in a[m])
    val = os.path.join(data, "val")  # sorted into val/<wnid>/ as many guides do, val_annotations.txt left there
    for line in open(os.path.join(val, "val_annotations.txt")):
        f, wnid = line.split("\t")[:2]
        os.makedirs(os.path.join(val, wnid), exist_ok=True)
        os.replace(os.path.join(val, "images", f), os.path.join(val, wnid, f))
    os.rmdir(os.path.join(val, "images"))
    r = _run("--resume", tmp_path / "o" / "ckpt.pt", "--eval-only", "--workers", 0)
    assert f"top1 {float(_rows(tmp_path / 'o')[-1]['test_acc']):.2f}%" in r.stdout, r.stdout
    ev = {ln.split(" | ")[0]: ln.split(" | ") for ln in r.stdout.splitlines() if ln.startswith("eval ")}
    assert ev["eval model"][2] != ev["eval ema"][2], ev  # the EMA's own weights: another test loss
    assert epochs[-1].split("ema top1 ")[1].split()[0] == ev["eval ema"][3].split()[1], (epochs[-1], ev)


def test_imagenet_augmentation_is_per_image_and_epoch(tmp_path):
    """A training image's crop, flip and RandAugment are a function of (seed, epoch, index): the same in any worker
    or process, another for another image or epoch."""
    from torchvision.io import write_png
    p = str(tmp_path / "a.png")
    write_png(torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)), p)
    args = argparse.Namespace(img_size=32, crop_scale=0.35, randaug=2, randaug_mag=9)
    ds = vit_imagenet.Images([(p, 0)] * 3, vit_imagenet.transforms(args, True), 32, seed=0)
    x0 = ds[0][0]
    assert x0.shape == (3, 32, 32) and torch.equal(x0, ds[0][0]) and not torch.equal(x0, ds[1][0])
    ds.epoch = 1
    assert not torch.equal(x0, ds[0][0])
    ds.epoch, ds.seed = 0, 1  # another --seed
    assert not torch.equal(x0, ds[0][0])


def test_stop_flag_takes_torchruns_copy_of_a_sigterm_as_one():
    with kept_signals_and_threads(), contextlib.redirect_stdout(io.StringIO()):
        stop = common.StopFlag()
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's, then torchrun's copy: one stop at the step's end
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert stop and stop.reasons == ["SIGTERM"]
        try:
            os.kill(os.getpid(), signal.SIGINT)  # any other second signal stops at once
            time.sleep(1)
            raise AssertionError("a second signal did not stop at once")
        except KeyboardInterrupt:
            pass


def test_resume_command_drops_one_off_flags():
    """The printed command: this run's flags but the one-off ones (both spellings, with their values), shell-quoted."""
    argv = ["vit_imagenet.py", "--data-dir", "my data", "--stop-after", "4", "--interrupt-at=15", "--lr", "1e-3",
            "--resume", "old/ckpt.pt"]
    with unittest.mock.patch.object(sys, "argv", argv):
        cmd = common.resume_command("out dir/ckpt.pt")
    assert cmd == "python vit_imagenet.py --data-dir 'my data' --lr 1e-3 --resume 'out dir/ckpt.pt'", cmd
    # an abbreviation (--stop 4) would stay in that line: the resumed run would stop again
    for get_args, argv in ((vit_imagenet.get_args, ["--data-dir", "d", "--stop", "4"]),
                           (vit_cifar.get_args, ["--interrupt", "4"]), (vit_cifar.get_args, ["--res", "c.pt"])):
        code, msg = flag_error(get_args, argv)
        assert code == 2 and "unrecognized arguments" in msg, (argv, code, msg)


def test_imagenet_evaluate_skips_a_batch_of_unreadable_images():
    # a short last batch whose one image is unreadable: skipped and counted, not a stop
    m, cpu = ViT(img_size=16, patch_size=4, num_classes=3, dim=32, depth=1, heads=2), torch.device("cpu")
    dl = [(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1]), ["a.jpg: truncated"]),
          (torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long), ["b.jpg: truncated"])]
    skips, prep = vit_imagenet.Skips(100, 1, None), lambda x: x.float() / 255
    loss, top1, top5 = vit_imagenet.evaluate(m, dl, prep, contextlib.nullcontext, skips, 1, cpu)
    assert list(skips.bad) == ["a.jpg: truncated", "b.jpg: truncated"] and top5 == 100.0 and math.isfinite(loss)
    with contextlib.redirect_stderr(io.StringIO()) as err:  # none readable at all: one line, not a division by 0
        try:
            vit_imagenet.evaluate(m, dl[1:], prep, contextlib.nullcontext, vit_imagenet.Skips(100, 1, None), 1, cpu)
            raise AssertionError("an evaluation of no image went on")
        except SystemExit as e:
            assert e.code == 2 and "none of the evaluation images" in err.getvalue(), err.getvalue()


def test_loops_apply_label_smoothing_and_clipping(tmp_path):
    """The training loops pass --label-smoothing to the loss and the clip value to the optimizer step (a dropped one
    would still train, so no other test would notice). In-process, with spies on the two calls."""
    cifar = ["--data-dir", write_cifar10(tmp_path / "c", n_train=80, n_test=20), "--out-dir", tmp_path / "oc",
             "--epochs", 1, *CIFAR_TINY, *CIFAR_LIGHT, "--label-smoothing", 0.3, "--clip-grad", 0.7]
    imnet = [IMAGENET, "--data-dir", _imagenet_tree(str(tmp_path / "i")), "--out-dir", tmp_path / "oi", "--epochs", 2,
             "--workers", 0, *IMNET_TINY, "--label-smoothing", 0.3, "--clip", 0.7, "--cutmix", 1,
             "--ema", 0.9]
    seen, get = [], vit_imagenet.Images.__getitem__

    def getitem(self, i):  # the epoch each training image is drawn for (val images have no seed)
        if self.seed is not None:
            seen.append(self.epoch)
        return get(self, i)
    for module, argv, steps in ((vit_cifar, ["vit_cifar.py", *cifar], 2), (vit_imagenet, imnet, 6)):
        with unittest.mock.patch.object(sys, "argv", list(map(str, argv))), \
                unittest.mock.patch.object(F, "cross_entropy", wraps=F.cross_entropy) as ce, \
                unittest.mock.patch.object(common, "optimizer_step", wraps=common.optimizer_step) as opt, \
                unittest.mock.patch.object(common, "ema_update", wraps=common.ema_update) as ema, \
                unittest.mock.patch.object(common, "evaluate", wraps=common.evaluate) as ev, \
                unittest.mock.patch.object(vit_imagenet.Images, "__getitem__", getitem), \
                unittest.mock.patch.object(vit_imagenet.Sampler, "set_epoch", autospec=True,
                                           side_effect=vit_imagenet.Sampler.set_epoch) as set_epoch, \
                contextlib.redirect_stdout(io.StringIO()), kept_signals_and_threads():
            module.main()
        smooth = [c.kwargs.get("label_smoothing", 0.0) for c in ce.call_args_list]
        assert smooth.count(0.3) == steps and set(smooth) == {0.0, 0.3}, (module.__name__, smooth)  # 0: test loss
        if module is vit_imagenet:  # --cutmix 1: the training targets are mixed, (B, classes) soft labels
            assert all(c.args[1].ndim == 2 for c in ce.call_args_list if c.kwargs.get("label_smoothing")), ce
            # each epoch its own order and its own augmentation draws
            assert [c.args[1] for c in set_epoch.call_args_list] == [0, 1] and sorted(set(seen)) == [0, 1], seen
            assert [c.kwargs["first"] for c in ema.call_args_list] == [True] + [False] * 5, ema.call_args_list
        # which module each evaluation saw, and whether with test-time flip: per epoch the raw model, then its EMA (a
        # module of its own); vit_cifar.py ends with both again, flipped. On the tiny data an EMA line computed on the
        # raw model, or an end without the flip, could show the same numbers, so look at the calls.
        evals = [(id(c.args[0]), c.args[3] if len(c.args) > 3 else c.kwargs.get("flip", False))
                 for c in ev.call_args_list]
        raw, avg = evals[0][0], evals[1][0]
        want = [(raw, False), (avg, False)] * (2 if module is vit_imagenet else 1)
        assert raw != avg and evals == want + ([(raw, True), (avg, True)] if module is vit_cifar else []), evals
        clips = [c.args[3] if len(c.args) > 3 else c.kwargs.get("clip") for c in opt.call_args_list]
        assert clips == [0.7] * steps, (module.__name__, clips)
    # and optimizer_step clips: SGD at lr 1 steps by the gradient, (30, 40) of norm 50 -> norm 0.7
    w = torch.nn.Parameter(torch.zeros(2))
    w.grad = torch.tensor([30.0, 40.0])
    common.optimizer_step([torch.optim.SGD([w], lr=1.0)], torch.amp.GradScaler("cpu", enabled=False), [w], 0.7)
    assert torch.allclose(w.detach(), torch.tensor([-0.42, -0.56])) and w.grad is None, w


def test_runner_refuses_a_selection_of_no_test():
    p = subprocess.run([sys.executable, os.path.join(HERE, "test_vit.py"), "-k", "no_such_test"], capture_output=True,
                       text=True, timeout=120)  # "0 passed" with exit 0 would let CI pass with nothing run
    assert p.returncode == 2 and "no test name contains 'no_such_test'" in p.stderr, p.stderr


def test_ema_update_is_a_lerp_chain():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    m = torch.nn.Linear(3, 2)
    ema = AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for i in range(4):  # the first update copies, each later one moves 10% of the way to the model
        with torch.no_grad():
            m.weight.mul_(2).add_(1)
        common.ema_update(ema, m, first=i == 0)
        want = m.weight.detach().clone() if i == 0 else 0.9 * want + 0.1 * m.weight.detach()
    assert torch.allclose(ema.module.weight, want) and not torch.allclose(want, m.weight) and ema.n_averaged == 4


def test_imagenet_clear_errors(tmp_path):
    """Each case: exit code 2, one line on stderr, no traceback. One subprocess runs them all (one torch import)."""
    empty_class, bad_images, good = (_imagenet_tree(str(tmp_path / d), n_val=1) for d in ("d1", "d2", "d3"))
    os.makedirs(os.path.join(empty_class, "train", "n09"))  # a class folder without images
    for cls in ("n00", "n01"):  # 16 of 24 training images unreadable
        for name in os.listdir(os.path.join(bad_images, "train", cls)):
            with open(os.path.join(bad_images, "train", cls, name), "wb") as f:
                f.write(b"junk")
    os.makedirs(tmp_path / "o")
    (tmp_path / "o" / "ckpt.pt").write_bytes(b"truncated")
    one_class, tiny = _imagenet_tree(str(tmp_path / "d4"), classes=1), _imagenet_tree(str(tmp_path / "d5"), tiny=True)
    with open(os.path.join(tiny, "val", "val_annotations.txt"), "a") as f:
        f.write("a line without tabs\n")
    torch.save(ViT(img_size=32, patch_size=4, num_classes=5, dim=32, depth=1, heads=2).state_dict(), tmp_path / "w5")
    torch.save({"model": {}, "args": {}, "classes": [], "step": 0}, tmp_path / "cifar.pt")  # e.g. vit_cifar's
    gone, extra = _imagenet_tree(str(tmp_path / "d6"), tiny=True), _imagenet_tree(str(tmp_path / "d7"))
    os.makedirs(os.path.join(extra, "val", "n09"))  # a val class that train/ lacks: no silent subset of val
    shutil.copy(os.path.join(extra, "val", "n00", "n00_val_0.png"), os.path.join(extra, "val", "n09", "a.png"))
    for name in sorted(os.listdir(os.path.join(gone, "val", "images")))[:11]:  # many; a few are skipped as unreadable
        os.remove(os.path.join(gone, "val", "images", name))
    cases = {"lists are missing": ["--data-dir", gone], "1 classes that": ["--data-dir", extra],
             "lacks steps_per_epoch": ["--resume", str(tmp_path / "cifar.pt"), "--eval-only"],
             "is a file": ["--data-dir", good, "--out-dir", str(tmp_path / "w5")],
             "2 or more": ["--data-dir", one_class], "tab-separated": ["--data-dir", tiny],
             "not a folder": ["--data-dir", str(tmp_path / "none")],
             "no head for these 3 classes": ["--data-dir", good, "--pretrained", str(tmp_path / "w5"), "--eval-only"],
             "lacks train/ and val/ or test/": ["--data-dir", str(tmp_path)],  # no train/ folder, no val/
             "not the split itself": ["--data-dir", os.path.join(good, "train")],
             "--resume": ["--data-dir", empty_class, "--out-dir", str(tmp_path / "o")],  # ckpt.pt is not overwritten
             "corrupt": ["--resume", str(tmp_path / "o" / "ckpt.pt"), "--eval-only"],
             "n09": ["--data-dir", empty_class, "--out-dir", str(tmp_path / "p")],
             "unreadable": ["--data-dir", bad_images, "--out-dir", str(tmp_path / "p"), "--workers", "0"],
             "divisible": ["--data-dir", bad_images, "--batch-size", "6", "--accum-steps", "4"],
             "loss became nan": ["--data-dir", good, "--out-dir", str(tmp_path / "nan"), "--lr", "1e30", "--warmup",
                                 "0", "--workers", "0"],  # diverged: stops before saving
             "cannot write": ["--data-dir", good, "--out-dir", str(tmp_path / "full"), "--epochs", "1", "--workers",
                              "0"]}  # the epoch's save fails (a folder where its temp file goes)
    os.makedirs(tmp_path / "full" / "ckpt.pt.tmp")
    driver = ("import contextlib, io, json, sys\n"
              f"sys.path.insert(0, {HERE!r})\n"
              "import vit_imagenet\n"
              "out = []\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    sys.argv, err, code = ['vit_imagenet.py'] + argv, io.StringIO(), 0\n"
              "    with contextlib.redirect_stderr(err):\n"
              "        try:\n"
              "            vit_imagenet.main()\n"
              "        except SystemExit as e:\n"
              "            code = e.code\n"
              "    out.append([code, err.getvalue()])\n"
              "print(json.dumps(out))\n")
    argvs = [IMNET_TINY[4:] + v if k.startswith("no head") else IMNET_TINY + v for k, v in cases.items()]  # no --model
    r = subprocess.run([sys.executable, "-c", driver, json.dumps(argvs)],
                       capture_output=True, text=True, env=IMNET_ENV, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for (message, argv), (code, err) in zip(cases.items(), json.loads(r.stdout.strip().splitlines()[-1])):
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, code, err)
    assert not (tmp_path / "nan" / "ckpt.pt").exists()
    with open(tmp_path / "full" / "log.csv") as f:  # no row for an epoch whose save failed: a resume repeats it
        assert len(f.read().splitlines()) == 1
    for flags, word in ((["--randaug-mag", "31"], "--randaug-mag must be <= 30"), (["--clip", "nan"], "--clip"),
                        (["--pretrained", "w.pth", "--pool", "cls"], "comes from the weights"),
                        (["--freeze"], "needs --pretrained"), (["--threads", "100000"], "cores"),
                        (["--lr", "0"], "--lr")):
        code, line = flag_error(vit_imagenet.get_args, ["--data-dir", good, *flags])
        assert code == 2 and word in line, (flags, line)
    png = os.path.join(good, "train", "n00", "n00_train_0.png")  # the augmentation is a function of (seed, epoch, i)
    ds = vit_imagenet.Images([(png, 0)], vit_imagenet.transforms(argparse.Namespace(
        img_size=32, crop_scale=0.05, randaug=2, randaug_mag=10), True), 32, seed=0)
    a = ds[0][0]
    ds.epoch = 1
    b = ds[0][0]
    ds.epoch = 0
    assert torch.equal(ds[0][0], a) and not torch.equal(a, b)


def test_imagenet_flags_recipe_resume_crop_in_process(tmp_path):
    """get_args alone: the patch from the resolution, --pretrained's recipe and shape flags, --resume keeping the
    checkpoint's settings but the paths; then main() up to its eval transform: the crop that --crop-pct 0 means."""

    def get(*argv):
        return vit_imagenet.get_args(list(map(str, argv)))[0]
    assert [(a.img_size, a.patch) for a in (get("--data-dir", "d", "--img-size", s) for s in (0, 128, 127, 64, 63))] \
        == [(224, 16), (128, 16), (127, 8), (64, 8), (63, 4)]
    a = get("--data-dir", "d", "--pretrained", "w.pth", "--epochs", 2)  # the weights' resolution (0) and the recipe
    assert (a.img_size, a.epochs, a.batch_size, a.lr, a.warmup, a.mixup, a.randaug_mag) == (0, 2, 512, 1e-4, 500, 0, 9)
    assert get("--data-dir", "d", "--pretrained", "w.pth", "--freeze", "--lr", 5e-4).lr == 5e-4
    for flags, word in ((["--predict", "a.png"], "need --resume CKPT or --pretrained"),
                        (["--data-dir", "d", "--crop-pct", "1.5"], "--crop-pct must be <= 1"),
                        *(([f, v, "--data-dir", "d", "--pretrained", "w.pth"], f"{f}: with --pretrained the model's")
                          for f, v in (("--model", "vit_b16"), ("--patch", "8"), ("--depth", "2"), ("--pool", "cls"),
                                       ("--pos-embed", "learn")))):
        code, line = flag_error(vit_imagenet.get_args, flags)
        assert code == 2 and word in line, (flags, line)
    saved = vars(get("--data-dir", tmp_path / "old", "--lr", 0.5, "--out-dir", tmp_path / "elsewhere"))
    del saved["ema"]  # a flag newer than the checkpoint: its default
    ck = tmp_path / "run" / "ckpt.pt"
    ck.parent.mkdir()
    torch.save({"model": {}, "args": saved, "classes": ["a", "b"], "step": 0, "steps_per_epoch": 1}, ck)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        a = get("--resume", ck, "--lr", 0.1, "--workers", 0, "--data-dir", tmp_path / "new")
    assert (a.lr, a.ema, a.workers, a.data_dir, a.out_dir) == (0.5, 0.0, 0, str(tmp_path / "new"), str(ck.parent)), a
    assert "keeps the checkpoint's --lr" in out.getvalue() and get("--resume", ck).data_dir == str(tmp_path / "old")
    # the eval crop: a file's 0.875, a ckpt.pt's own, a --crop-pct given over both
    vit = ViT(img_size=32, patch_size=8, num_classes=3, dim=32, depth=1, heads=2)
    torch.save(vit.state_dict(), tmp_path / "sd.pth")
    torch.save({"model": vit.state_dict(), "args": {"crop_pct": 0.5, "arch": {"heads": 2}}, "classes": ["a", "b", "c"]},
               tmp_path / "own.pt")
    write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(tmp_path / "x.png"))
    crops, stop = [], type("Stop", (Exception,), {})

    def spy(args, train):  # the crop is all this looks at
        crops.append(args.crop_pct)
        raise stop
    for src, flags in (("sd.pth", []), ("own.pt", []), ("own.pt", ["--crop-pct", "1"]),
                       ("sd.pth", ["--crop-pct", "0.9"])):
        argv = ["vit_imagenet.py", "--pretrained", str(tmp_path / src), "--predict", str(tmp_path / "x.png"),
                "--device", "cpu", *flags]
        with unittest.mock.patch.object(sys, "argv", argv), contextlib.suppress(stop), \
                unittest.mock.patch.object(vit_imagenet, "transforms", spy), contextlib.redirect_stdout(io.StringIO()):
            vit_imagenet.main()
    assert crops == [0.875, 0.5, 1.0, 0.9], crops


def test_imagenet_scan_layouts_in_process(tmp_path):
    """scan() alone: train/ in torchvision's make_dataset order (sub-folders too, a link loop once); val/ before
    test/; TinyImageNet's val_annotations.txt with a blank line, entries without a box, CRLF and a few listed files
    missing; an empty val class; --eval-only (need_train=False) walks no train/; one line for a val/ of no image,
    an unknown wnid, a split folder given as --data-dir."""
    from torchvision.datasets.folder import make_dataset

    def scan(root, need_train=True):
        return vit_imagenet.scan(argparse.Namespace(data_dir=str(root), val_dir="auto"), need_train)

    def error(root, **kw):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                scan(root, **kw)
            except SystemExit as e:
                assert e.code == 2, e.code
                return err.getvalue()
        raise AssertionError(f"{root} scanned")
    data = _imagenet_tree(str(tmp_path / "d"), n_train=3, n_val=2, size=8)
    for sub in "fbdcea":  # created out of order: os.walk lists them as the file system does
        os.makedirs(os.path.join(data, "train", "n00", sub))
        for f in "31524":
            shutil.copy(os.path.join(data, "train", "n00", "n00_train_0.png"), os.path.join(data, "train", "n00", sub,
                                                                                            f + ".png"))
    train, val, classes = scan(data)
    tr = os.path.join(data, "train")
    assert classes == ["n00", "n01", "n02"] and len(train) == 39 and len(val) == 6
    assert train == make_dataset(tr, {c: i for i, c in enumerate(classes)}, extensions=vit_imagenet.EXTS)
    os.symlink(".", os.path.join(tr, "n01", "self"))  # a link to the class folder itself: walked once
    assert scan(data)[0] == train
    shutil.copytree(os.path.join(data, "val"), os.path.join(data, "test"))
    os.remove(os.path.join(data, "test", "n00", "n00_val_0.png"))
    assert len(scan(data)[1]) == 6  # val/, not test/
    for f in os.listdir(os.path.join(data, "val", "n02")):  # a val class without images: allowed
        os.remove(os.path.join(data, "val", "n02", f))
    assert [y for _, y in scan(data)[1]] == [0, 0, 1, 1]
    for f in os.listdir(os.path.join(data, "train", "n01")):  # --eval-only: train/ is not walked
        os.remove(os.path.join(data, "train", "n01", f))
    assert scan(data, need_train=False)[0] == [] and "n01 has no images" in error(data)
    for c in ("n00", "n01"):
        for f in os.listdir(os.path.join(data, "val", c)):
            os.remove(os.path.join(data, "val", c, f))
    assert "no images in" in error(data, need_train=False)
    assert "not the split itself" in error(os.path.join(data, "val"))
    tiny = _imagenet_tree(str(tmp_path / "t"), tiny=True, n_train=1, n_val=5, size=8)  # 15 val images
    ann, names = os.path.join(tiny, "val", "val_annotations.txt"), sorted(os.listdir(os.path.join(tiny, "val",
                                                                                                   "images")))
    rows = [f"{f}\t{f[:3]}" + ("\r\n" if i % 3 else "\t0\t0\t7\t7\n") for i, f in enumerate(names)]  # wnid, no box
    with open(ann, "w", newline="") as f:
        f.write("".join(rows[:4]) + "\n" + "".join(rows[4:]) + "\n")  # blank lines: skipped
    for f in names[:2]:  # a few missing: skipped later, as unreadable ones
        os.remove(os.path.join(tiny, "val", "images", f))
    val = scan(tiny)[1]
    assert val == [(os.path.join(tiny, "val", "images", f), int(f[2])) for f in names], val
    with open(ann, "a") as f:
        f.write("extra.JPEG\tn09\t0\t0\t7\t7\n")
    assert "1 classes that" in error(tiny)


def test_imagenet_transforms_eval_crop_train_crop_flip_randaug():
    """Eval: the short side resized to round(img_size / crop_pct), aspect kept, then the center crop. Train at
    --crop-scale 1 on a square image: the whole image, antialiased bilinear, mirrored left-right about half the time;
    RandAugment with --randaug ops at --randaug-mag, none at --randaug 0."""
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as TF
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8, generator=g)  # landscape: short side 40 -> 37
    ev = vit_imagenet.transforms(argparse.Namespace(img_size=32, crop_pct=0.875), False)
    want = TF.center_crop(TF.resize(img, [37, 55]), [32, 32])
    assert all(torch.equal(ev(img), want) for _ in range(3))
    sq = torch.randint(0, 256, (3, 48, 48), dtype=torch.uint8, generator=g)
    args = argparse.Namespace(img_size=32, crop_scale=1.0, randaug=0, randaug_mag=10)
    tr = vit_imagenet.transforms(args, True)
    whole = TF.resize(sq, [32, 32], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        outs = [tr(sq) for _ in range(16)]
    flips = [torch.equal(o, whole.flip(-1)) for o in outs]
    assert all(f or torch.equal(o, whole) for o, f in zip(outs, flips)) and 0 < sum(flips) < 16, flips
    assert not any(isinstance(t, v2.RandAugment) for t in tr.transforms)
    args.randaug, args.randaug_mag = 3, 7
    assert [(t.num_ops, t.magnitude) for t in vit_imagenet.transforms(args, True).transforms
            if isinstance(t, v2.RandAugment)] == [(3, 7)]


def test_imagenet_skips_limits_and_processes(tmp_path):
    """Unreadable images: (None, 'path: reason') from the dataset; each counted once; more than 10 and 1% of all stop
    the run at once, as does a whole batch; note() counts over all processes (all_gather_object faked: what the
    other process met) and stops on their sum."""
    (tmp_path / "a.png").write_bytes(b"junk")
    x, why = vit_imagenet.Images([(str(tmp_path / "a.png"), 0)], None, 8)[0]
    assert x is None and why.startswith(f"{tmp_path / 'a.png'}: ") and len(why.splitlines()) == 1, why

    def dies(fn):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                fn()
            except SystemExit as e:
                return e.code == 2 and "unreadable" in err.getvalue()
        return False
    s = vit_imagenet.Skips(100, 1, None)
    s([f"{i}.jpg: bad" for i in range(10)])
    s(["0.jpg: bad"])  # met again: counted once
    assert s.note() == " | skipped 10 unreadable (e.g. 0.jpg: bad)" and not dies(s.note)
    assert dies(lambda: s(["10.jpg: bad"]))  # the 11th of 100: at once, not at the epoch's end
    big = vit_imagenet.Skips(2000, 1, None)  # 1% of 2000: 20
    big([f"{i}.jpg: bad" for i in range(20)])
    assert dies(lambda: big(["20.jpg: bad"]))
    assert dies(lambda: vit_imagenet.Skips(100, 1, None)(["a.jpg: bad"], whole_batch=True))

    def others(bad):  # all_gather_object: this process's list, then the other one's
        return unittest.mock.patch.object(vit_imagenet.dist, "all_gather_object",
                                          side_effect=lambda out, mine, group=None: out.__setitem__(slice(None),
                                                                                                    [mine, bad]))
    s = vit_imagenet.Skips(1000, 2, None)
    s(["a: x", "b: x", "c: x"])
    with others(["c: x", "d: x"]):
        assert s.note() == " | skipped 4 unreadable (e.g. a: x)"
    s([f"{i}: x" for i in range(5)])
    with others([f"o{i}: x" for i in range(4)]):  # 8 here and 4 there: 12 of 1000
        assert dies(s.note)


def test_imagenet_stops_on_an_unreadable_training_batch(tmp_path):
    """A micro-batch of unreadable images only (here one image per micro-batch) stops the run with one line, even
    when the count is below the limit: there is nothing to train on."""
    data = _imagenet_tree(str(tmp_path / "d"), classes=2, n_train=4, n_val=2)
    with open(os.path.join(data, "train", "n01", "n01_train_0.png"), "wb") as f:
        f.write(b"junk")
    argv = ["vit_imagenet.py", "--data-dir", data, "--out-dir", str(tmp_path / "o"), "--epochs", "1", "--workers", "0",
            *IMNET_TINY, "--warmup", "0", "--accum-steps", "8", "--mixup", "0"]
    try:
        with unittest.mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()) as err, kept_signals_and_threads():
            vit_imagenet.main()
        raise AssertionError("trained on an empty batch")
    except SystemExit as e:
        assert e.code == 2 and "1 of 12 images unreadable" in err.getvalue(), err.getvalue()


def test_imagenet_two_processes_in_process(tmp_path):
    """main() as rank 1, then as rank 0, of 2 processes, in this process (setup, DDP and the collectives faked).
    Rank 1 draws its shard of the --seed permutation each epoch, its augmentation seeded by --seed, evaluates its
    own val shard, writes and prints nothing (a SIGTERM in its last step too). The step seeds differ per step and
    per rank. A stop that another process asked for (the flag's all_reduce) stops rank 0 at that step: saved, one
    line, exit 130. On a fake clock (loading 0.25 s an image, a forward 1 s): the global batch's img/s and the
    data share of the time."""
    from torch.utils.data import DistributedSampler
    data = _imagenet_tree(str(tmp_path / "d"), classes=2, n_val=3)  # 16 train, 6 val; batch 8: 2 steps of 4 a rank

    class FakeDDP(torch.nn.Module):
        def __init__(self, module, **_):
            super().__init__()
            self.module = module

        def forward(self, x):
            clock[0] += 1.0
            return self.module(x)

        def no_sync(self):
            return contextlib.nullcontext()
    get = vit_imagenet.Images.__getitem__
    clock = [1e4]  # vit_imagenet's time.time()

    def run(rank, out, stop_at=0):
        loaded, flags = [], []

        def getitem(self, i):
            if self.seed is not None:  # training images
                clock[0] += 0.25
            loaded.append((self.seed, self.epoch, i) if self.seed is not None else i)
            if rank == 1 and loaded[-1] == want[-4]:  # its last training image: a SIGTERM in the last step
                os.kill(os.getpid(), signal.SIGTERM)  # (nothing left to stop), and no line about it
            return get(self, i)

        def all_reduce(t, group="none"):
            if group == "none":  # the loss and evaluation sums: the other process's as this one's
                t.mul_(2)
            else:  # agreed(): the stop flag, plus the other process's, set there at its stop_at-th call
                flags.append(t.item())
                t.add_(float(len(flags) == stop_at))
        argv = ["vit_imagenet.py", "--data-dir", data, "--out-dir", str(out), "--epochs", "2", "--workers", "0",
                "--seed", "5", *IMNET_TINY, "--mixup", "0", "--img-size", "16", "--depth", "1"]  # small: fast
        code = None
        with unittest.mock.patch.object(sys, "argv", argv), \
                unittest.mock.patch.object(vit_imagenet, "setup", return_value=(rank, 2, torch.device("cpu"), None)), \
                unittest.mock.patch.object(vit_imagenet, "DDP", FakeDDP), \
                unittest.mock.patch.object(vit_imagenet.dist, "all_reduce", side_effect=all_reduce), \
                unittest.mock.patch.object(vit_imagenet.dist, "all_gather_object",
                                           side_effect=lambda o, mine, group=None: o.__setitem__(slice(None),
                                                                                                 [mine, mine])), \
                unittest.mock.patch.object(torch, "manual_seed", wraps=torch.manual_seed) as seed, \
                unittest.mock.patch.object(vit_imagenet.Images, "__getitem__", getitem), \
                unittest.mock.patch.object(vit_imagenet, "time", types.SimpleNamespace(time=lambda: clock[0])), \
                contextlib.redirect_stdout(io.StringIO()) as stdout, kept_signals_and_threads():
            try:
                vit_imagenet.main()
            except SystemExit as e:
                code = e.code
        return code, stdout.getvalue(), loaded, [c.args[0] for c in seed.call_args_list][1:]  # [0]: seed_everything
    want = []  # rank 1's loads: per epoch its shard of the permutation, then its half of val/
    for epoch in (0, 1):
        s = DistributedSampler(range(16), 2, 1, shuffle=True, seed=5, drop_last=True)
        s.set_epoch(epoch)
        want += [(5, epoch, i) for i in s] + [1, 3, 5]
    code, out, loaded, seeds1 = run(1, tmp_path / "o1")
    assert code is None and out == "" and not os.path.exists(tmp_path / "o1"), (code, out)
    assert loaded == want, loaded
    assert len(seeds1) == 4 == len(set(seeds1)), seeds1
    code, out, loaded, seeds0 = run(0, tmp_path / "o0", stop_at=4)  # 2 steps, the epoch's end, then step 3
    assert code == 130 and "stopped (another process) at step 3/4" in out, (code, out)
    ck = torch.load(tmp_path / "o0" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 3 and len(seeds0) == 3 and not set(seeds0) & set(seeds1), (ck["step"], seeds0, seeds1)
    assert out.count("| 4 img/s | data 50% |") == 2, out  # the step line, the epoch's: 16 images in 2 + 2 s


def test_imagenet_setup_from_torchruns_environment():
    """setup(): rank and world from RANK and WORLD_SIZE, the GPU from LOCAL_RANK; gloo on CPUs, NCCL on GPUs with
    a gloo group beside; one process without the variables; one line for a LOCAL_RANK beyond the GPUs."""
    env, cpu = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, torch.device("cpu")
    patch = unittest.mock.patch
    with patch.dict(os.environ, env), patch.object(vit_imagenet.dist, "init_process_group") as init:
        assert vit_imagenet.setup("cpu") == (3, 4, cpu, None)
    init.assert_called_once_with("gloo", device_id=None)
    with patch.dict(os.environ), patch.object(vit_imagenet.dist, "init_process_group") as init:
        for k in env:
            os.environ.pop(k, None)
        assert vit_imagenet.setup("cpu") == (0, 1, cpu, None) and not init.called
    for local in (1, 2):
        with patch.dict(os.environ, {**env, "LOCAL_RANK": str(local)}), \
                patch.object(common, "pick_device", return_value=torch.device("cuda")), \
                patch.object(torch.cuda, "device_count", return_value=2), \
                patch.object(torch.cuda, "set_device") as set_device, \
                patch.object(torch, "set_float32_matmul_precision"), \
                patch.object(vit_imagenet.dist, "init_process_group") as init, \
                patch.object(vit_imagenet.dist, "new_group", return_value="gloo group") as new_group, \
                contextlib.redirect_stderr(io.StringIO()) as err:
            try:
                got = vit_imagenet.setup("auto")
            except SystemExit as e:
                got = e.code
        if local == 1:
            gpu = torch.device("cuda", 1)
            assert got == (3, 4, gpu, "gloo group"), got
            set_device.assert_called_once_with(gpu)
            init.assert_called_once_with("nccl", device_id=gpu)
            new_group.assert_called_once_with(backend="gloo")
        else:
            assert got == 2 and "LOCAL_RANK 2 but 2 GPUs" in err.getvalue() and not init.called, err.getvalue()


def test_imagenet_entry_point_errors_and_teardown(tmp_path):
    """The script run as __main__: a collective that failed because another process stopped is one line and exit 2;
    other errors propagate; Ctrl-C before training is exit 130; the process group is destroyed in every case."""
    import runpy
    dist = torch.distributed
    gloo = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234"
    cases = [(RuntimeError(gloo), True, 2, "process 1 stopped too"), (dist.DistError("x"), True, 2, "stopped too"),
             (RuntimeError(gloo), False, RuntimeError, ""), (RuntimeError("a bug"), True, RuntimeError, ""),
             (KeyboardInterrupt(), True, 130, "interrupted: nothing saved")]
    for err, initialized, want, words in cases:
        with unittest.mock.patch.object(sys, "argv", ["vit_imagenet.py", "--data-dir", str(tmp_path)]), \
                unittest.mock.patch.object(common, "check_out_dir", side_effect=err), \
                unittest.mock.patch.object(dist, "is_initialized", return_value=initialized), \
                unittest.mock.patch.object(dist, "get_rank", return_value=1), \
                unittest.mock.patch.object(dist, "destroy_process_group") as destroy, \
                contextlib.redirect_stderr(io.StringIO()) as stderr:
            try:
                runpy.run_path(IMAGENET, run_name="__main__")
                got = None
            except SystemExit as e:
                got = e.code
            except RuntimeError:
                got = RuntimeError
        assert got == want and words in stderr.getvalue(), (err, got, stderr.getvalue())
        assert destroy.call_count == initialized, (err, destroy.call_count)


def test_imagenet_loader_workers_outlive_their_own_signals():
    """A loader worker ignores Ctrl-C (the main process finishes its step, its workers serve it) and a SIGTERM that
    is not its parent's (torchrun signals the whole group); start() leaves this process's signal mask as it was."""
    import multiprocessing
    if multiprocessing.get_start_method() != "fork":  # e.g. forkserver, Python 3.14's default: workers are not ours
        raise unittest.SkipTest(f"workers start by {multiprocessing.get_start_method()}, not fork")

    class Ds(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):  # in the worker
            os.kill(os.getpid(), signal.SIGINT if i == 0 else signal.SIGTERM)
            time.sleep(0.2)
            return torch.zeros(1, dtype=torch.uint8), i
    dl = vit_imagenet.loader(Ds(), 1, argparse.Namespace(workers=1), torch.device("cpu"))
    with unittest.mock.patch.object(Ds, "__len__", return_value=1):  # worker_init alone, SIGINT (a SIGTERM may reach
        assert [y.tolist() for _, y, _ in iter(dl)] == [[0]]  # a thread that the worker started before it: start())
    old = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        it = vit_imagenet.start(dl)  # held while the worker forks, then delivered here again
        assert not {signal.SIGINT, signal.SIGTERM} & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    assert [y.tolist() for _, y, _ in it] == [[0], [1]]


def test_imagenet_predict_feeds_the_eval_crop_normalised(tmp_path):
    """--predict: the image through the eval transform (short side to img_size / crop_pct, center crop), scaled by
    the input statistics (ImageNet's for a state_dict) on 0-255 pixels, into the model in eval mode."""
    from torchvision.transforms.v2 import functional as TF
    torch.save(ViT(img_size=32, patch_size=8, num_classes=3, dim=32, depth=1, heads=2).state_dict(), tmp_path / "w")
    img = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_png(img, str(tmp_path / "x.png"))
    seen, forward = [], common.ViT.forward

    def spy(self, x):
        seen.append((self.training, x.detach().clone()))
        return forward(self, x)
    argv = ["vit_imagenet.py", "--pretrained", str(tmp_path / "w"), "--predict", str(tmp_path / "x.png"), "--device",
            "cpu"]
    with unittest.mock.patch.object(sys, "argv", argv), unittest.mock.patch.object(common.ViT, "forward", spy), \
            contextlib.redirect_stdout(io.StringIO()) as out:
        vit_imagenet.main()
    mean, std = (torch.tensor(v).view(3, 1, 1) * 255 for v in (common.IMAGENET_MEAN, common.IMAGENET_STD))
    want = (TF.center_crop(TF.resize(img, [37]), [32, 32]).float() - mean) / std  # 32 / 0.875 = 36.6
    assert len(seen) == 1 and seen[0][0] is False and torch.allclose(seen[0][1], want[None], atol=1e-5), seen
    assert out.getvalue().splitlines()[-1].startswith(f"{tmp_path / 'x.png'}: 0 33.3%, "), out.getvalue()  # 0 head


# ---------------------------------------------------------------------------------------------------- benchmark

def bench(rounds=8, steps=2):
    """Training throughput (forward + backward + AdamW) of this ViT vs torchvision's (and timm's) of the same shape,
    interleaved in one process; achieved FLOP/s as a share of a large matmul on the same device."""
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast, _, prec = common.precision(dev)
    try:
        import timm
    except ImportError:
        timm = None
        print("timm not installed: its column is skipped")
    dtype = torch.bfloat16 if prec == "bfloat16" else torch.float32
    n = 8192 if dev.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    timed(lambda: a @ b, 3, dev)  # warm up: the first CUDA matmul also creates the cuBLAS handle
    ceiling = 2 * n ** 3 * 10 / timed(lambda: a @ b, 10, dev)
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}), torch {torch.__version__},"
          f" {prec}, {torch.get_num_threads()} threads; {n}x{n} matmul ceiling {ceiling / 1e9:.1f} GFLOP/s")
    configs = [("cifar 32px p4 d192 L6 H3", 32, 4, 192, 6, 3, 128),
               ("ViT-S/16 224px", 224, 16, 384, 12, 6, 256 if dev.type == "cuda" else 16)]
    for name, img, patch, dim, depth, heads, bs in configs:
        mk = lambda: ViT(img_size=img, patch_size=patch, num_classes=10, dim=dim, depth=depth, heads=heads)  # noqa
        models = {"this ViT": mk(), "this ViT #2": mk(),  # a second copy: the noise floor of the ratios
                  "torchvision": torchvision.models.VisionTransformer(img, patch, depth, heads, dim, 4 * dim,
                                                                       num_classes=10)}
        if timm:
            models["timm"] = timm.models.vision_transformer.VisionTransformer(
                img_size=img, patch_size=patch, num_classes=10, embed_dim=dim, depth=depth, num_heads=heads)
        x, y = torch.randn(bs, 3, img, img, device=dev), torch.randint(0, 10, (bs,), device=dev)
        steps_fn = {}
        for k, m in models.items():
            m.to(dev).train()
            opt, = common.make_optimizer(m, 1e-4, 0.05)
            fm = torch.compile(m) if dev.type == "cuda" else m

            def step(fm=fm, opt=opt):
                with autocast():
                    loss = F.cross_entropy(fm(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            for _ in range(2):
                step()  # warm up (and compile)
            steps_fn[k] = step
        with FlopCounterMode(display=False) as fc:
            loss = F.cross_entropy(models["this ViT"](x), y)
            loss.backward()
        flops = fc.get_total_flops()
        times = {k: [] for k in models}
        for r in range(rounds):  # interleaved, order reversed every other round: a background load, a clock change
            for k in list(steps_fn)[::(-1) ** r]:  # or the position in a round hits every model alike
                times[k].append(timed(steps_fn[k], steps, dev) / steps)
        med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
        print(f"\n{name}, batch {bs}: {flops / bs / 1e9:.3f} GFLOP per image (fwd+bwd); medians of {rounds} rounds")
        for k, v in times.items():  # the ratio: the median of the rounds' ratios, each of two adjacent timings
            t, ratio = med(v), med([a / b for a, b in zip(v, times["this ViT"])])
            print(f"  {k:12s} {bs / t:9.1f} img/s  {flops / t / 1e9:8.1f} GFLOP/s  {flops / t / ceiling:6.1%} of matmul"
                  f"  speed ratio this/{k} = {ratio:.3f}")


def bench_aug():
    """vit_cifar's augmentation (policy, erasing, MixUp/CutMix) as a share of a training step of its default model:
    the same step fed by a fixed, pre-made batch or by augment() per batch or in vit_cifar's chunks, interleaved."""
    import argparse
    from torchvision.transforms import v2
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast, _, prec = common.precision(dev)
    cuda = dev.type == "cuda"
    bs, steps, rounds = (512, 32, 5) if cuda else (64, 4, 3)
    chunk = max(1, 8192 // bs)  # steps is a multiple of it on CUDA; on CPU vit_cifar augments per batch
    x_all = torch.randint(0, 256, (chunk * bs, 3, 32, 32), dtype=torch.uint8, device=dev)
    y_all = torch.randint(0, 10, (chunk * bs,), device=dev)
    mean = torch.tensor((0.49, 0.48, 0.45), device=dev).view(1, 3, 1, 1)
    a, gen = argparse.Namespace(policy="trivial", erase=0.25), torch.Generator(dev).manual_seed(0)
    mix = v2.RandomChoice([v2.MixUp(alpha=0.8, num_classes=10), v2.CutMix(alpha=1.0, num_classes=10)])
    model = common.create_vit("cifar_s", drop_path=0.1).to(dev)
    opt, = common.make_optimizer(model, 1e-4, 0.05)
    fm = torch.compile(model) if cuda else model
    fixed, st = mix((x_all[:bs].float() / 255 - mean), y_all[:bs]), {}

    def feed(i, how):  # vit_cifar's loop: augment, normalise, mix
        if how == "per batch" or i % chunk == 0:
            n = bs if how == "per batch" else chunk * bs
            idx = torch.randperm(len(x_all), generator=gen, device=dev)[:n]
            st["x"], st["y"], st["i"] = vit_cifar.augment(x_all[idx], gen, a, mean), y_all[idx], i
        j = (i - st["i"]) * bs
        return mix(st["x"][j:j + bs] - mean, st["y"][j:j + bs])

    def run(how):
        for i in range(steps):
            x, y = fixed if how == "fixed batch" else feed(i, how)
            with autocast():
                loss = F.cross_entropy(fm(x), y, label_smoothing=0.1)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    hows = ["fixed batch", "per batch"] + ([f"chunks of {chunk}"] if cuda else [])
    for h in hows:
        run(h)  # warm up (and compile)
    times = {h: [] for h in hows}
    for r in range(rounds):
        for h in hows[::(-1) ** r]:
            times[h].append(timed(lambda: run(h), 1, dev))
    med = {h: sorted(v)[len(v) // 2] for h, v in times.items()}
    print(f"\naugmentation, cifar_s batch {bs} on {dev} ({prec}), {steps} steps x {rounds} rounds, medians:")
    for h in hows:
        share = 1 - med["fixed batch"] / med[h]
        print(f"  {h:12s} {steps * bs / med[h]:9.1f} img/s  augmentation {share:6.1%} of a step")


def timed(fn, n, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


# ------------------------------------------------------------------------------------------------------- runner

def main():
    p = argparse.ArgumentParser(description="the tests (CPU only), or the throughput benchmark")
    p.add_argument("-k", default="", metavar="TEXT", help="run only the tests whose names contain TEXT")
    p.add_argument("--bench", action="store_true", help="the benchmark (README), not the tests")
    args = p.parse_args()
    if args.bench:
        return bench(), bench_aug()
    tests = [(k, v) for k, v in globals().items() if k.startswith("test_") and callable(v) and args.k in k]
    if not tests:
        p.error(f"no test name contains {args.k!r}")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    t_all = time.time()
    for name, fn in tests:
        t = time.time()
        try:
            with tempfile.TemporaryDirectory() as d:
                import pathlib
                fn(pathlib.Path(d)) if fn.__code__.co_argcount else fn()
            status, why = "passed", ""
        except unittest.SkipTest as e:
            status, why = "skipped", f": {e}"
        except (Exception, SystemExit) as e:  # SystemExit: an unexpected error line, which must not end the run
            import traceback
            why = "".join(traceback.format_exception(type(e), e, e.__traceback__))  # three arguments: Python 3.9
            status, why = "failed", "\n" + why
        counts[status] += 1
        print(f"{status.upper():7s} {name} ({time.time() - t:.1f}s){why}", flush=True)
    print(f"total {time.time() - t_all:.0f}s")
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    sys.exit(1 if counts["failed"] else 0)


if __name__ == "__main__":
    main()
