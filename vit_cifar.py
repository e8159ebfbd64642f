"""vit_cifar.py: a plain ViT trained from scratch on CIFAR-10 / CIFAR-100. The dataset lives on the device as uint8;
crop, flip, a per-sample TrivialAugment-style policy, random erasing (and MixUp/CutMix if asked) run there in batches.

    python vit_cifar.py --compile                              # GPU: cifar_s, 100 epochs, bf16 autocast
    python vit_cifar.py --dataset cifar100 --compile
    python vit_cifar.py --resume runs/cifar10/ckpt.pt          # continue exactly where a run stopped
    python vit_cifar.py --eval-only --resume runs/cifar10/ckpt.pt
    python vit_cifar.py --predict cat.jpg dog.png --resume runs/cifar10/ckpt.pt
    python vit_cifar.py --pretrained vit_b_16                 # fine-tune torchvision's ImageNet ViT-B/16 at 224 px
    python vit_cifar.py --pretrained vit_b_16 --freeze       # a linear probe: only the new head learns

Measured, CIFAR-10 (README.md has every run). One H100, torch 2.11.0+cu130, bf16, the defaults (cifar_s: patch 4,
dim 384, depth 7, 12.4M params; 100 epochs of batch 128, AdamW lr 4e-4, TrivialAugment-style policy, erasing, EMA):
    python vit_cifar.py --compile --data-dir DATA   # 86.76% (EMA with flip 87.18%) in 923.2 s, sharing the GPU with
    two other runs, before cuDNN's attention was turned off: short of the 92% / 94% targets. CIFAR-100: not measured.
An idle 2-core AMD EPYC Zen3 VM, torch 2.14.1, fp32, the CPU recipe (CPU below: what runs where there is no GPU):
    python vit_cifar.py --data-dir DATA             # 79.28% (79.61% with test-time flip) in 25m09.2s, 0.31M params;
    --seed 1: 79.13% in 26m46.9s; --epochs 4: 73.02% in 10m24.4s. A CPU that others use: OMP_WAIT_POLICY=PASSIVE.
"""
import argparse
import contextlib
import inspect
import json
import math
import os
import pickle
import signal
import sys
import time

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.transforms import v2
from torchvision.utils import save_image

import common as C

DATASETS = {  # dir, train files, test file, label key, meta file, class-name key, mean, std
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels",
                "batches.meta", "label_names", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", "meta", "fine_label_names",
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
CONTROL = ("resume", "ckpt", "eval_only", "predict", "interrupt_at", "device", "threads", "compile", "out_dir")
# what a checkpoint fixes: given with one, a flag must match it (a shape flag may also match the model's own shape)
FIXED = dict(dataset="", model="", batch_size="", patch="patch_size", dim="dim", depth="depth", heads="heads",
             mlp_ratio="mlp_ratio", pool="pool", pos_embed="pos_embed", img_size="img_size", seed="", aug_chunk="",
             optimizer="", freeze="", layer_decay="")  # the last five: the RNG streams and the optimizer's groups
# --pretrained's recipe: a short, gentle schedule without the from-scratch regularisers; flags given still win
FINETUNE = dict(epochs=10, batch_size=128, lr=1e-4, warmup=1, weight_decay=0.05, policy="none", mixup=0.0,
                cutmix=0.0, erase=0.0, ema=0.0, drop_path=0.1)
# the CPU recipe (--recipe cpu, the default where there is no GPU): a small model, 11 epochs, Muon; flags given win
CPU = dict(model="cifar_cpu", dim=96, heads=3, depth=4, pool="mean", pos_embed="sincos", epochs=11, batch_size=64,
           lr=2e-3, warmup=0.5, policy="none", mixup=0.0, cutmix=0.0, erase=0.0, drop_path=0.0, ema=0.0,
           optimizer="muon", eval_every=3)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,  # whole names: the
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # resume line drops them
    a = p.add_argument
    a("--dataset", default="cifar10", choices=list(DATASETS), help="which CIFAR")
    a("--data-dir", default="./data", help="holds cifar-10-batches-py/ or cifar-100-python/ (downloaded if missing)")
    a("--out-dir", default=None, help="for ckpt.pt, logs, pictures; None: runs/<dataset>, or the --resume ckpt's dir")
    a("--epochs", type=int, default=100, help="the run's total number of epochs (also when resuming)")
    a("--batch-size", type=int, default=128, help="training batch size")
    a("--lr", type=float, default=4e-4, help="peak learning rate (AdamW's, and Muon's with --optimizer muon)")
    a("--weight-decay", type=float, default=0.05, help="decay of weight matrices (AdamW's, Muon's: times the lr)")
    a("--optimizer", default="adamw", choices=["adamw", "muon"],
      help="muon: Muon for the blocks' weight matrices (common.Muon), AdamW for the rest")
    a("--warmup", type=float, default=5, help="linear warmup epochs, then cosine to 0 per step")
    a("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    a("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    a("--policy", default="trivial", choices=["trivial", "none"], help="per-sample TrivialAugment-style ops or none")
    a("--mixup", type=float, default=0.0, help="MixUp Beta alpha (0: off); MixUp or CutMix picked per batch")
    a("--cutmix", type=float, default=0.0, help="CutMix Beta alpha (0: off)")
    a("--erase", type=float, default=0.25, help="random erasing probability per image")
    a("--ema", type=float, default=0.999, help="EMA decay per step of the weights' average (0: no EMA)")
    a("--aug-chunk", type=int, default=0, help="batches augmented per call (0: ~8192 images on CUDA, 1 on CPU)")
    a("--model", default="cifar_s", choices=[k for k in C.PRESETS if k.startswith("cifar")], help="common.py preset")
    for f, t in [("patch", int), ("dim", int), ("depth", int), ("heads", int), ("mlp-ratio", float)]:
        a(f"--{f}", type=t, default=None, help="override the preset's value" + (" (with --pretrained: the guess "
          "for a file, the published ViTs' for its width)" if f == "heads" else ""))
    a("--pool", default="mean", choices=["cls", "mean"], help="class token or mean of the patch tokens")
    a("--pos-embed", default="sincos", choices=["learn", "sincos"], help="learned or fixed 2-D sin-cos")
    a("--img-size", type=int, default=0, help="images are resized to this on the device (0: 32, or the weights' size)")
    a("--pretrained", default=None, metavar="SOURCE", help="start from ViT weights: a torchvision name (vit_b_16, "
      "vit_b_16:IMAGENET1K_SWAG_E2E_V1), or a torchvision / timm state_dict or ckpt.pt file; sets the fine-tuning "
      f"recipe {FINETUNE} for the flags not given; the model's shape comes from the weights")
    a("--recipe", default="auto", choices=["auto", "full", "cpu"], help="full: the defaults shown here (for a GPU); "
      f"cpu: {CPU} for the flags not given, but a --model given keeps its sizes (2 CPU cores: ~79%% in ~25 min); "
      "auto: cpu when the device is a CPU; not used with --resume (the run's own) or --pretrained (its recipe)")
    a("--freeze", action="store_true", help="train only the new head (a linear probe; recipe lr 1e-3, drop-path 0)")
    a("--layer-decay", type=float, default=1.0, help="layer-wise lr decay per block from the head down (1: off)")
    a("--drop-path", type=float, default=0.1, help="stochastic depth rate of the last block")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    a("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default)")
    a("--seed", type=int, default=0, help="seeds the model init, data order and augmentation")
    a("--compile", nargs="?", const="default", choices=["default", "reduce-overhead"],
      help="torch.compile the training model (--compile: mode default); reduce-overhead: CUDA graphs, for a run "
      "bound by its CPU side (on the H100 the default model was; this mode there: not yet measured)")
    a("--resume", default=None, metavar="CKPT", help="continue from this checkpoint: its args, but for those given "
      "again; its dataset, model, batch size, seed, --aug-chunk and optimizer set-up stay (another value: an error; "
      "--weight-decay may change, not to or from 0)")
    a("--eval-only", action="store_true", help="evaluate --resume CKPT (default <out-dir>/ckpt.pt), or --pretrained "
      "SOURCE, and exit")
    a("--predict", nargs="+", default=None, metavar="FILE", help="print top-5 classes of image files and exit")
    a("--eval-every", type=int, default=1, help="test-set evaluation every N epochs (and always at the end)")
    a("--log-every", type=int, default=50, help="progress line every N steps")
    a("--interrupt-at", type=int, default=0, help="testing aid: send SIGTERM to itself at this global step (0: off)")
    args, given = p.parse_args(argv), C.given_args(p, argv)
    args.arch = args.mean = args.std = None  # the ViT's keyword arguments and the input statistics, saved in ckpt.pt
    if args.predict and args.pretrained and not args.resume:
        p.error("--predict takes a checkpoint of this script: --resume CKPT (after a fine-tune: <out-dir>/ckpt.pt)")
    C.check_pretrained_flags(p, args, given, ("model", "patch", "dim", "depth", "mlp_ratio", "pool", "pos_embed"))
    args.ckpt = args.resume or (os.path.join(args.out_dir or os.path.join("runs", args.dataset), "ckpt.pt")
                                if (args.eval_only and not args.pretrained) or args.predict else None)
    if args.ckpt:  # the checkpoint's args, overridden by those given again on this command line
        saved = load_ckpt(args.ckpt)["args"]
        arch = {k: v.default for k, v in inspect.signature(C.ViT).parameters.items()}  # the ViT's defaults, then
        arch.update(saved.get("arch") or {})  # the checkpoint model's own values
        old = {k: arch.get(FIXED[k], saved.get(k, p.get_default(k))) for k in FIXED}  # a flag newer than ckpt.pt
        old["weight_decay"] = saved.get("weight_decay")
        clash = [k for k in FIXED if k in given and getattr(args, k) not in (saved.get(k), old[k])
                 and (k, getattr(args, k)) != ("img_size", 0)]  # --img-size 0: whatever the model has
        if "weight_decay" in given and (args.weight_decay == 0) != (saved.get("weight_decay") == 0):
            clash = ["weight_decay"]  # 0 merges the decayed and undecayed groups: the optimizer state would not fit
        if clash:
            k = clash[0]
            p.error(f"--{k.replace('_', '-')} {getattr(args, k)}, but {args.ckpt} has {old[k]}: a checkpoint keeps "
                    "its dataset, model, batch size, seed, --aug-chunk and optimizer set-up")
        if args.resume and "pretrained" in given:  # documented: the checkpoint wins
            print(f"note: --resume {args.resume} wins over --pretrained {args.pretrained}", flush=True)
        args = argparse.Namespace(**{**vars(args), **{k: v for k, v in saved.items() if k not in CONTROL},
                                     **{k: getattr(args, k) for k in given if k != "pretrained" or not args.resume}})
        args.out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.ckpt))
    elif args.pretrained:
        C.apply_recipe(args, FINETUNE, given)
    elif args.recipe == "cpu" or args.recipe == "auto" and (args.device == "cpu" or not torch.cuda.is_available()):
        args.recipe = "cpu"  # a 100-epoch run of cifar_s would take days on a CPU; a --model given keeps its sizes
        sizes = ("dim", "heads", "depth") if "model" in given else ()
        C.apply_recipe(args, {k: v for k, v in CPU.items() if k not in sizes}, given)
        print("note: the CPU recipe for the flags not given (--recipe full: the defaults of --help)", flush=True)
    args.out_dir, args.data_dir = args.out_dir or os.path.join("runs", args.dataset), os.path.abspath(args.data_dir)
    C.check_ranges(p, args, {
        "> 0": "epochs batch_size eval_every log_every lr patch dim depth heads mlp_ratio layer_decay",
        ">= 0": "weight_decay warmup clip_grad label_smoothing mixup cutmix erase ema aug_chunk img_size drop_path "
                "threads interrupt_at seed", "< 1": "label_smoothing ema drop_path", "<= 1": "erase layer_decay",
        "< 4294967296": "seed"})  # 2**32
    if args.patch is not None and (args.img_size or 32) % args.patch:
        p.error(f"--patch {args.patch} does not divide the {args.img_size or 32} px image")
    if args.warmup > args.epochs:
        p.error(f"--warmup {args.warmup:g} is more than --epochs {args.epochs}: the lr would never reach its peak")
    dim, heads = (getattr(args, k) or C.PRESETS[args.model][k] for k in ("dim", "heads"))
    if not (args.ckpt or args.pretrained) and dim % heads:  # before the data loads; the weights' shape is checked there
        k = next((k for k in ("heads", "dim") if k not in given), None)  # the value the user did not give, if any
        src = {k: " (the CPU recipe's)" if args.recipe == "cpu" and "model" not in given else f" (the {args.model} "
               "preset's)"} if k else {}
        p.error(f"--dim {dim}{src.get('dim', '')} is not divisible by --heads {heads}{src.get('heads', '')}" +
                (f": give --{k} too" if k else ""))
    return args


def load_ckpt(path):
    try:
        ck = C.load_checkpoint(path, required=("model", "args", "classes"))
    except C.CheckpointError as e:
        C.die(str(e))
    if not (isinstance(ck["args"], dict) and isinstance(ck["classes"], list)):
        C.die(f"checkpoint {path} has no args dict and class list: not a checkpoint of this script")
    if ck["args"].get("dataset") not in DATASETS:  # e.g. vit_imagenet.py's
        C.die(f"checkpoint {path} is not one of vit_cifar.py (no CIFAR dataset in its args): --pretrained {path} "
              "starts from its weights")
    return ck

# ------------------------------------------------------------------------------------------------------------ data


def load_cifar(name, root):
    """{'train': (uint8 (N, 3, 32, 32), int64 (N,)), 'test': ...} and the class names, from the python batches."""
    sub, train, test, key, meta, names_key = DATASETS[name][:6]
    d = os.path.join(root, sub)
    if os.path.isfile(os.path.join(root, train[0])) and not os.path.isdir(d):  # else a download would land in there
        C.die(f"--data-dir {root} is the batches folder itself: give the folder that holds {sub}/")
    if not all(os.path.isfile(os.path.join(d, f)) for f in train + [test, meta]):
        try:
            import torchvision.datasets as tvd
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # no progress bar
                (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(root, download=True)
        except Exception as e:
            C.die(f"{name} is not in {d} and downloading it failed ({type(e).__name__}): put the python-version "
                  f"batches ({', '.join(train + [test, meta])}) in {d}")
    out = {}
    for f in [meta] + train + [test]:
        try:
            with open(os.path.join(d, f), "rb") as fh:
                b = pickle.load(fh, encoding="latin1")
            if f == meta:
                classes = list(b[names_key])
                continue
            kind = str(getattr(b["data"], "dtype", type(b["data"]).__name__))
            if kind != "uint8":  # as_tensor would cast floats in [0, 1] to zeros, silently
                raise ValueError(f"its data is {kind}, not uint8")
            x, y = torch.as_tensor(b["data"], dtype=torch.uint8), torch.as_tensor(b[key], dtype=torch.long)
            if x.ndim != 2 or x.shape[1] != 3072 or y.shape != x.shape[:1] or y.min() < 0 or y.max() >= len(classes):
                raise ValueError(f"images {tuple(x.shape)}, labels {tuple(y.shape)} in {y.min()}..{y.max()}")
        except Exception as e:
            C.die(f"{os.path.join(d, f)} is truncated or not a CIFAR batch of (N, 3072) uint8 images and N labels "
                  f"< {len(classes) if f != meta else '?'} ({type(e).__name__}: {str(e)[:80]})")
        split = "test" if f == test else "train"
        xs, ys = out.get(split, ([], []))
        out[split] = xs + [x.view(-1, 3, 32, 32)], ys + [y]  # rows are R, G, B planes of 32x32
    return {k: (torch.cat(xs), torch.cat(ys)) for k, (xs, ys) in out.items()}, classes


def augment(x, gen, args, mean):
    """uint8 (B, 3, 32, 32) -> float in [0, 1]. Each sample draws its own crop offset, flip, policy op and magnitude.
    (torchvision's v2.TrivialAugmentWide draws one op per call, i.e. per batch, so the ops are written here.)"""
    B, dev = x.shape[0], x.device
    r = lambda *s: torch.rand(*s, generator=gen, device=dev)
    x = x.float() / 255
    trivial = args.policy == "trivial"
    op = torch.randint(0, 13, (B,), generator=gen, device=dev) if trivial else torch.zeros(B, device=dev)
    mag = r(B) * torch.where(r(B) < 0.5, -1.0, 1.0)  # signed, in (-1, 1); ranges below: narrower than TA-Wide's
    # the padded crop, the flip and the geometric ops as one affine map per sample: (B, 2, 3) in [-1, 1] units
    shift = torch.randint(-4, 5, (B, 2), generator=gen, device=dev) * 2 / 32  # pad 4 + crop 32
    flip = torch.where(r(B) < 0.5, -1.0, 1.0)
    c, s = ((op == 5) * mag * 0.52).cos(), ((op == 5) * mag * 0.52).sin()  # rotate <= 30 degrees
    sx, sy = (op == 1) * mag * 0.3, (op == 2) * mag * 0.3  # shear <= 0.3
    move = shift + torch.stack([(op == 3) * mag, (op == 4) * mag], 1) * 0.5  # translate <= 8 px
    lin = torch.stack([(c - s * sy) * flip, c * sx - s, (s + c * sy) * flip, s * sx + c], 1)  # rot @ shear @ flip
    theta = torch.cat([lin.view(B, 2, 2), move[:, :, None]], 2)
    grid = F.affine_grid(theta, (B, 3, 32, 32), align_corners=False)
    x = F.grid_sample(x, grid, mode="nearest", padding_mode="reflection", align_corners=False)
    if trivial:  # colour ops as blends with a degenerate image, factor 1 + 0.9 * mag
        f = (1 + 0.9 * mag).view(B, 1, 1, 1)
        gray = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]  # no new tensors: a CUDA copy would sync
        blur = (F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1) * 9 + 4 * x) / 13  # PIL's SMOOTH
        lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        bits = (8 - (mag.abs() * 6).round()).view(B, 1, 1, 1)  # posterize to 2..8 bits
        cands = [x * f, gray + f * (x - gray), gray.mean((2, 3), keepdim=True) * (1 - f) + f * x, blur + f * (x - blur),
                 torch.floor(x * 255 / 2 ** (8 - bits)) * 2 ** (8 - bits) / 255,
                 torch.where(x >= 1 - mag.abs().view(B, 1, 1, 1), 1 - x, x),  # solarize
                 torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-3), x)]  # autocontrast; a flat channel stays
        for i, c in enumerate(cands):  # ops 6..12; 0 is identity, 1..5 were geometric
            x = torch.where((op == 6 + i).view(B, 1, 1, 1), c, x)
        x = x.clamp(0, 1)
    if args.erase > 0:  # random erasing: a rectangle of 2-33% of the area, aspect 0.3-3.3, set to the mean colour
        area, logr = (0.02 + 0.31 * r(B)) * 1024, (r(B) * 2 - 1) * 1.2
        h, w = (area * logr.exp()).sqrt().clamp(1, 32), (area / logr.exp()).sqrt().clamp(1, 32)
        y0, x0 = r(B) * (32 - h), r(B) * (32 - w)
        ar = torch.arange(32, device=dev) + 0.5  # pixel centres: the first row and column as likely as the last
        box = ((ar >= y0[:, None]) & (ar < (y0 + h)[:, None]))[:, :, None] & \
              ((ar >= x0[:, None]) & (ar < (x0 + w)[:, None]))[:, None, :]  # (B, 32, 32)
        x = torch.where((box & (r(B) < args.erase)[:, None, None])[:, None], mean.view(1, 3, 1, 1), x)
    return x

# ----------------------------------------------------------------------------------------------------------- model


def build_model(args, num_classes):
    """The ViT of args.arch (from --pretrained weights or a checkpoint), else of the preset and the size flags."""
    if not args.arch:
        over = {k: v for k, v in dict(patch_size=args.patch, dim=args.dim, depth=args.depth, heads=args.heads,
                                      mlp_ratio=args.mlp_ratio).items() if v is not None}
        args.arch = {**{k: v for k, v in C.PRESETS[args.model].items() if k != "num_classes"}, **over,
                     "img_size": args.img_size or 32, "pool": args.pool, "pos_embed": args.pos_embed}
    try:
        return C.ViT(**args.arch, num_classes=num_classes, drop_path=args.drop_path)
    except ValueError as e:
        C.die(f"bad model flags: {e}")


@torch.no_grad()
def save_attention(model, x, prep, path):
    """8 test images beside the last block's attention (class token's, or mean over queries), heads averaged."""
    a = model.attention_maps(prep(x))[-1].mean(1)  # (B, N, N)
    a = a[:, 0, 1:] if model.pool == "cls" else a.mean(1)  # (B, g*g)
    g = int(a.shape[1] ** 0.5)
    a = a.view(-1, 1, g, g)
    a = (a - a.amin((2, 3), keepdim=True)) / (a.amax((2, 3), keepdim=True) - a.amin((2, 3), keepdim=True) + 1e-8)
    a = F.interpolate(a, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    tiles = torch.stack([x, a, x * (0.25 + 0.75 * a)], 1).flatten(0, 1)  # (B, 3, C, H, W) -> (3B, C, H, W)
    save_image(F.interpolate(tiles, scale_factor=3, mode="nearest"), path, nrow=6, padding=2, pad_value=1.0)

# ------------------------------------------------------------------------------------------------------------ main
COLUMNS = ["epoch", "train_loss", "test_loss", "test_acc", "lr", "img_per_s", "elapsed_s"]


def main():
    args = get_args()
    device = C.pick_device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cuda = device.type == "cuda"

    def mark():  # a time stamp: on CUDA an event, read after the next log line's sync, so timing adds no sync
        if not cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # fp32 leftovers on GPU
    autocast, scaler, prec = C.precision(device)  # on CUDA also cuDNN's attention off: NaN seen at batch 128
    ckpt_path, ck = os.path.join(args.out_dir, "ckpt.pt"), load_ckpt(args.ckpt) if args.ckpt else None
    models, (data, classes) = {}, (None, ck["classes"]) if ck else load_cifar(args.dataset, args.data_dir)
    C.seed_everything(args.seed)
    if args.pretrained and not ck:  # the shape, the input size and statistics come from the weights
        try:
            raw, info = C.load_pretrained(args.pretrained, len(classes), args.img_size, classes,
                                          drop_path=args.drop_path, **({"heads": args.heads} if args.heads else {}))
        except C.CheckpointError as e:
            C.die(str(e))
        args.arch, args.mean, args.std = info["arch"], info["mean"], info["std"]
        models = {"pretrained": raw.to(device)}
    else:
        raw = build_model(args, len(classes)).to(device)
    args.img_size, args.mean, args.std = args.arch["img_size"], args.mean or DATASETS[args.dataset][6], \
        args.std or DATASETS[args.dataset][7]
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (args.mean, args.std))
    size = args.img_size

    def prep(x):  # float [0, 1] (B, 3, 32, 32) -> normalised (B, 3, size, size); the resize is on the device too
        x = x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (x - mean) / std

    if ck and (args.eval_only or args.predict):  # the raw and the EMA weights of the checkpoint
        models = {k: build_model(args, len(classes)).to(device).eval() for k in ("model", "ema") if ck.get(k)}
        try:
            for k, m in models.items():
                C.load_weights(m, ck[k], f"checkpoint's {k}")
            # at CIFAR's 32 px, then prep() resizes as in training: a photo straight to 224 px is sharper than the
            # upsampled CIFAR images a fine-tuned model saw
            x = torch.stack([C.read_image(f, 32) for f in args.predict or []] or [torch.zeros(3, 32, 32)])
        except (C.CheckpointError, ValueError) as e:
            C.die(str(e))
        if args.predict:  # EMA weights when there are, test-time flip
            m, x = models.get("ema", models["model"]), prep(x.to(device))
            with torch.no_grad(), autocast():
                return C.print_top5((m(x).float() + m(x.flip(-1)).float()) / 2, args.predict, classes)
    if data is None:  # the checkpoint's classes came first
        data, names = load_cifar(args.dataset, args.data_dir)
        if names != classes:
            C.die(f"{args.dataset} in {args.data_dir} has {len(names)} classes ({names[0]}, ...), the checkpoint's "
                  f"model {len(classes)} ({classes[0]}, ...)")
    (xtr, ytr), (xte, yte) = [(x.to(device), y.to(device)) for x, y in (data["train"], data["test"])]

    def test(m, flip=False):  # (loss, top-1 %)
        s = C.evaluate(m, ((prep(xte[i:i + 500].float() / 255), yte[i:i + 500]) for i in range(0, len(xte), 500)),
                       autocast, flip).tolist()
        return s[0] / s[3], 100 * s[1] / s[3]

    if args.eval_only:
        if "pretrained" in models and not info["head_kept"]:  # a new, zero head would score chance
            C.die(f"{args.pretrained} has no head for these {len(classes)} classes: fine-tune it first, then "
                  f"--eval-only --resume {os.path.join(args.out_dir, 'ckpt.pt')}")
        for k, m in models.items():
            (lo, ac), (lf, af) = test(m), test(m, flip=True)
            print(f"{k} | test loss {lo:.4f} acc {ac:.2f}% | with flip: loss {lf:.4f} acc {af:.2f}%")
        return
    n, bs = len(xtr), args.batch_size
    spe = n // bs  # steps per epoch; the last partial batch is dropped
    # batches augmented per draw and the RNG state before it: on CUDA ~8k images, as kernel launches dominate there
    # (13% of a step with one batch per draw, 4% in chunks, H100); on CPU one batch, as it stays in the cache
    chunk, gen_chunk = args.aug_chunk or (max(1, 8192 // bs) if cuda else 1), None
    if spe == 0:
        C.die(f"--batch-size {bs} is larger than the {n} training images")
    total, warm = args.epochs * spe, round(args.warmup * spe)
    if args.freeze:
        C.freeze_all_but_head(raw)
    opts = C.make_optimizer(raw, args.lr, args.weight_decay, layer_decay=args.layer_decay,
                            muon=args.optimizer == "muon")
    ema = AveragedModel(raw, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    gen = torch.Generator(device)  # data order and augmentation draws; the global RNG drives mixing and drop-path
    gen.manual_seed(args.seed)
    epoch, batch, step, perm, sums, elapsed = 0, 0, 0, None, [0.0, 0], 0.0
    if ck:
        try:
            C.load_weights(raw, ck["model"])
            if ema is not None:
                C.load_weights(ema.module, ck.get("ema") or {}, "checkpoint's EMA (resume with --ema 0 if it has none)")
                ema.n_averaged.fill_(ck["ema_n"])
            C.load_optimizers(opts, ck["optimizer"])
            for g in [g for o in opts for g in o.param_groups if g["weight_decay"]]:  # --weight-decay given again
                g["weight_decay"] = args.weight_decay
            scaler.load_state_dict(ck["scaler"])
            torch.set_rng_state(ck["rng"]["cpu"])
            made_on = "cuda" if ck["rng"]["cuda"] else "cpu"  # the data order's generator lives on the device
            if made_on != device.type:
                raise ValueError(f"it was made on {made_on}: resume it there (--device {made_on})")
            gen.set_state(ck["rng"]["gen"])
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"]) if cuda and ck["rng"]["cuda"] else None
            if ck.get("n_train", n) != n:
                raise ValueError(f"its run had {ck['n_train']} training images, {args.data_dir} has {n}")
            epoch, batch, step, perm, sums, elapsed = (ck[k] for k in ("epoch", "batch", "step", "perm", "sums",
                                                                       "elapsed"))
            if epoch + (batch > 0) > args.epochs:
                raise ValueError(f"it is at step {step}, in epoch {epoch + (batch > 0)} of its run: --epochs "
                                 f"{args.epochs} ends before")
        except (C.CheckpointError, KeyError, ValueError, RuntimeError, TypeError) as e:
            C.die(f"cannot resume from {args.ckpt}: " + (f"it has no {e} (a checkpoint of another script?)" if
                  isinstance(e, KeyError) else str(e).splitlines()[0][:200]))
    C.check_out_dir(args.out_dir, args.ckpt if ck else None)  # another run's ckpt.pt or log.csv stays
    model = torch.compile(raw, mode=args.compile) if args.compile else raw  # ckpt.pt and EMA: the raw module
    mix = [m(alpha=a, num_classes=len(classes)) for m, a in ((v2.MixUp, args.mixup), (v2.CutMix, args.cutmix)) if a]
    mix = v2.RandomChoice(mix) if mix else None
    log = C.Logger(args.out_dir, COLUMNS, append=bool(ck))
    with open(os.path.join(args.out_dir, "args.json"), "w") as f:
        json.dump(vars(args), f, indent=1)
    stop, t_start = C.StopFlag(), time.time() - elapsed

    def save(epoch, batch):  # everything to continue bit-exactly from step `step`
        g = gen_chunk if batch % chunk and batch < spe else gen.get_state()  # mid-chunk: redraw the chunk on resume
        rng = dict(cpu=torch.get_rng_state(), gen=g, cuda=torch.cuda.get_rng_state_all() if cuda else [])
        C.save_checkpoint(dict(model=raw.state_dict(), ema=ema.module.state_dict() if ema else None,
                               ema_n=int(ema.n_averaged) if ema else 0, rng=rng, scaler=scaler.state_dict(),
                               optimizer=[o.state_dict() for o in opts], epoch=epoch, batch=batch, step=step, sums=sums,
                               perm=perm.cpu() if batch else None, elapsed=time.time() - t_start, n_train=n,
                               args=vars(args), classes=classes), ckpt_path)

    log(f"{args.dataset}: {n} train / {len(xte)} test images on {device} ({prec}) | "
        f"{f'{args.pretrained} (pretrained)' if args.pretrained else args.model} {size}px "
        f"patch {args.arch['patch_size']} dim {args.arch['dim']} depth {args.arch['depth']} "
        f"{sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M params | {spe} steps/epoch | from step {step}")
    lr = C.lr_at(max(step - 1, 0), total, args.lr, warm)  # the last step's: a stop at an epoch's end resumes there
    try:
        for epoch in range(epoch, args.epochs):
            if batch == 0:
                perm, sums = torch.randperm(n, generator=gen, device=device), [0.0, 0]
            perm, t_ep, b0, run_loss, aug_t, marks = perm.to(device), time.time(), batch, 0.0, 0.0, []
            t_log, s_log = time.time(), step
            for batch in range(batch, spe):
                if batch % chunk == 0 or batch == b0:  # augment `chunk` batches at once: far fewer kernel launches
                    t0, c0, gen_chunk = mark(), batch - batch % chunk, gen.get_state()
                    xa = augment(xtr[perm[c0 * bs:min(c0 + chunk, spe) * bs]], gen, args, mean)
                    marks.append((t0, mark()))
                x, y = prep(xa[(batch - c0) * bs:(batch - c0 + 1) * bs]), ytr[perm[batch * bs:(batch + 1) * bs]]
                x, y = mix(x, y) if mix else (x, y)  # y: (B,) class ids, or (B, classes) mixed soft targets
                lr = C.lr_at(step, total, args.lr, warm)
                C.set_lr(opts, lr)
                with autocast():
                    loss = F.cross_entropy(model(x), y, label_smoothing=args.label_smoothing)
                scaler.scale(loss).backward()
                C.optimizer_step(opts, scaler, raw.parameters(), args.clip_grad)
                if ema is not None:
                    C.ema_update(ema, raw, first=step == 0)
                step, run_loss = step + 1, run_loss + loss.detach()  # no host sync until a log line
                if step == args.interrupt_at:  # before the log line: a stop logs the loss since the last one
                    os.kill(os.getpid(), signal.SIGTERM)
                if step % args.log_every == 0 or batch == spe - 1 or stop:
                    k, lsum, now = step - s_log, float(run_loss), time.time()  # float(): the host waits, then the clock
                    if not math.isfinite(lsum):  # checked before every save; C.save_checkpoint checks the weights
                        C.die(f"the training loss became {lsum} by step {step} (lr {lr:.1e}); stopped, " +
                              (f"{ckpt_path} keeps the last good state" if os.path.exists(ckpt_path) else
                               "nothing saved") + ": try a lower --lr or a longer --warmup")
                    sums = [sums[0] + lsum, sums[1] + k]
                    aug_t += sum(a.elapsed_time(b) / 1e3 if cuda else b - a for a, b in marks)
                    marks.clear()
                    log(f"ep {epoch + 1}/{args.epochs} | step {step}/{total} | loss {lsum / k:.4f} | "
                        f"lr {lr:.2e} | {k * bs / (now - t_log):.0f} img/s | aug {100 * aug_t / (now - t_ep):.1f}%"
                        f" | eta {C.fmt_time((total - step) * (now - t_ep) / (batch + 1 - b0))}")
                    t_log, s_log, run_loss = now, step, 0.0
                if stop:
                    save(epoch, batch + 1)
                    print(f"saved {ckpt_path} at step {step}; resume with: {C.resume_command(ckpt_path)}", flush=True)
                    sys.exit(130)
            batch, ips = 0, (spe - b0) * bs / (time.time() - t_ep)  # 0: stopped at the epoch's end, no step since
            row = dict(epoch=epoch + 1, train_loss=f"{sums[0] / sums[1]:.4f}", test_loss="", test_acc="",
                       lr=f"{lr:.3e}", img_per_s=f"{ips:.1f}" if ips else "")
            msg = f"ep {epoch + 1}/{args.epochs} | train loss {row['train_loss']}"
            if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
                (lo, ac), em = test(raw), test(ema.module) if ema else None
                row.update(test_loss=f"{lo:.4f}", test_acc=f"{ac:.2f}")
                msg += f" | test loss {lo:.4f} acc {ac:.2f}%" + (f" | ema {em[0]:.4f} acc {em[1]:.2f}%" if em else "")
            save(epoch + 1, 0)
            log.row(**row, elapsed_s=f"{time.time() - t_start:.1f}")
            log(f"{msg} | {f'{ips:.0f} img/s | ' if ips else ''}{C.fmt_time(time.time() - t_start)}")
    except KeyboardInterrupt:
        print(f"stopped; {ckpt_path} holds the last saved state" + (f"; resume with: {C.resume_command(ckpt_path)}"
              if os.path.exists(ckpt_path) else " (none saved yet)"), flush=True)
        sys.exit(130)
    for k, m in [("model", raw)] + ([("ema", ema.module)] if ema else []):
        lo, ac = test(m, flip=True)
        log(f"final {k} with test-time flip | test loss {lo:.4f} acc {ac:.2f}% | {C.fmt_time(time.time() - t_start)}")
    pick = torch.linspace(0, len(xte) - 1, 8, device=device).long()  # spread out: some copies are sorted by class
    save_attention(raw, xte[pick].float() / 255, prep, os.path.join(args.out_dir, "attention.png"))
    C.plot_curves(os.path.join(args.out_dir, "log.csv"), os.path.join(args.out_dir, "curves.png"))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before training started (or after it ended): the training loop saves its own
        print("\ninterrupted: nothing saved since the last checkpoint", file=sys.stderr)
        sys.exit(130)
