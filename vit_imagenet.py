"""vit_imagenet.py: a Vision Transformer on ImageNet, TinyImageNet or any ImageFolder tree, from one GPU (or CPU) to
many nodes with PyTorch's data parallelism (torchrun + DistributedDataParallel). Model and helpers: common.py.

    python vit_imagenet.py --data-dir /data/imagenet                        # the recipe below, one GPU
    torchrun --nproc_per_node 8 vit_imagenet.py --data-dir /data/imagenet  # the same run on 8 GPUs
    python vit_imagenet.py --data-dir /data/tiny-imagenet-200 --img-size 64 --warmup 2000  # patch 8 at 64 px
    python vit_imagenet.py --resume out/vit_imagenet/ckpt.pt               # continue exactly (after Ctrl-C too)
    python vit_imagenet.py --resume out/vit_imagenet/ckpt.pt --eval-only  # or --predict cat.jpg dog.png
    python vit_imagenet.py --data-dir /data/flowers --pretrained vit_b_16  # fine-tune torchvision's ViT-B/16
    python vit_imagenet.py --data-dir /data/imagenet --pretrained vit_b_16 --eval-only  # its ImageNet accuracy
    python vit_imagenet.py --pretrained vit_b_16 --predict cat.jpg         # its ImageNet top-5
Several machines: the same command on every node, e.g. `torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d
--rdzv_endpoint HOST:29500 --rdzv_id job1 vit_imagenet.py ...` (README.md). NCCL on GPUs, gloo on CPUs. --batch-size
is global: the LR, the batch and the very samples of each step do not depend on the number of processes.

Data: <data-dir>/train/<class>/**/*.{jpg,jpeg,png,webp,gif} and val/ (or test/, --val-dir) with the same classes
(ImageNet, ImageFolder), or TinyImageNet-200 as downloaded (val/images/ + val/val_annotations.txt). Decoded by
torchvision.io in --workers processes, augmented per sample with a seed of (seed, epoch, index): workers, processes and
--resume leave it unchanged. A few unreadable images are skipped and counted; many stop the run.

Defaults: "Better plain ViT baselines for ImageNet-1k" (Beyer et al. 2022, 76.5% top-1): ViT-S/16, mean pooling,
sin-cos positions, 90 epochs, batch 1024, AdamW lr 1e-3, weight decay 0.1 x lr (the paper's decoupled 1e-4), 10k
warmup steps then cosine, RandAugment(2, 10), MixUp 0.2, inception crop (5-100%), gradient clip 1.0; bf16 on GPU.

Measured (2-core AMD EPYC Zen3 CPU shared with other jobs, torch 2.14.1, fp32; CIFAR-10 as an ImageFolder at 32 px):
    python vit_imagenet.py --data-dir cifar10-jpeg --model cifar_cpu --img-size 32 --epochs 1 --batch-size 128 \\
        --warmup 50 --crop-scale 0.35 --crop-pct 1 --workers 1 --threads 1   # 35.9% top-1, 92 img/s, data 1%, 9m40s
    torchrun --standalone --nproc_per_node 2 vit_imagenet.py <the same>      # 35.3% top-1, 119 img/s, data 1%, 7m43s
GPU (ViT-S/16 img/s, share of the bf16 peak, 90-epoch projection, TinyImageNet): not yet measured.
"""
import argparse
import itertools
import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.datasets.folder import find_classes
from torchvision.transforms import v2

import common

EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif")  # what torchvision.io.decode_image reads
COLUMNS = ["epoch", "train_loss", "test_loss", "test_acc", "test_acc5", "lr", "img_per_s", "elapsed_s"]
# what a --resume may change; every other setting comes from the checkpoint, so that the run continues exactly
RUNTIME = {"data_dir", "val_dir", "out_dir", "workers", "device", "threads", "compile", "resume", "eval_only",
           "predict", "log_every", "stop_after"}
# --pretrained's recipe for the flags not given: short, small lr, no MixUp; weight decay as torch AdamW's (x lr)
FINETUNE = dict(epochs=10, batch_size=512, lr=1e-4, warmup=500, weight_decay=0.05, mixup=0.0, cutmix=0.0,
                label_smoothing=0.1, drop_path=0.1, crop_scale=0.08, randaug_mag=9)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,  # whole names: the
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # resume line drops them
    a = p.add_argument
    a("--data-dir", help="holds train/ and val/ (ImageNet, ImageFolder or TinyImageNet-200); --resume: the ckpt's")
    a("--val-dir", default="auto", help="evaluation folder inside --data-dir; auto: val/, else test/")
    a("--out-dir", help="for ckpt.pt, log.txt, log.csv, curves.png; default out/vit_imagenet, or the --resume "
      "checkpoint's folder")
    a("--model", default="vit_s16", choices=[k for k, v in common.PRESETS.items() if v.get("in_chans", 3) == 3],
      help="common.py preset (width, depth, heads)")
    a("--img-size", type=int, default=0, help="train and eval resolution; 0: 224, or the --pretrained weights'")
    a("--patch", type=int, default=0, help="patch size; 0: 16 from 128 px, 8 from 64 px, else 4")
    a("--depth", type=int, default=0, help="transformer blocks; 0: the preset's")
    a("--heads", type=int, default=0, help="attention heads; 0: the preset's (--pretrained file: the published ViTs' "
      "for its width, as a state_dict lacks them)")
    a("--pool", default="mean", choices=["mean", "cls"], help="classify the mean token (recipe) or a class token")
    a("--pos-embed", default="sincos", choices=["sincos", "learn"], help="fixed 2-D sin-cos (recipe) or learned")
    a("--drop-path", type=float, default=0.0, help="stochastic depth rate of the last block")
    a("--epochs", type=int, default=90, help="training epochs (the schedule's length)")
    a("--batch-size", type=int, default=1024, help="global batch, split over processes and --accum-steps")
    a("--accum-steps", type=int, default=1, help="micro-batches per optimizer step (same global batch, fewer GPUs)")
    a("--lr", type=float, default=1e-3, help="peak learning rate")
    a("--weight-decay", type=float, default=0.1, help="torch AdamW's, times the lr (0.1 at lr 1e-3 = decoupled 1e-4)")
    a("--optimizer", default="adamw", choices=["adamw", "muon"],
      help="muon: Muon for the blocks' weight matrices (common.Muon), AdamW for the rest")
    a("--warmup", type=int, default=10000, help="linear warmup steps, then cosine decay to 0")
    a("--clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    a("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    a("--crop-scale", type=float, default=0.05, help="RandomResizedCrop's smallest area fraction")
    a("--crop-pct", type=float, default=0, help="eval: resize the short side to img-size / crop-pct, center crop; 0: "
      "the --pretrained weights' own (a torchvision name's transforms, a ckpt.pt's), else 0.875")
    a("--randaug", type=int, default=2, help="RandAugment operations per image (0: off)")
    a("--randaug-mag", type=int, default=10, help="RandAugment magnitude (0-30)")
    a("--mixup", type=float, default=0.2, help="MixUp alpha (0: off); with --cutmix, one of the two per batch")
    a("--cutmix", type=float, default=0.0, help="CutMix alpha (0: off)")
    a("--ema", type=float, default=0.0, help="EMA of the weights, decay per step, e.g. 0.9998 (0: off)")
    a("--pretrained", metavar="SOURCE", help="start from ViT weights: a torchvision name (vit_b_16, vit_l_16:"
      "IMAGENET1K_SWAG_E2E_V1) or a torchvision / timm state_dict or ckpt.pt file; the model's shape and input "
      f"statistics come from the weights, a new head unless the classes match; recipe {FINETUNE} unless given")
    a("--freeze", action="store_true", help="train only the head (a linear probe; recipe lr 1e-3, drop-path 0)")
    a("--layer-decay", type=float, default=1.0, help="layer-wise lr decay per block from the head down (1: off)")
    a("--workers", type=int, default=min(8, os.cpu_count() or 1),
      help="data loading processes per process, min(8, cores) by default: here")
    a("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    a("--threads", type=int, default=0, help="CPU threads of each process (0: torch's default; torchrun sets 1)")
    a("--seed", type=int, default=0, help="random seed (init, data order, augmentation)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--synthetic", action="store_true", help="ImageNet-sized constant images instead of --data-dir: the speed of "
      "the model, DDP and the loader without decoding or augmentation")
    a("--resume", metavar="CKPT", help="continue from this ckpt.pt (its settings win over the command line)")
    a("--eval-only", action="store_true", help="evaluate the --resume CKPT or --pretrained SOURCE and exit")
    a("--predict", nargs="+", metavar="FILE", help="print the top-5 classes of these images (with --resume CKPT or "
      "--pretrained SOURCE)")
    a("--log-every", type=float, default=30.0, help="seconds between progress lines")
    a("--stop-after", type=int, default=0, help="stop after this many steps of this run, saving as Ctrl-C does")
    args, ckpt, given = p.parse_args(argv), None, common.given_args(p, argv)
    args.arch = args.mean = args.std = None  # the ViT's keyword arguments and the input statistics, saved in ckpt.pt
    if (args.eval_only or args.predict) and not (args.resume or args.pretrained):
        p.error("--eval-only and --predict need --resume CKPT or --pretrained SOURCE")
    common.check_pretrained_flags(p, args, given, ("model", "patch", "depth", "pool", "pos_embed"))
    if args.pretrained and not args.resume:
        common.apply_recipe(args, FINETUNE, given)
    if args.resume:
        try:
            ckpt = common.load_checkpoint(args.resume, required=("model", "args", "classes", "step", "steps_per_epoch"))
        except common.CheckpointError as e:
            common.die(f"{e}" + (f" (--pretrained {args.resume} starts from its weights)" if "lacks" in str(e) else ""))
        ignored = [k for k in sorted(given) if k not in RUNTIME and getattr(args, k) != ckpt["args"].get(k)]
        if ignored and os.environ.get("RANK", "0") == "0":
            print("note: --resume keeps the checkpoint's " + ", ".join("--" + k.replace("_", "-") for k in ignored))
        args = argparse.Namespace(**{**vars(p.parse_args([])), "arch": None, "mean": None, "std": None,
                                     **ckpt["args"],  # defaults: for flags newer than the checkpoint
                                     **{k: v for k, v in vars(args).items() if k in RUNTIME}})
        args.data_dir = args.data_dir or ckpt["args"].get("data_dir")
        args.out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.resume))
    args.data_dir = args.data_dir and os.path.abspath(args.data_dir)  # saved in ckpt.pt: resumable from anywhere
    args.out_dir = args.out_dir or os.path.join("out", "vit_imagenet")
    args.img_size = args.img_size or (0 if args.pretrained else 224)  # 0: the weights' resolution
    args.patch = args.patch or (16 if args.img_size >= 128 else 8 if args.img_size >= 64 else 4)
    common.check_ranges(p, args, {
        "> 0": "epochs batch_size accum_steps patch lr layer_decay crop_scale",
        ">= 0": "img_size depth heads warmup workers randaug randaug_mag stop_after weight_decay clip mixup cutmix "
                "seed label_smoothing drop_path ema threads log_every crop_pct",
        "< 1": "label_smoothing drop_path ema", "<= 1": "layer_decay crop_scale crop_pct", "<= 30": "randaug_mag",
        "< 4294967296": "seed"})  # seeds in [0, 2**32)
    if not (args.data_dir or args.predict or args.synthetic):  # --predict: classes from the ckpt or the weights
        p.error("--data-dir is required")
    return args, ckpt


# ------------------------------------------------------------------------------------------------------------ data


def scan(args, need_train=True):
    """(train, val, classes); train and val as [(path, label)]. One clear line when something is missing."""
    if not os.path.isdir(args.data_dir):
        common.die(f"--data-dir {args.data_dir} is not a folder")
    tr = os.path.join(args.data_dir, "train")
    names = ("val", "test") if args.val_dir == "auto" else (args.val_dir,)
    vd = next((os.path.join(args.data_dir, n) for n in names if os.path.isdir(os.path.join(args.data_dir, n))), None)
    if not os.path.isdir(tr) or vd is None:
        lacks = " and ".join(["train/"] * (not os.path.isdir(tr)) + [" or ".join(n + "/" for n in names)] * (not vd))
        split = os.path.basename(os.path.normpath(args.data_dir)) in ("train", *names)  # a split folder itself
        common.die(f"{args.data_dir} needs train/<class>/ and {' or '.join(n + '/' for n in names)} (ImageNet, "
                   f"ImageFolder or TinyImageNet-200 layout); it lacks {lacks}" +
                   (": give the folder that holds it, not the split itself" if split else ""))
    try:
        classes, idx = find_classes(tr)
        train = images(tr, idx) if need_train else []
        ann = os.path.join(vd, "val_annotations.txt")
        if os.path.isfile(ann) and os.path.isdir(os.path.join(vd, "images")):  # TinyImageNet-200 (not sorted into
            # val/<wnid>/ as many guides do, leaving the file): lines "<file>\t<wnid>\t<bbox>", images in val/images/
            with open(ann) as f:
                rows = [line.rstrip("\r\n").split("\t")[:2] for line in f if line.strip()]
            bad = next((i for i, r in enumerate(rows) if len(r) < 2), None)
            if bad is not None:
                common.die(f"{ann}: entry {bad + 1} is not '<file>\\t<wnid>...' (tab-separated)")
            unknown = sorted({w for _, w in rows if w not in idx})
            val = [(os.path.join(vd, "images", f), idx.get(w)) for f, w in rows]
            gone = [f for f, _ in val if not os.path.isfile(f)]  # many: found now, not after a training epoch
            if len(gone) > max(10, 0.01 * len(val)):  # a few are skipped, as unreadable ones
                common.die(f"{len(gone)} of the {len(val)} images that {ann} lists are missing (e.g. {gone[0]})")
        else:
            unknown = sorted({e.name for e in os.scandir(vd) if e.is_dir()} - set(classes))
            val = images(vd, idx, allow_empty=True)
    except FileNotFoundError as e:  # no class folders
        common.die(f"{tr}: {str(e).splitlines()[0]}")
    if len(classes) < 2:
        common.die(f"{tr} has {len(classes)} class folder(s): a classifier needs 2 or more")
    if unknown:
        common.die(f"{vd} has {len(unknown)} classes that {tr} lacks (e.g. {unknown[0]})")
    if not val:
        common.die(f"no images in {vd} (ImageNet's val/ must be sorted into <wnid>/ folders, e.g. by valprep.sh)")
    return train, val, classes


def images(folder, idx, allow_empty=False):
    """[(path, label)] under folder/<class>/**, in torchvision's make_dataset order (sub-folders too: TinyImageNet's
    <wnid>/images/), but a folder reached twice through links is walked once: a link loop would repeat it 40 times."""
    out = []
    for name, label in sorted(idx.items()):
        walked, seen = [], {os.path.realpath(os.path.join(folder, name))}
        for d, subs, files in os.walk(os.path.join(folder, name), followlinks=True):
            fresh = {os.path.realpath(os.path.join(d, s)): s for s in subs}
            subs[:] = [s for r, s in fresh.items() if r not in seen]  # os.walk descends into these only
            seen.update(fresh)
            walked.append((d, files))
        found = [(os.path.join(d, f), label) for d, files in sorted(walked) for f in sorted(files)
                 if f.lower().endswith(EXTS)]
        if not (found or allow_empty):
            common.die(f"{os.path.join(folder, name)} has no images ({', '.join(EXTS)})")
        out += found
    return out


class Images(Dataset):
    """(path, label) pairs -> (uint8 (3, size, size) image, label), or (None, 'path: reason') for an unreadable file."""

    def __init__(self, samples, transform, size, seed=None):
        self.samples, self.transform, self.size, self.seed, self.epoch = samples, transform, size, seed, 0

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        if path is None:  # --synthetic: no file, no decoding, no augmentation
            return torch.zeros(3, self.size, self.size, dtype=torch.uint8), label
        try:
            img = common.decode_rgb(path)
        except ValueError as e:
            return None, str(e).removeprefix("cannot read image ")  # 'path: reason'
        if self.seed is None:
            return self.transform(img), label
        with torch.random.fork_rng(devices=[]):  # the same augmentation whichever process or worker loads it
            torch.default_generator.manual_seed(hash((self.seed, self.epoch, i)))  # (torch.manual_seed: 100x slower)
            return self.transform(img), label


def transforms(args, train):
    if not train:
        return v2.Compose([v2.Resize(round(args.img_size / args.crop_pct)), v2.CenterCrop(args.img_size)])
    t = [v2.RandomResizedCrop(args.img_size, scale=(args.crop_scale, 1.0)), v2.RandomHorizontalFlip()]
    return v2.Compose(t + [v2.RandAugment(args.randaug, args.randaug_mag)] * (args.randaug > 0))


def collate(batch):
    """-> (uint8 images, labels, ['path: reason' of the unreadable ones, dropped])."""
    good = [b for b in batch if b[0] is not None]
    x = torch.stack([b[0] for b in good]) if good else torch.empty(0, dtype=torch.uint8)  # Skips stops on this
    return x, torch.tensor([b[1] for b in good], dtype=torch.long), [b[1] for b in batch if b[0] is None]


class Skips:
    """Unreadable images met by this process, each counted once (every epoch meets it again); many (more than 10 and
    1% of all `total` images, or a whole training batch) stop the run."""

    def __init__(self, total, world, group):
        self.bad, self.total, self.world, self.group = {}, total, world, group  # 'path: reason' in order seen

    def __call__(self, bad, whole_batch=False):
        self.bad.update(dict.fromkeys(bad))
        if bad:
            self.check(self.bad, whole_batch)

    def check(self, bad, whole_batch=False):
        if whole_batch or len(bad) > max(10, 0.01 * self.total):
            common.die(f"{len(bad)} of {self.total} images unreadable (e.g. {next(iter(bad))}); check --data-dir")

    def note(self):
        """' | skipped N unreadable (e.g. ...)', N over all processes (every process calls it), or ''; it stops the
        run where the processes together met too many (each alone stops at the limit, at once)."""
        every = [list(self.bad)] * self.world  # a file may fall in another process's shard in the next epoch
        if self.world > 1:
            dist.all_gather_object(every, list(self.bad), group=self.group)
        bad = dict.fromkeys(b for some in every for b in some)
        self.check(bad)
        return f" | skipped {len(bad)} unreadable (e.g. {next(iter(bad))})" if bad else ""


def loader(ds, batch, args, device, sampler=None):
    return DataLoader(ds, batch, sampler=sampler, num_workers=args.workers, collate_fn=collate, drop_last=bool(sampler),
                      pin_memory=device.type == "cuda", prefetch_factor=4 if args.workers else None,
                      worker_init_fn=worker_init, generator=torch.Generator())  # own generator: global RNG untouched


def worker_init(_):
    """Ctrl-C and a scheduler's SIGTERM reach every process: the main one finishes its step and saves, so its workers
    serve it till then, ending only on their parent's SIGTERM (the shutdown torch's own handler allows)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def wait_for_parent():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != os.getppid():
            pass
        os._exit(0)
    threading.Thread(target=wait_for_parent, daemon=True).start()


def start(dl):
    """iter(dl) with SIGINT / SIGTERM held while its workers fork: they inherit the mask, so a signal sent to the
    process group (torchrun, Ctrl-C) cannot kill one before worker_init runs; this process gets it right after."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        return iter(dl)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Sampler(DistributedSampler):
    """A DistributedSampler that can start an epoch part-way, after a mid-epoch checkpoint."""
    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)


# ----------------------------------------------------------------------------------------------------------- train


def setup(device_name):
    """(rank, world size, device, group) from torchrun's environment variables; one process without them. group:
    gloo, for the small agreements (stop now?) that must not wait for the GPU."""
    rank, world, local = (int(os.environ.get(k, "0")) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    world, device = max(world, 1), common.pick_device(device_name)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            common.die(f"LOCAL_RANK {local} but {torch.cuda.device_count()} GPUs: lower --nproc_per_node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device, dist.new_group(backend="gloo") if world > 1 and device.type == "cuda" else None


def evaluate(model, dl, prep, autocast, skips, world, device):
    """(loss, top-1 %, top-5 %) over the whole val set: each process sums its unpadded shard, then all_reduce."""
    def batches():
        for x, y, bad in start(dl):
            skips(bad)  # a batch of unreadable images only (a short last one) is skipped: the count stops a run
            if len(y):
                yield prep(x), y.to(device, non_blocking=True)
    sums = common.evaluate(model, batches(), autocast)  # zeros for an empty shard
    if world > 1:
        dist.all_reduce(sums)
    loss, top1, top5, n = sums.tolist()
    if not n:  # every image unreadable, but too few for the count to stop the run
        common.die("none of the evaluation images could be read; check --data-dir")
    return loss / n, 100 * top1 / n, 100 * top5 / n


def main():
    args, ckpt = get_args()
    training, ckpt_path = not (args.eval_only or args.predict), os.path.join(args.out_dir, "ckpt.pt")
    if training:  # every rank, before any set-up: one error line, not a torchrun crash
        common.check_out_dir(args.out_dir, args.resume)
    rank, world, device, group = setup(args.device)
    common.seed_everything(args.seed)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    classes = ckpt["classes"] if args.predict and ckpt else None
    if args.synthetic:  # ImageNet's sizes
        classes = [f"class{i}" for i in range(1000)]
        train_s, val_s = ([(None, i % 1000) for i in range(n)] for n in (1281167, 50000))
    elif not args.predict:
        train_s, val_s, classes = scan(args, need_train=training)
        if ckpt and ckpt["classes"] != classes:
            common.die(f"{args.data_dir}/train has other classes ({len(classes)}) than the checkpoint "
                       f"({len(ckpt['classes'])})")
    try:
        if args.pretrained and not ckpt:  # the shape and input statistics from the weights
            model, info = common.load_pretrained(args.pretrained, len(classes) if classes else None,
                                                 args.img_size or None, classes, drop_path=args.drop_path,
                                                 **({"heads": args.heads} if args.heads else {}))
            args.arch, args.mean, args.std = info["arch"], info["mean"], info["std"]
            args.crop_pct = args.crop_pct or info["crop_pct"]  # so that --eval-only scores them as published
            classes = classes or info["classes"] or [str(i) for i in range(model.num_classes)]
            if rank == 0:
                print(f"{args.pretrained}: {info['style']} ViT, {args.arch}, " + ("its head kept" if info["head_kept"]
                      else f"a new head for {len(classes)} classes"))
            if not (training or info["head_kept"]):  # a new, zero head would score chance
                common.die(f"{args.pretrained} has no head for these {len(classes)} classes: fine-tune it first")
        else:
            args.arch = args.arch or {**{k: v for k, v in common.PRESETS[args.model].items() if k != "num_classes"},
                                      "img_size": args.img_size, "patch_size": args.patch, "pool": args.pool,
                                      "pos_embed": args.pos_embed,
                                      **{k: v for k, v in (("depth", args.depth), ("heads", args.heads)) if v}}
            model = common.ViT(**args.arch, num_classes=len(classes), drop_path=args.drop_path)
    except (ValueError, common.CheckpointError) as e:
        common.die(str(e))
    model, args.img_size, args.crop_pct = model.to(device), args.arch["img_size"], args.crop_pct or 0.875
    args.mean, args.std = args.mean or common.IMAGENET_MEAN, args.std or common.IMAGENET_STD  # applied on the device
    if args.freeze:
        common.freeze_all_but_head(model)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=True) if args.ema else None
    opts = common.make_optimizer(model, args.lr, args.weight_decay, layer_decay=args.layer_decay,
                                 muon=args.optimizer == "muon")
    autocast, scaler, prec = common.precision(device)
    step, elapsed, epoch_loss = 0, 0.0, 0.0
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) * 255 for v in (args.mean, args.std))
    prep = lambda x: (x.to(device, non_blocking=True).float() - mean) / std  # noqa: E731 uint8 -> float, on device
    if ckpt:
        try:
            common.load_weights(model, ckpt["model"], args.resume)
            if ema:
                ema.load_state_dict(ckpt["ema"])
            if training:
                common.load_optimizers(opts, ckpt["optimizer"])
                scaler.load_state_dict(ckpt["scaler"])
        except (common.CheckpointError, KeyError, ValueError, RuntimeError, TypeError) as e:
            common.die(f"{args.resume}: {' '.join(str(e).split())[:200] or type(e).__name__}")
        step, elapsed = ckpt["step"], ckpt.get("elapsed", 0.0)
        epoch_loss = ckpt.get("rank_loss", ckpt.get("epoch_loss", 0.0) / world)  # older: the sum over processes

    if args.predict:  # with the EMA weights when the checkpoint has them
        ds = Images([(f, -1) for f in args.predict], transforms(args, False), args.img_size)
        items = [ds[i] for i in range(len(ds))]
        if any(x is None for x, _ in items):
            common.die(f"cannot read image {next(r for x, r in items if x is None)}")
        with torch.no_grad(), autocast():
            logits = (ema.module if ema else model).eval()(prep(torch.stack([x for x, _ in items])))
        return common.print_top5(logits, args.predict, classes) if rank == 0 else None
    B, A = args.batch_size, args.accum_steps
    skips = Skips(1 if args.synthetic else len(train_s) * training + len(val_s), world, group)
    if B % (world * A):
        common.die(f"--batch-size {B} is not divisible by {world} process(es) x --accum-steps {A}")
    micro, val_ds = B // (world * A), Images(val_s, transforms(args, False), args.img_size)
    val_dl = loader(Subset(val_ds, range(rank, len(val_ds), world)), micro, args, device)  # unpadded shards: exact
    if args.eval_only:
        for name, m in [("model", model)] + ([("ema", ema.module)] if ema else []):
            loss, top1, top5 = evaluate(m, val_dl, prep, autocast, skips, world, device)
            note = skips.note()
            if rank == 0:
                print(f"eval {name} | {len(val_ds)} images | test_loss {loss:.4f} | top1 {top1:.2f}% | top5 "
                      f"{top5:.2f}%{note}")
        return

    train_ds = Images(train_s, transforms(args, True), args.img_size, seed=args.seed)
    # rank r's k-th micro-batch is permutation[r::world][k*micro:(k+1)*micro], so the A micro-batches of all ranks
    # together hold permutation[step*B:(step+1)*B]: the same samples per step for any number of processes
    sampler = Sampler(train_ds, world, rank, shuffle=True, seed=args.seed, drop_last=True)
    train_dl, steps = loader(train_ds, micro, args, device, sampler), len(train_ds) // B  # steps per epoch
    total = steps * args.epochs
    if steps == 0 or args.warmup >= total:
        common.die(f"{len(train_ds)} training images are fewer than one --batch-size {B}" if steps == 0 else
                   f"--warmup {args.warmup} is not below the run's {total} steps (the recipe: 10k of 112k)")
    if ckpt and ckpt["steps_per_epoch"] != steps:
        common.die(f"{args.data_dir} gives {steps} steps per epoch, the checkpoint's run {ckpt['steps_per_epoch']}")
    if step >= total:
        return print(f"{args.resume} is at step {step} of {total}: its run is complete (--eval-only evaluates it)"
                     ) if rank == 0 else None
    mixers = [m(alpha=a, num_classes=len(classes)) for m, a in ((v2.MixUp, args.mixup), (v2.CutMix, args.cutmix)) if a]
    mix = v2.RandomChoice(mixers) if mixers else None
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              gradient_as_bucket_view=True) if world > 1 else None
    net = torch.compile(ddp if ddp else model) if args.compile else ddp if ddp else model  # DDP first, then compile
    log = common.Logger(args.out_dir, COLUMNS, append=bool(args.resume), enabled=rank == 0)
    log(f"vit_imagenet | {world} process(es) x {micro} images x {A} accum = batch {B} | {device} {prec} | "
        f"{len(train_ds)} train / {len(val_ds)} val images, {len(classes)} classes | {args.pretrained or args.model} "
        f"patch {args.arch['patch_size']} dim {args.arch['dim']} depth {args.arch['depth']} {args.img_size}px "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | {total} steps, warmup {args.warmup}"
        + (f" | resumed at step {step}" if ckpt else ""))
    stop = common.StopFlag(verbose=rank == 0)  # acted on at a step that every process agrees on

    def agreed(flag):  # True in every process if True in any; on the CPU (gloo): no GPU sync
        if world > 1:
            flag = torch.tensor(float(flag))
            dist.all_reduce(flag, group=group)
        return bool(flag)

    t_start, first, rate = time.time() - elapsed, step, lambda r: f"{r / 1e3:.1f}k" if r >= 1e3 else f"{r:.0f}"
    (start_epoch, s0), stopping = divmod(step, steps), False
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        sampler.skip, train_ds.epoch = s0 * A * micro, epoch  # skip: what a mid-epoch checkpoint already trained on
        model.train()
        loss_sum = torch.tensor(epoch_loss if s0 else 0.0, device=device)  # over steps; all_reduce: ranks too
        wait, it, t0 = 0.0, start(train_dl), time.time()
        shown = t0
        for s in range(s0, steps):
            torch.manual_seed(hash((args.seed, step, rank)))  # MixUp, dropout: a function of the step: exact resume
            for a in range(A):
                t = time.time()
                x, y, bad = next(it)
                wait += time.time() - t
                skips(bad, whole_batch=not len(y))  # no image to train on
                x, y = prep(x), y.to(device, non_blocking=True)
                x, y = mix(x, y) if mix else (x, y)  # y: class ids, or soft targets after MixUp/CutMix
                with ddp.no_sync() if ddp and a < A - 1 else nullcontext():  # all-reduce on the last only
                    with autocast():
                        loss = F.cross_entropy(net(x).float(), y, label_smoothing=args.label_smoothing) / A
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            lr = common.lr_at(step, total, args.lr, args.warmup)
            common.set_lr(opts, lr)
            common.optimizer_step(opts, scaler, model.parameters(), args.clip)
            if ema:
                common.ema_update(ema, model, first=step == 0)
            step += 1
            if rank == 0 and (time.time() - shown > args.log_every or s == steps - 1):
                shown, dt = time.time(), time.time() - t0  # loss: rank 0's share of the batch
                log(f"ep {epoch + 1}/{args.epochs} | step {step}/{total} | loss {loss_sum.item() / (s + 1):.4f} | "
                    f"lr {lr:.1e} | {rate((s + 1 - s0) * B / dt)} img/s | data {100 * wait / dt:.0f}% | "
                    f"eta {common.fmt_time(dt / (s + 1 - s0) * (total - step))}")
            if args.stop_after and step - first == args.stop_after:
                stop.reasons.append("--stop-after")
            stopping = agreed(bool(stop))  # every step: torchrun kills its workers 30 s after a signal
            if stopping:
                break
        if world > 1:
            dist.all_reduce(loss_sum)
        train_loss, train_time, done = loss_sum.item() / (steps * world), time.time() - t0, step % steps == 0
        if not math.isfinite(train_loss):  # every rank sees the all-reduced sum; nothing NaN reaches ckpt.pt
            common.die(f"the training loss became {train_loss} in epoch {epoch + 1} (lr {lr:.1e}); stopped without "
                       "saving it: try a lower --lr or a longer --warmup")
        if done:
            test_loss, top1, top5 = evaluate(model, val_dl, prep, autocast, skips, world, device)
            ema_top1 = evaluate(ema.module, val_dl, prep, autocast, skips, world, device)[1] if ema else 0
            elapsed, n, note = time.time() - t_start, (steps - s0) * B, skips.note()
        if rank == 0 and (done or stopping):  # the unwrapped, uncompiled module's weights
            common.save_checkpoint({"model": model.state_dict(), "ema": ema.state_dict() if ema else None, "step": step,
                                    "optimizer": [o.state_dict() for o in opts], "scaler": scaler.state_dict(),
                                    "epoch": step // steps, "steps_per_epoch": steps, "rank_loss": 0.0 if done else
                                    loss_sum.item() / world, "elapsed": time.time() - t_start, "classes": classes,
                                    "args": vars(args)}, ckpt_path)
        if done:  # after the save: a failed save adds no row that a resume would add again
            log(f"ep {epoch + 1}/{args.epochs} | train_loss {train_loss:.4f} | test_loss {test_loss:.4f} | top1 "
                f"{top1:.2f}% | top5 {top5:.2f}%" + (f" | ema top1 {ema_top1:.2f}%" if ema else "") +
                f" | {rate(n / train_time)} img/s | data {100 * wait / train_time:.0f}% | {common.fmt_time(elapsed)}"
                + note)
            log.row(epoch=epoch + 1, train_loss=train_loss, test_loss=test_loss, test_acc=top1, test_acc5=top5, lr=lr,
                    img_per_s=round(n / train_time, 1), elapsed_s=round(elapsed, 1))
        s0 = 0
        if (stopping or agreed(bool(stop))) and step < total:
            del it  # ends the workers now
            again = common.resume_command(ckpt_path, launcher="torchrun <its options>" if world > 1 else "python")
            log(f"stopped ({', '.join(stop.reasons) or 'another process'}) at step {step}/{total}; {ckpt_path} saved; "
                f"continue with: {again}")
            sys.exit(0 if stop.reasons == ["--stop-after"] else 130)
    if rank == 0:
        common.plot_curves(os.path.join(args.out_dir, "log.csv"), os.path.join(args.out_dir, "curves.png"))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("\ninterrupted: nothing saved since the last checkpoint", file=sys.stderr)
        sys.exit(130)
    except RuntimeError as e:  # a collective failed here because another process stopped, with its own error line
        if not (dist.is_initialized() and (isinstance(e, dist.DistError) or re.search("gloo|NCCL|onnection", str(e)))):
            raise
        common.die(f"process {dist.get_rank()} stopped too: another one stopped first (its error is above)")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
