"""mini_vit.py: train a small Vision Transformer from scratch on MNIST or Fashion-MNIST. One file that needs only
torch, torchvision and the standard library: copy it anywhere.

    python mini_vit.py                                   # MNIST, downloaded into ./data when missing
    python mini_vit.py --dataset fashion --data-dir DIR  # reads DIR/FashionMNIST/raw/*-ubyte
    -> an idle 2-core AMD EPYC VM, torch 2.14.1, fp32: Fashion-MNIST 91.33% (91.64% with test-time flip) in 8m43.7s,
    MNIST 99.38% in 9m08.6s. Laptops: --epochs 4 (Fashion 88.17% in 2m13.8s); a busy CPU: --threads 1. More time:
    --patch-size 4 --translate 2 --epochs 20 (MNIST 99.58% in 21m48.457s); the same with --epochs 40 --rotate 10
    --scale 0.1: 99.62% in 60m36.803s (--seed 1: 99.54% in 70m30.674s; without --rotate / --scale, seeds 0 and 1:
    99.56% and 99.55%, so no gain shown). More in README.

model.pt = {'model': state_dict, 'args': vars(args)} has timm's names and maths: it loads into common.ViT or timm
(strict; timm with fc_norm=False for mean pooling) with the same logits. Inputs: (x / 255 - mean) / std.
"""
import argparse
import contextlib
import io
import math
import os
import sys
import time
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

DATASETS = {'mnist': torchvision.datasets.MNIST, 'fashion': torchvision.datasets.FashionMNIST}
MEAN_STD = {'mnist': (0.1307, 0.3081), 'fashion': (0.2860, 0.3530)}  # the usual per-dataset pixel statistics
IMG = 28


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a('--dataset', default='mnist', choices=list(DATASETS), help='which dataset')
    a('--data-dir', default='./data', help='torchvision root: <data-dir>/MNIST/raw or <data-dir>/FashionMNIST/raw')
    a('--out-dir', default='out/mini_vit_<dataset>', help='where log.csv and model.pt go')
    a('--overwrite', action='store_true', help='replace log.csv / model.pt already in --out-dir')
    a('--epochs', type=int, default=16, help='training epochs')
    a('--batch-size', type=int, default=256, help='training batch size')
    a('--lr', type=float, default=4e-3, help="peak learning rate (AdamW's and Muon's)")
    a('--optimizer', default='muon', choices=['muon', 'adamw'],
      help="muon: Muon on the blocks' weight matrices (more from few steps), AdamW on the rest; adamw: AdamW on all")
    a('--weight-decay', type=float, default=0.05, help='weight decay on matrices (not biases/norms/pos_embed)')
    a('--warmup', type=float, default=0.5, help='linear warmup length in epochs, then cosine decay to 0')
    a('--label-smoothing', type=float, default=0.1, help='label smoothing (in the logged train loss, not test loss)')
    a('--patch-size', type=int, default=7, help='patch side in pixels; must divide 28 (7: 16 tokens)')
    a('--dim', type=int, default=64, help='embedding width')
    a('--depth', type=int, default=6, help='transformer blocks')
    a('--heads', type=int, default=2, help='attention heads; must divide --dim')
    a('--mlp-ratio', type=float, default=2.0, help='MLP hidden width / dim')
    a('--pool', default='mean', choices=['cls', 'mean'], help='classify from the class token or the mean token')
    a('--drop-path', type=float, default=0.0, help='stochastic depth rate (same for every block)')
    a('--translate', type=int, default=1, help='random shift by up to N px (zero padding) against overfitting; N < 28')
    a('--rotate', type=float, default=0.0, help='random rotation by up to +-N degrees (with --scale: one resampling, '
      'the shift folded in)')
    a('--scale', type=float, default=0.0, help='random zoom by a factor in [1-S, 1+S]')
    a('--hflip', default='auto', choices=['auto', 'on', 'off'], help='random horizontal flip; auto: fashion only')
    a('--tta', default='auto', choices=['auto', 'on', 'off'], help='at the end, also the accuracy of the mean logits '
      'of each test image and its mirror image (per epoch: plain, at half the cost); auto: when training flips')
    a('--device', default='auto', choices=['auto', 'cpu', 'cuda'], help='auto: cuda when available')
    a('--seed', type=int, default=0, help='random seed')
    a('--threads', type=int, default=0, help='CPU threads; 0: torch default (one per core). 1 is faster on a busy CPU')
    a('--log-every', type=float, default=30.0, help='seconds between progress lines within an epoch (0: every step)')
    args = p.parse_args(argv)
    for names, rule, ok in (('epochs batch_size dim depth lr mlp_ratio', '> 0', lambda v: v > 0),
                            ('weight_decay log_every', '>= 0', lambda v: v >= 0),
                            ('label_smoothing drop_path', 'in [0, 1)', lambda v: 0 <= v < 1),
                            ('warmup', 'in [0, --epochs]', lambda v: 0 <= v <= args.epochs),
                            ('patch_size', 'a divisor of 28: 1, 2, 4, 7, 14 or 28', lambda v: v > 0 and IMG % v == 0),
                            ('heads', f'a divisor of --dim {args.dim}', lambda v: v > 0 and args.dim % v == 0),
                            ('translate', 'in [0, 28)', lambda v: 0 <= v < IMG),
                            ('rotate', 'in [0, 180]', lambda v: 0 <= v <= 180),
                            ('scale', 'in [0, 1)', lambda v: 0 <= v < 1),
                            ('threads', f'in [0, {os.cpu_count()}] (the cores)', lambda v: 0 <= v <= os.cpu_count()),
                            ('seed', 'in [0, 2**32)', lambda v: 0 <= v < 2 ** 32)):
        for n in names.split():
            if not (math.isfinite(getattr(args, n)) and ok(getattr(args, n))):
                p.error(f"--{n.replace('_', '-')} {getattr(args, n)} is out of range: it must be finite and {rule}")
    if not 1 <= args.dim * args.mlp_ratio < 2 ** 20:
        p.error(f'--mlp-ratio {args.mlp_ratio} x --dim {args.dim}: the MLP needs 1 to 2**20 hidden units')
    if args.device == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda but CUDA is not available (use --device cpu)')
    args.device = args.device if args.device != 'auto' else 'cuda' if torch.cuda.is_available() else 'cpu'
    args.out_dir = args.out_dir.replace('<dataset>', args.dataset)
    if not args.out_dir.strip() or os.path.isfile(args.out_dir):
        p.error(f'--out-dir {args.out_dir!r} is empty or a file, not a folder')
    return args


# ----------------------------------------------------------------------------------------------------------- data
def load_data(args):
    """Both splits as uint8 (N, 28, 28) images and int64 labels, read (or downloaded) by torchvision."""
    cls, out = DATASETS[args.dataset], []
    raw = os.path.join(args.data_dir, cls.__name__, 'raw')
    idx = [f'{s}-{k}' for s in ('train', 't10k') for k in ('images-idx3-ubyte', 'labels-idx1-ubyte')]
    missing = [f for f in idx if not os.path.isfile(os.path.join(raw, f))]
    if missing and any(os.path.isfile(os.path.join(args.data_dir, d, idx[0] + z)) for d in ('raw', '') for z in
                       ('', '.gz')):  # pointed at <name>/ or <name>/raw/: a download would land inside it
        sys.exit(f'error: --data-dir {args.data_dir} holds the idx files itself: give the folder that holds '
                 f'{cls.__name__}/raw/')
    if 0 < len(missing) < len(idx):  # torchvision would download all four, replacing the files that are there
        sys.exit(f'error: {raw}/ lacks {", ".join(missing)}: put it there too (unpacked), or remove the others to '
                 'download all four')
    for train in (True, False):
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # silence torchvision's per-mirror chatter
                ds = cls(args.data_dir, train=train, download=True)
            x, y = ds.data, ds.targets
            if x.shape[1:] != (IMG, IMG) or y.shape != x.shape[:1] or not 0 <= y.min() <= y.max() <= 9:
                raise ValueError(f'images {tuple(x.shape)}, labels {tuple(y.shape)} in {y.min()}..{y.max()}')
        except Exception as e:  # offline (URLError / RuntimeError), unwritable folder, unreadable files
            why = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(':')[:100]
            if all(os.path.isfile(os.path.join(raw, f)) for f in idx):
                sys.exit(f'error: the idx files in {raw}/ are truncated or corrupt ({why})')
            sys.exit(f'error: no {cls.__name__} in {raw}/ and the download failed ({why}); put the idx files '
                     f'{", ".join(idx)} there (unpacked)')
        out += [x, y]
    return out


def augment(x, translate, hflip, rotate=0.0, scale=0.0):
    """Per-sample random shift by up to `translate` px (zero padding), rotation, zoom, flip: batched on the device."""
    B, H, W = x.shape
    if rotate or scale:  # one bilinear resampling per image: rotation, zoom and a shift (not in whole pixels)
        ang = (torch.rand(B, device=x.device) * 2 - 1) * math.radians(rotate)
        s = 1 + (torch.rand(B, device=x.device) * 2 - 1) * scale
        t = (torch.rand(2, B, device=x.device) * 2 - 1) * (2 * translate / W)  # in affine_grid's [-1, 1] units
        cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
        theta = torch.stack([torch.stack([cos, -sin, t[0]], 1), torch.stack([sin, cos, t[1]], 1)], 1)  # (B, 2, 3)
        grid = F.affine_grid(theta, (B, 1, H, W), align_corners=False)
        x, translate = F.grid_sample(x.float()[:, None], grid, align_corners=False)[:, 0], 0  # float, 0..255
    if translate:
        xp = F.pad(x, (translate,) * 4)
        dy, dx = torch.randint(0, 2 * translate + 1, (2, B, 1), device=x.device)
        rows = (dy + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (dx + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
        x = xp[torch.arange(B, device=x.device)[:, None, None], rows, cols]  # gather one shifted crop per sample
    if hflip:
        x = torch.where(torch.rand(B, 1, 1, device=x.device) < 0.5, x.flip(2), x)
    return x


def to_input(x, mean, std):
    return ((x.float() / 255 - mean) / std).unsqueeze(1)  # (B, 28, 28) uint8 -> (B, 1, 28, 28) float


# ---------------------------------------------------------------------------------------------------------- model
class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        # (B, N, 3, H, Dh) -> (3, B, H, N, Dh)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, H, N, Dh) -> (B, N, D)


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, drop_path):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads), nn.LayerNorm(dim, 1e-6)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, hidden), act=nn.GELU(), fc2=nn.Linear(hidden, dim)))
        self.drop_path = torchvision.ops.StochasticDepth(drop_path, 'row')  # identity at eval or when 0

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Pre-norm ViT with timm's parameter names; learned pos_embed, 'cls' or 'mean' pooling after the final norm."""
    def __init__(self, patch_size=7, dim=64, depth=6, heads=2, mlp_ratio=2.0, pool='mean', drop_path=0.0,
                 img_size=IMG, in_chans=1, num_classes=10):
        super().__init__()
        self.pool = pool
        n_tokens = (img_size // patch_size) ** 2 + (pool == 'cls')
        self.patch_embed = nn.Sequential(OrderedDict(proj=nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)))
        if pool == 'cls':
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, drop_path) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):  # timm's init
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)  # every class starts at the same logit

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)
        if self.pool == 'cls':
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # pos_embed row 0 is the cls token's
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0] if self.pool == 'cls' else x.mean(dim=1))


# ------------------------------------------------------------------------------------------------------ optimizer
class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's maths (adjust_lr_fn='match_rms_adamw': AdamW's lr and weight decay carry over): momentum whose
    update of each weight matrix is made semi-orthogonal (Jordan et al. 2024). In fp32, batched over the matrices of a
    shape: torch's casts to bf16, which halved the img/s on the 2-core CPU."""
    def __init__(self, params, lr, weight_decay, momentum=0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            shapes = {}
            for p in g['params']:
                shapes.setdefault(p.shape, []).append(p)
            for (rows, cols), ps in shapes.items():  # foreach: one call per list, not per tensor
                grads = [p.grad for p in ps]
                for p in ps:  # (setdefault would make a zero tensor on every step)
                    if 'momentum_buffer' not in self.state[p]:
                        self.state[p]['momentum_buffer'] = torch.zeros_like(p)
                bufs = [self.state[p]['momentum_buffer'] for p in ps]
                torch._foreach_lerp_(bufs, grads, 1 - g['momentum'])
                upd = orthogonalise(torch.stack(torch._foreach_lerp(grads, bufs, g['momentum'])))  # Nesterov
                torch._foreach_mul_(ps, 1 - g['lr'] * g['weight_decay'])
                torch._foreach_add_(ps, upd.unbind(0), alpha=-g['lr'] * 0.2 * math.sqrt(max(rows, cols)))


def orthogonalise(G, steps=5, a=3.4445, b=-4.7750, c=2.0315):
    """Newton-Schulz iterations of (n, rows, cols) matrices towards U V^T of their SVDs (torch.optim.Muon's)."""
    wide = G.shape[-2] <= G.shape[-1]
    X = G if wide else G.mT  # iterate on the wide side: the Gram matrix X X^T is the smaller one
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-7)  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT.contiguous()  # as the weights' strides: torch._foreach_add_'s fast path


# ----------------------------------------------------------------------------------------------------------- main
def get_lr(step, total_steps, warmup_steps, peak):
    """Linear warmup from ~0 to peak, then cosine to 0: a pure function of the step."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def fmt_time(s):
    return f'{int(s) // 60}m{int(s) % 60:02d}s'  # 83m20s, not 1h23m20s: one column to grep


@torch.no_grad()
def evaluate(model, x, y, mean, std, amp, flip=False):
    """(loss, accuracy %) on x, y; flip: of the mean logits of each image and its mirror image."""
    model.eval()
    with amp:
        logits = torch.cat([(model(xb).float() + model(xb.flip(3)).float()) / 2 if flip else model(xb).float()
                            for xb in (to_input(x[i:i + 1000], mean, std) for i in range(0, len(x), 1000))])
    model.train()
    return F.cross_entropy(logits, y).item(), 100.0 * (logits.argmax(1) == y).sum().item() / len(x)


def main(argv=None):
    args, t0 = get_args(argv), time.time()
    log_path, model_path = os.path.join(args.out_dir, 'log.csv'), os.path.join(args.out_dir, 'model.pt')
    header = 'epoch,train_loss,test_loss,test_acc,lr,img_per_s,elapsed_s'  # alone in log.csv: a run stopped in its
    ours = os.path.isfile(log_path) and open(log_path, 'rb').read().strip() == header.encode()  # 1st epoch, may go
    if not args.overwrite and (os.path.exists(model_path) or os.path.exists(log_path) and not ours):
        sys.exit(f'error: {args.out_dir} already holds log.csv / model.pt; pass --overwrite or another --out-dir')
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    dev = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp = torch.autocast('cuda', torch.bfloat16) if dev.type == 'cuda' else contextlib.nullcontext()  # CPU: fp32
    # at 16 tokens torch's plain (math) attention ran ~10% faster per training step than its flash kernel on a 2-core
    # CPU; on CUDA flash attention, as cuDNN's bf16 attention backward has emitted NaN on H100s (pocket-tts#264)
    torch.backends.cuda.enable_flash_sdp(dev.type == 'cuda')
    torch.backends.cuda.enable_cudnn_sdp(False)

    # the whole dataset lives on the device as uint8 (47 MB for MNIST): batches are plain index lookups
    x_train, y_train, x_test, y_test = [t.to(dev) for t in load_data(args)]
    (mean, std), bs = MEAN_STD[args.dataset], args.batch_size
    steps_per_epoch = len(x_train) // bs  # drop the ragged last batch
    if steps_per_epoch == 0:
        sys.exit(f'error: --batch-size {bs} is larger than the training set ({len(x_train)} images)')
    total_steps, warmup_steps = args.epochs * steps_per_epoch, round(args.warmup * steps_per_epoch)

    model = ViT(args.patch_size, args.dim, args.depth, args.heads, args.mlp_ratio, args.pool, args.drop_path).to(dev)
    groups = ([], [], [])  # Muon: the blocks' matrices; AdamW: other matrices; AdamW, no decay: the rest
    for n, p in model.named_parameters():  # decaying biases, norms, pos_embed or cls_token only hurts
        muon = args.optimizer == 'muon' and n.startswith('blocks') and p.ndim == 2
        groups[0 if muon else 2 if p.ndim < 2 or n in ('pos_embed', 'cls_token') else 1].append(p)
    opts = [torch.optim.AdamW([{'params': groups[1]}, {'params': groups[2], 'weight_decay': 0.0}], lr=args.lr,
                              weight_decay=args.weight_decay, fused=True)]  # one kernel for all: ~10% faster on CPU
    opts += [Muon(groups[0], args.lr, args.weight_decay)] if groups[0] else []
    hflip = args.hflip == 'on' or (args.hflip == 'auto' and args.dataset == 'fashion')  # digits are not symmetric
    tta = args.tta == 'on' or (args.tta == 'auto' and hflip)
    print('config:', ' '.join(f'{k}={v}' for k, v in vars(args).items()))
    print(f'{args.dataset}: {len(x_train)} train / {len(x_test)} test images on {dev} | '
          f'model {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params | {total_steps} steps | '
          f'data ready in {time.time() - t0:.1f}s', flush=True)

    try:
        os.makedirs(args.out_dir, exist_ok=True)
        if os.path.isfile(model_path):  # --overwrite: no earlier run's weights beside this run's log
            os.remove(model_path)
        with open(log_path, 'w') as f:
            f.write(header + '\n')
    except OSError as e:  # read-only, a file in the way, no space
        sys.exit(f'error: cannot write {log_path}: {e.strerror or e}; pick another --out-dir')
    step, t_train = 0, time.time()

    def show(epoch, loss, speed, extra=''):  # one greppable progress line
        eta = (time.time() - t_train) / step * (total_steps - step)
        print(f'ep {epoch}/{args.epochs} | step {step}/{total_steps} | loss {loss:.4f} | {extra}lr {lr:.1e} | '
              f'{speed:.0f} img/s | elapsed {fmt_time(time.time() - t0)} | eta {fmt_time(eta)}', flush=True)
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(x_train), device=dev)
        loss_sum, t_epoch, t_log = torch.zeros((), device=dev), time.time(), time.time()
        for i in range(steps_per_epoch):
            idx = perm[i * bs:(i + 1) * bs]
            x = to_input(augment(x_train[idx], args.translate, hflip, args.rotate, args.scale), mean, std)
            lr = get_lr(step, total_steps, warmup_steps, args.lr)
            for g in [g for o in opts for g in o.param_groups]:
                g['lr'] = lr
            with amp:
                loss = F.cross_entropy(model(x).float(), y_train[idx], label_smoothing=args.label_smoothing)
            loss.backward()
            for o in opts:  # and clear the gradients for the next step
                o.step()
                o.zero_grad(set_to_none=True)
            loss_sum += loss.detach()  # stays on the device: no sync per step
            step += 1
            if time.time() - t_log > args.log_every and i + 1 < steps_per_epoch:
                loss_avg, t_log = loss_sum.item() / (i + 1), time.time()  # the sync first: CUDA runs behind
                show(epoch, loss_avg, (i + 1) * bs / (t_log - t_epoch))
        train_loss = loss_sum.item() / steps_per_epoch  # a sync: the clock reads after the epoch's last step ran
        img_s = steps_per_epoch * bs / (time.time() - t_epoch)  # training only, not evaluation
        if not math.isfinite(train_loss) or not all(p.isfinite().all() for p in model.parameters()):  # inf gradients
            what = 'weights became NaN or inf' if math.isfinite(train_loss) else f'training loss became {train_loss}'
            sys.exit(f'error: the {what} in epoch {epoch} (lr {lr:.1e}); stopped without saving weights: try a lower '
                     '--lr or a longer --warmup')
        test_loss, test_acc = evaluate(model, x_test, y_test, mean, std, amp)
        show(epoch, train_loss, img_s, f'test_loss {test_loss:.4f} | test_acc {test_acc:.2f} | ')
        tmp, what = model_path + '.tmp', model_path  # write then rename: a crash never leaves a half-written model.pt
        try:
            torch.save({'model': {k: v.cpu() for k, v in model.state_dict().items()}, 'args': vars(args)}, tmp)
            os.replace(tmp, model_path)
            what = log_path  # after the save: no row without its weights
            with open(log_path, 'a') as f:
                f.write(f'{epoch},{train_loss:.4f},{test_loss:.4f},{test_acc:.2f},{lr:.3e},{img_s:.1f},'
                        f'{time.time() - t0:.1f}\n')
        except (OSError, RuntimeError) as e:  # no space, a folder in the way (torch.save raises RuntimeError)
            with contextlib.suppress(OSError):
                os.remove(tmp)
            why = e.strerror if isinstance(e, OSError) and e.strerror else f'{str(e).splitlines()[0][:80]}: no space?'
            sys.exit(f'error: cannot write {what} in epoch {epoch} ({why}); model.pt holds the last epoch saved, '
                     'if any')
    flip = f', {evaluate(model, x_test, y_test, mean, std, amp, flip=True)[1]:.2f} with test-time flip' if tta else ''
    print(f'done: test_acc {test_acc:.2f}{flip} in {fmt_time(time.time() - t0)}; wrote {log_path} and {model_path}')


if __name__ == '__main__':
    try:
        main()
    except KeyboardInterrupt:
        sys.exit('\nstopped: model.pt and log.csv hold the last finished epoch, if any')
    except RuntimeError as e:  # out of memory: a model, batch or --translate too large for this machine
        if 'alloc' not in str(e):
            raise
        sys.exit(f'error: out of memory ({str(e).splitlines()[0][:80]}): try a smaller --batch-size or model')
