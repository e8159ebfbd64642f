"""The compact Vision Transformer and the few training helpers that vit_cifar.py and vit_imagenet.py share.

Model: "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021), pre-norm blocks, parameter names as timm's
VisionTransformer, so `timm.create_model('vit_base_patch16_224').state_dict()` loads here with strict=True and gives
the same logits; `from_torchvision` converts torchvision's ViT weights. Attention is one fused qkv Linear plus
F.scaled_dot_product_attention (flash / memory-efficient kernels on GPU).
"""
import argparse
import csv
import difflib
import io
import math
import operator
import os
import random
import re
import shlex
import signal
import sys
import tempfile
import time
from contextlib import nullcontext, suppress

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import StochasticDepth

# ----------------------------------------------------------------------------------------------------------- model


class PatchEmbed(nn.Module):
    def __init__(self, img_size, patch_size, in_chans, dim):
        super().__init__()
        self.img_size, self.in_chans, self.grid = img_size, in_chans, img_size // patch_size
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1:] != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(f"expected input (B, {self.in_chans}, {self.img_size}, {self.img_size}), "
                             f"got {tuple(x.shape)}")
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D)


class Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias=True, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, return_attn=False):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        # (B, N, 3, H, Dh) -> 3 x (B, H, N, Dh)
        attn = None
        if return_attn:  # the softmax SDPA computes internally but does not return
            attn = (q * q.shape[-1] ** -0.5 @ k.transpose(-2, -1)).softmax(-1)  # (B, H, N, N)
            x = attn @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, H, N, Dh) -> (B, N, D)
        return self.proj_drop(self.proj(x)), attn


class Mlp(nn.Module):
    def __init__(self, dim, hidden, drop=0.):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = StochasticDepth(drop_path, "row")  # drops a sample's whole residual branch

    def forward(self, x, return_attn=False):
        y, attn = self.attn(self.norm1(x), return_attn)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return (x, attn) if return_attn else x


def sincos_pos_embed(grid, dim, temperature=10000.):
    """Fixed 2-D sin-cos position embedding as in big_vision (posemb_sincos_2d): (grid*grid, dim)."""
    if dim % 4 or dim < 8:
        raise ValueError(f"pos_embed='sincos' needs dim divisible by 4 and >= 8, got {dim}")
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4) / (dim // 4 - 1))
    y, x = y.flatten()[:, None] * omega, x.flatten()[:, None] * omega  # (grid*grid, dim/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


class ViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, dim=768, depth=12, heads=12,
                 mlp_ratio=4.0, qkv_bias=True, pool="cls", pos_embed="learn", dropout=0., attn_dropout=0.,
                 drop_path=0.):
        super().__init__()
        if min(img_size, patch_size, dim, heads, depth + 1, mlp_ratio) <= 0:
            raise ValueError(f"sizes must be positive: img_size {img_size}, patch_size {patch_size}, dim {dim}, "
                             f"heads {heads}, depth {depth} (0: no blocks), mlp_ratio {mlp_ratio}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        if pool not in ("cls", "mean") or pos_embed not in ("learn", "sincos"):
            raise ValueError(f"pool must be 'cls' or 'mean' and pos_embed 'learn' or 'sincos', got {pool!r}, "
                             f"{pos_embed!r}")
        self.pool, self.num_classes = pool, num_classes
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dim)
        n_prefix, grid = int(pool == "cls"), img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if n_prefix else None
        if pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.empty(1, n_prefix + grid * grid, dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:  # not in the state_dict: a function of the shape, recomputed on load
            pe = torch.cat([torch.zeros(n_prefix, dim), sincos_pos_embed(grid, dim)])
            self.register_buffer("pos_embed", pe[None], persistent=False)
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, qkv_bias, dropout, attn_dropout, p)
                                      for p in [drop_path * i / max(1, depth - 1) for i in range(depth)]])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init)
        if num_classes > 0:  # a zero head starts every class at the same logit (uniform softmax)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):  # LeCun normal on the patch projection, as torchvision and big_vision
            nn.init.trunc_normal_(m.weight, std=math.sqrt(1.0 / m.weight[0].numel()))
            nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    def embed(self, x):
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1 + h*w, D)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(self, x):
        return self.norm(self.blocks(self.embed(x)))  # (B, N, D)

    def forward_head(self, x, pre_logits=False):
        x = x[:, 0] if self.pool == "cls" else x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x):
        """Softmax attention of every block, (depth, B, heads, N, N), computed explicitly (SDPA returns none); in eval
        mode whatever the model's, as drop-path would thin the network at random."""
        was, maps = self.training, []
        x = self.eval().embed(x)
        for blk in self.blocks:
            x, attn = blk(x, return_attn=True)
            maps.append(attn)
        self.train(was)
        return torch.stack(maps)


# name: (img_size, patch_size, dim, depth, heads, mlp_ratio) plus fixed extras; create_vit() takes overrides
PRESETS = {
    "vit_ti16": dict(img_size=224, patch_size=16, dim=192, depth=12, heads=3),
    "vit_s16": dict(img_size=224, patch_size=16, dim=384, depth=12, heads=6),
    "vit_b16": dict(img_size=224, patch_size=16, dim=768, depth=12, heads=12),
    "vit_l16": dict(img_size=224, patch_size=16, dim=1024, depth=24, heads=16),
    # small images: a 4x4 patch keeps an 8x8 token grid on 32 px, like 16x16 patches on 128 px
    "cifar_ti": dict(img_size=32, patch_size=4, num_classes=10, dim=192, depth=6, heads=3),
    "cifar_s": dict(img_size=32, patch_size=4, num_classes=10, dim=384, depth=7, heads=6),
    "cifar_cpu": dict(img_size=32, patch_size=4, num_classes=10, dim=128, depth=6, heads=4, mlp_ratio=2.0),
    "mnist": dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, dim=64, depth=6, heads=2, mlp_ratio=2.0,
                  pool="mean"),  # mini_vit.py's default model
}


def create_vit(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return ViT(**{**PRESETS[name], **overrides})


def resize_pos_embed(pos_embed, new_grid, num_prefix=1):
    """(1, P + g*g, D) -> (1, P + G*G, D): bicubic interpolation of the g x g grid, the P prefix rows kept."""
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    g = math.isqrt(grid.shape[1])
    if g * g != grid.shape[1]:
        raise ValueError(f"position embedding has {grid.shape[1]} grid rows, not a square grid")
    grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, g*g, D) -> (1, D, g, g)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1)  # (1, D, G, G) -> (1, G*G, D)
    return torch.cat([prefix, grid.to(pos_embed.dtype)], dim=1)


def from_torchvision(state_dict):
    """torchvision.models.VisionTransformer state_dict -> this ViT's (timm) names. Same logits after loading."""
    if any(k.startswith("heads.pre_logits") for k in state_dict):
        raise ValueError("torchvision ViTs with a representation layer (heads.pre_logits) are not supported")
    top = {"conv_proj.weight": "patch_embed.proj.weight", "conv_proj.bias": "patch_embed.proj.bias",
           "class_token": "cls_token", "encoder.pos_embedding": "pos_embed", "encoder.ln.weight": "norm.weight",
           "encoder.ln.bias": "norm.bias", "heads.head.weight": "head.weight", "heads.head.bias": "head.bias"}
    sub = {"ln_1": "norm1", "ln_2": "norm2", "self_attention.in_proj_": "attn.qkv.", "self_attention.out_proj":
           "attn.proj", "mlp.0": "mlp.fc1", "mlp.3": "mlp.fc2", "mlp.linear_1": "mlp.fc1", "mlp.linear_2": "mlp.fc2"}
    out = {}
    for k, v in state_dict.items():
        if k in top:
            out[top[k]] = v
        elif k.startswith("encoder.layers.encoder_layer_"):
            i, rest = k[len("encoder.layers.encoder_layer_"):].split(".", 1)
            for a, b in sub.items():
                if rest.startswith(a):
                    rest = b + rest[len(a):]
                    break
            out[f"blocks.{i}.{rest}"] = v
        else:
            raise ValueError(f"unexpected key in a torchvision ViT state_dict: {k}")
    return out


HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1152: 16, 1280: 16, 1408: 16, 1664: 16}  # published ViTs' heads by width
# (a state_dict lacks them): Ti, S, B, L, SO400M, H, g, G
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def read_pretrained(source):
    """(timm-named state_dict, info) from a torchvision weights name ('vit_b_16', 'vit_l_16:IMAGENET1K_SWAG_E2E_V1'),
    or a file: a torchvision or timm ViT state_dict, or a checkpoint of this project. CheckpointError on failure."""
    info = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, classes=None, arch={}, style="torchvision", crop_pct=None)
    if os.path.isfile(source):
        obj = load_checkpoint(source, required=())
        if isinstance(obj, dict) and isinstance(obj.get("args"), dict) and "model" in obj:  # this project's ckpt
            a = obj["args"]
            info.update(style="this project", classes=obj.get("classes"), arch=a.get("arch") or {},
                        mean=a.get("mean", IMAGENET_MEAN), std=a.get("std", IMAGENET_STD), crop_pct=a.get("crop_pct"))
            info["arch"].setdefault("heads", a.get("heads") or PRESETS.get(a.get("model"), {}).get("heads"))
        for k in ("model", "state_dict"):  # DeiT's and timm's training checkpoints wrap the weights
            obj = obj[k] if isinstance(obj, dict) and isinstance(obj.get(k), dict) else obj
        obj = obj if isinstance(obj, dict) else {}
        sd = {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}  # DDP-saved: module.
    else:
        import torchvision.models as tvm
        name, _, tag = source.partition(":")
        try:
            if not name.startswith("vit_"):  # a ResNet's weights would be fetched, then refused
                raise KeyError(name)
            weights = tvm.get_model_weights(name)[tag or "DEFAULT"]
        except (ValueError, KeyError):
            if os.path.isdir(source):
                raise CheckpointError(f"--pretrained {source} is a folder: give the weights file in it") from None
            vits = [n for n in tvm.list_models() if n.startswith("vit_")]
            near = (difflib.get_close_matches(name, vits, 1) or ["vit_b_16"])[0]  # vit_b16 -> vit_b_16
            raise CheckpointError(f"--pretrained {source}: no such file, nor torchvision ViT weights (names: "
                                  f"{', '.join(vits)}; tags such as {near}:IMAGENET1K_V1)") from None
        try:
            sd = weights.get_state_dict(progress=False, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot get torchvision weights {weights} ({type(e).__name__}: offline?): download "
                                  f"{weights.url} elsewhere and pass the file, --pretrained FILE, or put it in "
                                  f"{torch.hub.get_dir()}/checkpoints/") from None
        t = weights.transforms()
        info.update(mean=tuple(t.mean), std=tuple(t.std), classes=weights.meta.get("categories"),
                    crop_pct=t.crop_size[0] / t.resize_size[0])  # 224 / 256, SWAG's 384 / 384
    if "conv_proj.weight" in sd:
        try:
            sd = from_torchvision(sd)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
    elif "patch_embed.proj.weight" in sd:
        info["style"] = "timm" if info["style"] == "torchvision" else info["style"]
    else:
        raise CheckpointError(f"{source} is not a ViT state_dict of torchvision, timm or this project (its keys: "
                              f"{', '.join(list(sd)[:3]) or 'none'}, ...)")
    return sd, info


def load_pretrained(source, num_classes, img_size=None, classes=None, **overrides):
    """(model, info): a ViT shaped by the weights of `source` (see read_pretrained), its position grid resized to
    img_size (default: the weights' own), its head replaced (zeros) unless it already has num_classes outputs
    (None: the weights' head, whatever its size) and, for a checkpoint of this project, the same class names.
    Strict apart from the head: anything else that differs is a CheckpointError naming it. overrides: ViT keywords,
    e.g. drop_path, or heads (a state_dict lacks them; the default is the published ViTs' for the width)."""
    sd, info = read_pretrained(source)
    w = sd["patch_embed.proj.weight"]  # (dim, in_chans, patch, patch)
    if w.shape[1] != 3:
        raise CheckpointError(f"{source} takes {w.shape[1]}-channel images; these scripts train on RGB (3 channels)")
    dim, patch, prefix = w.shape[0], w.shape[-1], int("cls_token" in sd)
    depth = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    grid = math.isqrt(sd["pos_embed"].shape[1] - prefix) if "pos_embed" in sd else None
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else 4 * dim  # SwiGLU: none
    ratio = hidden / dim if int(dim * (hidden / dim)) == hidden else (hidden + 0.5) / dim  # int(dim * ratio) == hidden
    arch = dict(img_size=grid * patch if grid else 224, patch_size=patch, in_chans=w.shape[1], dim=dim, depth=depth,
                heads=HEADS.get(dim, max(1, dim // 64)), qkv_bias="blocks.0.attn.qkv.bias" in sd, mlp_ratio=ratio,
                pool="cls" if prefix else "mean", pos_embed="learn" if grid else "sincos")
    arch.update({k: v for k, v in info.pop("arch").items() if k in arch and v is not None})
    if overrides.get("heads", arch["heads"]) != arch["heads"] and (info["style"] == "this project" or
                                                                   not os.path.isfile(source)):
        raise CheckpointError(f"{source} has {arch['heads']} heads: --heads is for a state_dict file, which lacks them")
    arch.update({k: overrides.pop(k) for k in list(overrides) if k in arch})  # heads=: not in a state_dict
    info.update(img_size=arch["img_size"], source=source)
    num_classes = len(sd.get("head.bias", ())) if num_classes is None else num_classes  # None: the weights' own
    arch["img_size"] = img_size or arch["img_size"]
    try:
        model = ViT(num_classes=num_classes, **arch, **overrides)
    except ValueError as e:
        raise CheckpointError(f"--pretrained {source}: {e}") from None
    if grid and grid != model.patch_embed.grid:
        try:
            sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], model.patch_embed.grid, prefix)
        except ValueError as e:  # e.g. DeiT's dist_token or register tokens: more rows than a square grid
            raise CheckpointError(f"{source}: {e}; these scripts load plain ViTs (no extra tokens)") from None
    own = model.state_dict()
    info["head_kept"] = "head.weight" in sd and sd["head.weight"].shape == own["head.weight"].shape and not (
        info["style"] == "this project" and classes and info["classes"] and list(info["classes"]) != list(classes))
    if not info["head_kept"]:
        sd = {**{k: v for k, v in sd.items() if not k.startswith("head.")},
              **{k: v for k, v in own.items() if k.startswith("head.")}}
        info["classes"] = None
    load_weights(model, sd, f"{source} ({info['style']} weights)")
    if not num_classes:
        raise CheckpointError(f"{source} has no classifier head: fine-tune it on your classes first")
    info["arch"] = arch
    return model, info


# --------------------------------------------------------------------------------------------------------- helpers


def die(msg):
    """One clear line on stderr and a non-zero exit: the scripts' answer to bad input."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def pick_device(name="auto"):
    if name == "cuda" and not torch.cuda.is_available():
        die("--device cuda asked for, but no CUDA GPU is available (use --device cpu)")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def precision(device):
    """(autocast context factory, GradScaler, label): bf16 where the GPU has it, else fp16 + loss scaling; CPU fp32
    (bf16 autocast on CPUs without AMX is far slower than fp32). On CUDA it also turns cuDNN's attention off."""
    if device.type != "cuda":
        return nullcontext, torch.amp.GradScaler("cpu", enabled=False), "fp32"
    # cuDNN's bf16 attention backward has emitted NaN gradients on H100s (kyutai-labs/pocket-tts#264), the suspect in
    # our NaN runs of vit_cifar at batch 128: SDPA picks flash attention instead
    torch.backends.cuda.enable_cudnn_sdp(False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler, str(dtype).split(".")[1]


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.999), layer_decay=1.0, muon=False):
    """[AdamW] (fused), or with muon=True [AdamW, Muon], Muon taking the blocks' weight matrices. No weight decay on
    biases, norms, pos_embed and cls_token. layer_decay < 1 scales block i's lr by layer_decay ** (depth - i), the
    embeddings' one step lower (BEiT's layer-wise decay): each group has an 'lr_scale' for set_lr to multiply."""
    depth, groups = len(getattr(model, "blocks", ())), ({}, {})  # AdamW's, Muon's
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = (int(name.split(".")[1]) + 1 if name.startswith("blocks.") else
                 0 if name.startswith(("patch_embed", "cls_token", "pos_embed")) else depth + 1)
        wd = 0.0 if p.ndim <= 1 or name.split(".")[-1] in ("pos_embed", "cls_token") else weight_decay
        scale = layer_decay ** (depth + 1 - layer)
        g = groups[muon and name.startswith("blocks.") and p.ndim == 2]
        g.setdefault((scale, wd), {"params": [], "weight_decay": wd, "lr_scale": scale})["params"].append(p)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups[0].values() for p in g["params"])  # CPU: ~10% faster
    adamw, matrices = ([g for _, g in sorted(gs.items(), key=lambda kv: (kv[0][0], -kv[0][1]))] for gs in groups)
    opts = [torch.optim.AdamW(adamw, lr=lr, betas=betas, fused=fused or None)]
    return opts + [Muon(matrices, lr)] if matrices else opts


class Muon(torch.optim.Optimizer):
    """torch.optim.Muon's maths (adjust_lr_fn='match_rms_adamw', so AdamW's lr and weight decay carry over): momentum
    whose update of each weight matrix is made semi-orthogonal by Newton-Schulz iterations (Jordan et al. 2024). Here in
    fp32 and batched over the matrices of a shape: torch's casts to bf16, which halved the img/s on a 2-core CPU."""
    def __init__(self, params, lr, weight_decay=0.0, momentum=0.95):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            shapes = {}
            for p in g["params"]:
                if p.grad is not None:
                    shapes.setdefault(p.shape, []).append(p)
            for (rows, cols), ps in shapes.items():  # foreach: one call per list, not per tensor
                grads = [p.grad for p in ps]
                for p in ps:  # (setdefault would make a zero tensor on every step)
                    if "momentum_buffer" not in self.state[p]:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                bufs = [self.state[p]["momentum_buffer"] for p in ps]
                torch._foreach_lerp_(bufs, grads, 1 - g["momentum"])
                upd = orthogonalise(torch.stack(torch._foreach_lerp(grads, bufs, g["momentum"])))  # Nesterov
                torch._foreach_mul_(ps, 1 - g["lr"] * g["weight_decay"])
                torch._foreach_add_(ps, upd.unbind(0), alpha=-g["lr"] * 0.2 * math.sqrt(max(rows, cols)))


def orthogonalise(G, steps=5, a=3.4445, b=-4.7750, c=2.0315):
    """Newton-Schulz iterations of (n, rows, cols) matrices towards U V^T of their SVDs (torch.optim.Muon's)."""
    wide = G.shape[-2] <= G.shape[-1]
    X = G if wide else G.mT  # iterate on the wide side: the Gram matrix X X^T is the smaller one
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-7)  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X if wide else X.mT.contiguous()  # as the weights' strides: torch._foreach_add_'s fast path


@torch.no_grad()
def ema_update(ema, model, first):
    """AveragedModel.update_parameters' maths without its two host reads of n_averaged: each is a GPU sync that keeps
    the CPU from queueing the next step while this one runs. first=True copies, else its multi_avg_fn (a lerp)."""
    avg, cur = [*ema.module.parameters(), *ema.module.buffers()], [*model.parameters(), *model.buffers()]
    if first:
        torch._foreach_copy_(avg, cur)
    else:
        ema.multi_avg_fn(avg, cur, ema.n_averaged)
    ema.n_averaged += 1


def load_optimizers(opts, states):
    """Load ckpt.pt's list of optimizer states (or an older single one) into opts; ValueError if the counts differ."""
    states = states if isinstance(states, list) else [states]
    if len(states) != len(opts):
        raise ValueError(f"it holds {len(states)} optimizer states, where --optimizer asks for {len(opts)}")
    for o, state in zip(opts, states):
        o.load_state_dict(state)


def optimizer_step(opts, scaler, params, clip=0.0):
    """One step of every optimizer in opts, GradScaler's way with several: unscale each (when clipping the total
    gradient norm to clip), step each, update the scale once; then the gradients are cleared."""
    if clip:
        for o in opts:
            scaler.unscale_(o)
        torch.nn.utils.clip_grad_norm_(params, clip)
    for o in opts:
        scaler.step(o)
        o.zero_grad(set_to_none=True)
    scaler.update()


def set_lr(opts, lr):
    for g in [g for o in opts for g in o.param_groups]:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def freeze_all_but_head(model):
    """A linear probe: only the head learns."""
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head.")


def apply_recipe(args, recipe, given):
    """--pretrained's fine-tuning values for the flags not given on the command line (--freeze: a linear probe's)."""
    for k, v in {**recipe, **(dict(lr=1e-3, drop_path=0.0) if args.freeze else {})}.items():
        setattr(args, k, getattr(args, k) if k in given else v)


def check_ranges(parser, args, ranges):
    """parser.error (one line, exit 2) for the first flag outside its range. ranges: {"> 0": "epochs lr", ...}, the
    flags' dest names; None (a size override not given) passes, NaN and infinity fail."""
    ops = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
    for cond, names in ranges.items():
        op, bound = cond.split()
        for k in names.split():
            v = getattr(args, k)
            finite = not isinstance(v, float) or math.isfinite(v)  # an int is exact, however large
            if v is not None and not (finite and ops[op](v, float(bound))):
                parser.error(f"--{k.replace('_', '-')} must be {cond if finite else 'finite'}, got {v}")
    if getattr(args, "threads", 0) > (os.cpu_count() or 1):  # torch.set_num_threads(100000) segfaults
        parser.error(f"--threads {args.threads} is more than this machine's {os.cpu_count()} cores")


def check_pretrained_flags(parser, args, given, shape_flags):
    """parser.error for a shape flag beside --pretrained (the weights fix the shape) and for --freeze without it."""
    shape = [k for k in shape_flags if k in given] if args.pretrained and not args.resume else []
    if shape:
        parser.error(f"--{shape[0].replace('_', '-')}: with --pretrained the model's shape comes from the weights "
                     "(--heads may correct the guess for a file: heads are not in a state_dict)")
    if args.freeze and not (args.pretrained or args.resume):  # a --resume: the checkpoint's own --freeze
        parser.error("--freeze trains only the head: it needs --pretrained SOURCE")


def check_out_dir(out_dir, resume=None):
    """One error line if out_dir holds another run's files: a ckpt.pt that is not the `resume` file, or a log.csv with
    rows, unless it lies beside the `resume` file. A header alone is from a run that stopped before its first epoch
    ended (NaN, Ctrl-C, out of memory): that one may go, so the same command can be run again."""
    ckpt, log = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "log.csv")
    if os.path.exists(ckpt) and not (resume and os.path.samefile(ckpt, resume)):
        die(f"{ckpt} exists: continue it with --resume {ckpt}, or pick another --out-dir")
    if os.path.isfile(log) and not (resume and os.path.samefile(os.path.dirname(os.path.abspath(resume)), out_dir)):
        with open(log, "rb") as f:  # bytes: a file of another encoding is refused, not a traceback
            lines = [line for line in f if line.strip()]
        if len(lines) > 1 or lines and lines[0].strip().split(b",")[:4] != [b"epoch", b"train_loss", b"test_loss",
                                                                             b"test_acc"]:  # the header of ours
            die(f"{log} holds an earlier run's rows or another file: move it away, or pick another --out-dir")


def given_args(parser, argv=None):
    """The names of the options given on the command line (parsed again with every default suppressed)."""
    saved = [a.default for a in parser._actions]
    for a in parser._actions:
        a.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(argv)))
    finally:
        for a, d in zip(parser._actions, saved):
            a.default = d


def lr_at(step, total_steps, base_lr, warmup_steps, min_lr=0.0):
    """Linear warmup to base_lr, then cosine to min_lr: a pure function of the step, so resuming is exact."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    t = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(model, batches, autocast=nullcontext, flip=False):
    """Sums over (x, y) batches: tensor [loss_sum, top1_correct, top5_correct, count] (float64, on y's device), so
    shards can be all_reduced before dividing. flip=True averages the logits of the image and its mirror."""
    was_training, sums = model.training, None
    model.eval()
    for x, y in batches:
        with autocast():
            logits = model(x).float()
            if flip:
                logits = (logits + model(x.flip(-1)).float()) / 2
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        s = torch.stack([F.cross_entropy(logits, y, reduction="sum"), (top5[:, 0] == y).sum(),
                         (top5 == y[:, None]).any(1).sum(), torch.full((), len(y), device=y.device)]).double()
        sums = s if sums is None else sums + s
    model.train(was_training)
    if sums is None:  # an empty shard still takes part in the all_reduce
        sums = torch.zeros(4, dtype=torch.float64, device=next(model.parameters()).device)
    return sums


def decode_rgb(path):
    """An image file (JPEG, PNG, GIF, WEBP) as uint8 (3, H, W) RGB, 16-bit PNGs scaled; else a one-line ValueError."""
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2.functional import to_dtype
    try:
        if not os.path.isfile(path):
            raise FileNotFoundError("not a file, or missing")
        data = read_file(path)  # read once: PIL looks at the header in memory, decode_image decodes the same bytes
        try:
            Image.open(io.BytesIO(data.numpy())).close()  # PIL refuses a decompression bomb (> 179M pixels) here
        except Image.DecompressionBombError as e:
            raise ValueError(str(e).split(",")[0]) from None  # "Image size (N pixels) exceeds limit of M pixels"
        except Exception:  # decode_image says what else is wrong
            pass
        img = decode_image(data, mode=ImageReadMode.RGB)
    except Exception as e:  # torchvision's messages start with "<function>, <file>.cpp:<line>, "
        why = re.sub(r"^[^,]+, \S+:\d+, ", "", (str(e).splitlines() or [type(e).__name__])[0])
        raise ValueError(f"cannot read image {path}: {why.split('. ')[0][:100]}") from None
    return to_dtype(img[0] if img.ndim == 4 else img, torch.uint8, scale=True)  # GIF: 1st frame; uint8: no-op


def read_image(path, size):
    """An image file as a float (3, size, size) tensor in [0, 1]."""
    img = decode_rgb(path)[None].float() / 255
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True)[0].clamp(0, 1)


def print_top5(logits, files, classes):
    probs = logits.float().softmax(-1)
    for f, p in zip(files, probs):
        top = p.topk(min(5, len(classes)))
        print(f"{f}: " + ", ".join(f"{classes[i]} {100 * v:.1f}%" for v, i in zip(top.values.tolist(), top.indices)))


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(obj, path):
    """Atomic: a crash mid-write leaves the previous checkpoint intact; so do weights gone NaN or inf, which a step
    with a finite loss but an overflowing gradient can leave (the scripts' loss checks cannot see them)."""
    w = [v for v in obj.get("model", {}).values() if v.is_floating_point()]
    if w and not torch.stack([v.isfinite().all() for v in w]).all():  # one host sync
        die(f"the model's weights became NaN or inf; {path} is not overwritten: try a lower --lr or a longer --warmup")
    tmp = f"{path}.tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # no space, no permission (torch.save raises RuntimeError)
        with suppress(OSError):  # a partial file takes the space the user must free
            os.remove(tmp)
        why = str(e).splitlines()[0][:150] + ("" if isinstance(e, OSError) else ": no space left?")  # torch's words
        die(f"cannot write {path} ({why}); the previous checkpoint, if any, is intact")


def load_checkpoint(path, required=("model",)):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} " + ("is a folder: give the ckpt.pt in it" if os.path.isdir(path)
                                                       else "not found"))
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the args of timm's and DeiT's checkpoints
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        why = ("it holds Python objects, not only tensors (a whole pickled model? save its state_dict())"
               if "Unsupported global" in str(e) else f"corrupt, truncated or not a torch file ({type(e).__name__})")
        raise CheckpointError(f"cannot read checkpoint {path}: {why}") from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: not a checkpoint of this script")
    return ckpt


def load_weights(model, state_dict, source="checkpoint"):
    """load_state_dict(strict=True) with a one-line CheckpointError naming what differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else ""]
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(p for p in parts if p))
    model.load_state_dict(state_dict)


def fmt_time(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Logger:
    """Prints plain lines and appends them to <out_dir>/log.txt; rows go to <out_dir>/log.csv."""

    def __init__(self, out_dir, columns, append=False, enabled=True):
        self.out_dir, self.columns, self.enabled, self.t0 = out_dir, columns, enabled, time.time()
        csv_path = os.path.join(out_dir, "log.csv")
        if enabled and not append:
            check_out_dir(out_dir)
        if enabled and os.path.exists(out_dir) and not os.path.isdir(out_dir):
            die(f"--out-dir {out_dir} is a file, not a folder")
        try:
            if enabled:
                os.makedirs(out_dir, exist_ok=True)
                tempfile.NamedTemporaryFile(dir=out_dir).close()  # new files too, as ckpt.pt's temp file
                if not (append and os.path.exists(csv_path)):
                    with open(csv_path, "w", newline="") as f:
                        csv.writer(f).writerow(columns)
                open(os.path.join(out_dir, "log.txt"), "a").close()
        except OSError as e:  # read-only, a file in the way, no space
            die(f"cannot write in {out_dir}: {e.strerror or e}; pick another --out-dir")

    def __call__(self, msg):
        if self.enabled:
            print(msg, flush=True)
            self._append("log.txt", lambda f: f.write(msg + "\n"))

    def row(self, **values):
        if self.enabled:
            self._append("log.csv", lambda f: csv.writer(f).writerow([values[c] for c in self.columns]))

    def _append(self, name, write):
        try:
            with open(os.path.join(self.out_dir, name), "a", newline="") as f:
                write(f)
        except OSError as e:  # a full disk mid-run
            die(f"cannot write {os.path.join(self.out_dir, name)}: {e.strerror or e}; ckpt.pt holds the last save")


class StopFlag:
    """Ctrl-C / SIGTERM set it: the loop finishes its step, saves and exits; a second signal stops at once, but for a
    SIGTERM within 5 s of the first: torchrun forwards a scheduler's SIGTERM that each of its workers also got."""

    def __init__(self, verbose=True):
        self.reasons, self.verbose, self.t = [], verbose, -math.inf  # reasons: signal names, or e.g. --stop-after
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self)

    def __call__(self, signum, _):
        if self.reasons and signum == signal.SIGTERM and time.time() - self.t < 5:
            return  # torchrun's copy of the SIGTERM that also reached this process
        if self.reasons:
            raise KeyboardInterrupt
        self.reasons.append(signal.Signals(signum).name)
        self.t = time.time()
        if self.verbose:
            print(f"{self.reasons[0]}: stopping after this step (again to stop at once)", flush=True)

    def __bool__(self):
        return bool(self.reasons)


def resume_command(ckpt_path, drop=("--resume", "--interrupt-at", "--stop-after"), launcher="python"):
    """This run's command line with --resume ckpt_path (and without the one-off flags)."""
    argv, it = [], iter(sys.argv[1:])
    for a in it:
        if a in drop:
            next(it, None)
        elif not a.startswith(tuple(d + "=" for d in drop)):
            argv.append(a)
    return f"{launcher} {shlex.join([sys.argv[0], *argv, '--resume', ckpt_path])}"


def plot_curves(csv_path, png_path):
    """Loss and accuracy per epoch from log.csv, if matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return print("matplotlib not installed: skipped curves.png")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    col = lambda k: ([float(r["epoch"]) for r in rows if r[k]], [float(r[k]) for r in rows if r[k]])  # noqa: E731
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(*col("train_loss"), marker=".", label="train")  # every epoch; test: the evaluated ones
    ax1.plot(*col("test_loss"), marker=".", label="test")
    ax2.plot(*col("test_acc"), marker=".")
    ax1.set(xlabel="epoch", title="loss"), ax2.set(xlabel="epoch", title="test accuracy %"), ax1.legend()
    try:
        fig.savefig(png_path, dpi=100)
    except OSError as e:  # the run itself is done and saved
        print(f"cannot write {png_path}: {e.strerror or e}")
    plt.close(fig)
