"""Tests for common.py and the three scripts. CPU only, built on tiny datasets written to temp dirs.

    python test_vit.py            # every test; ends with the line "N passed, N failed, N skipped"
    python test_vit.py -k resume  # the tests whose name contains "resume"
    python test_vit.py --bench    # training throughput vs torchvision (and timm if installed), FLOP/s vs matmul
    python -m pytest test_vit.py  # pytest collects the same functions (tmp_path is its fixture too)
"""
import math
import os
import subprocess
import sys
import tempfile
import time
import unittest

import torch
import torch.nn.functional as F

import common
from common import ViT, create_vit, from_torchvision, resize_pos_embed

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(min(4, os.cpu_count() or 1))


def run(script, *args, check=True, timeout=600):
    """Runs a script of this repo on the CPU; returns the CompletedProcess (text)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], capture_output=True,
                       text=True, cwd=HERE, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout[-2000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p


def assert_clean_error(p, *words):
    """A bad input ends with a non-zero exit and a short message, not a traceback."""
    assert p.returncode != 0, f"expected failure, got exit 0:\n{p.stdout[-1000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    msg = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    for w in words:
        assert w.lower() in msg.lower(), f"{w!r} not in the error line {msg!r}"


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize(model, std=0.02):
    """Random weights everywhere, the zero-initialised head and the LayerNorms included, so parity is not trivial."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
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
        assert feats.shape == (1, grid * grid + 1, cfg["dim"]), (name, feats.shape)
        assert out.shape == (1, cfg.get("num_classes", 1000)), (name, out.shape)


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
                                     mlp_dim=96, num_classes=7)).eval()
    m = ViT(img_size=32, patch_size=4, num_classes=7, dim=64, depth=3, heads=4, mlp_ratio=1.5).eval()
    m.load_state_dict(from_torchvision(tv.state_dict()), strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(m(x), tv(x)) < 1e-5


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
             (lambda: create_vit("vit_huge"), "unknown preset"),
             (lambda: ViT(img_size=32, patch_size=4, dim=30, heads=3, pos_embed="sincos"), "divisible by 4"),
             (lambda: create_vit("cifar_cpu")(torch.randn(1, 3, 64, 64)), "expected input (B, 3, 32, 32)"),
             (lambda: create_vit("cifar_cpu")(torch.randn(1, 1, 32, 32)), "got (1, 1, 32, 32)"),
             (lambda: from_torchvision({"fc.weight": torch.zeros(1)}), "unexpected key")]
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
    opt = common.make_optimizer(m, lr=3e-3, weight_decay=0.0)
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


def test_optimizer_groups_skip_decay_on_norms_biases_tokens():
    m = ViT(img_size=16, patch_size=4, num_classes=3, dim=32, depth=2, heads=2)
    decay, no_decay = common.make_optimizer(m, 1e-3, 0.05).param_groups
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.attn.qkv.bias", "head.bias"} <= nd
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in m.named_parameters() if n not in nd}
    assert "blocks.0.mlp.fc1.weight" not in nd and "patch_embed.proj.weight" not in nd


def test_evaluate_counts_top1_top5():
    class Fixed(torch.nn.Module):  # logits are the input: class i scores x[:, i]
        def forward(self, x):
            return x
    x = torch.tensor([[9., 1, 2, 3, 4, 5, 0], [0, 9, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0, 9]])
    y = torch.tensor([0, 6, 0])  # right; 6 scores 5, in the top 5; 0 scores 5, second
    loss, top1, top5, n = common.evaluate(Fixed(), [(x[:2], y[:2]), (x[2:], y[2:])]).tolist()
    assert (top1, top5, n) == (1, 3, 3)
    assert math.isclose(loss, F.cross_entropy(x, y, reduction="sum").item(), rel_tol=1e-6)


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
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    errors = [(lambda: common.load_checkpoint(path), "corrupt, truncated"),
              (lambda: common.load_checkpoint(str(tmp_path / "none.pt")), "not found"),
              (lambda: common.load_weights(ViT(img_size=16, patch_size=4, num_classes=5, dim=32, depth=1, heads=2),
                                           m.state_dict()), "head.weight (3, 32) vs (5, 32)"),
              (lambda: common.load_weights(m2, {"fc.weight": torch.zeros(1)}), "unexpected (e.g. fc.weight)")]
    for fn, words in errors:
        try:
            fn()
        except common.CheckpointError as e:
            assert words in str(e) and "\n" not in str(e), str(e)
        else:
            raise AssertionError(f"no CheckpointError for {words}")


# ---------------------------------------------------------------------------------------------------- benchmark

def bench(rounds=5, steps=3):
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
    ceiling = 2 * n ** 3 * 10 / timed(lambda: a @ b, 10, dev)
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}), torch {torch.__version__},"
          f" {prec}, {torch.get_num_threads()} threads; {n}x{n} matmul ceiling {ceiling / 1e9:.1f} GFLOP/s")
    configs = [("cifar 32px p4 d192 L6 H3", 32, 4, 192, 6, 3, 128),
               ("ViT-S/16 224px", 224, 16, 384, 12, 6, 256 if dev.type == "cuda" else 16)]
    for name, img, patch, dim, depth, heads, bs in configs:
        models = {"this ViT": ViT(img_size=img, patch_size=patch, num_classes=10, dim=dim, depth=depth, heads=heads),
                  "torchvision": torchvision.models.VisionTransformer(img, patch, depth, heads, dim, 4 * dim,
                                                                       num_classes=10)}
        if timm:
            models["timm"] = timm.models.vision_transformer.VisionTransformer(
                img_size=img, patch_size=patch, num_classes=10, embed_dim=dim, depth=depth, num_heads=heads)
        x, y = torch.randn(bs, 3, img, img, device=dev), torch.randint(0, 10, (bs,), device=dev)
        steps_fn = {}
        for k, m in models.items():
            m.to(dev).train()
            opt = common.make_optimizer(m, 1e-4, 0.05)
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
        for _ in range(rounds):  # interleaved, so a background load or clock change hits every model alike
            for k, fn in steps_fn.items():
                times[k].append(timed(fn, steps, dev) / steps)
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"\n{name}, batch {bs}: {flops / bs / 1e9:.3f} GFLOP per image (fwd+bwd)")
        for k, t in med.items():
            print(f"  {k:12s} {bs / t:9.1f} img/s  {flops / t / 1e9:8.1f} GFLOP/s  {flops / t / ceiling:6.1%} of matmul"
                  f"  this/{k} = {t / med['this ViT']:.3f}")


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
    if "--bench" in sys.argv:
        return bench()
    pattern = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else ""
    tests = [(k, v) for k, v in globals().items() if k.startswith("test_") and callable(v) and pattern in k]
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
        except Exception as e:
            import traceback
            status, why = "failed", "\n" + "".join(traceback.format_exception(e))
        counts[status] += 1
        print(f"{status.upper():7s} {name} ({time.time() - t:.1f}s){why}", flush=True)
    print(f"total {time.time() - t_all:.0f}s")
    print(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    sys.exit(1 if counts["failed"] else 0)


if __name__ == "__main__":
    main()
