"""The variance reference of "On the Importance of Asymmetry for Siamese Representation Learning"
(Wang et al., CVPR 2022, Sec. 3 and 7, Fig. 2), and the partial dimensional collapse AUC of
Li, Efros and Pathak (2022), for a checkpoint of any of the six *_asym.py scripts.

Method in five lines:
    a fixed encoder: the checkpoint's source, backbone + projector (--features backbone: pool-5)
    each validation image -> r views by the design under study (augment.Views, as in training)
    z_1..z_r = normalize(encoder(views))  BN in train mode: per-batch statistics, as in pretraining
    v(image) = mean over the d dims of the variance over the r encodings = (1 - ||mean z||^2) / d
    v = mean over images; designs that raise v belong on the source, those lowering it on the target

Designs (--designs, any subset; the baseline is always measured, every ratio is to it):
    baseline    the framework's default view (its source recipe)
    multicrop   the MultiCrop small crops (96 px at 224, 16 px at 32): the r views are r small crops
    scalemix    ScaleMix views              stronger   StrongerAug (+ RandAugment)
    weaker      WeakerAug (crop + flip)     syncbn     baseline views, projector BN over k batches
    meanenc:N   MeanEnc: each of the r encodings is the normalised mean of N encodings
--collapse adds the singular-value spectrum of the backbone features (eval mode and eval views),
its cumulative explained variance and AUC (0.5 flat ... 1 rank one), and SimSiam's std x sqrt(d).
--sides measures a run instead: its source and target, each with its own views and BN, by the
training scripts' variance monitor itself (augment.asymmetry_variance with the script's
side_encode), so the numbers are those of the run's log.
--gallery draws the views of each placement (one design on one side); --grad-noise measures the
spread of the loss gradient over redrawn views of each side, per placement (Sec. 5).

Examples:
    python variance.py --checkpoint runs/quickstart --data synthetic --views 8 \\
        --num-images 512 --workers 2   # Fig. 2 on the README's quick-start run (CPU)
    python variance.py --framework mocov2 --arch resnet18 --image-size 32 --data synthetic \\
        --num-images 512 --views 8 --workers 2   # the same on a random encoder
    python variance.py --checkpoint runs/quickstart --data synthetic --sides --num-images 256 \\
        --views 8   # its log's v_source and v_target
    python variance.py --gallery --data synthetic --image-size 32   # views.png
    python variance.py --checkpoint runs/quickstart --data synthetic --grad-noise --views 16
    torchrun --nproc_per_node=8 variance.py --checkpoint runs/mocov2_asym/checkpoint.pth \\
        --data $IMAGENET --collapse   # Fig. 2 at the paper's scale
"""
import argparse
import contextlib
import csv
import importlib
import inspect
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import augment
# the per-image variance and its uniform reference: one implementation, which the training scripts'
# variance monitor (augment.asymmetry_variance) uses too
from augment import intra_sample_variance, uniform_reference  # noqa: F401 (this module's API too)

# =============================================================================================
# Arguments
# =============================================================================================
# framework -> its script, <framework>_asym.py (and a checkpoint's "framework")
FRAMEWORKS = ("mocov2", "byol", "simsiam", "simclr", "barlow", "mocov3")
DESIGNS = ("baseline", "multicrop", "scalemix", "stronger", "weaker", "syncbn", "meanenc:2")
# the paper's Fig. 2 (x1e-4): MoCo v2 800-epoch baseline source encoder, ResNet-50, ImageNet val,
# r = 32
PAPER = {"baseline": 8.5, "multicrop": 38.0, "scalemix": 29.5, "stronger": 19.7, "weaker": 6.9,
         "syncbn": 8.3, "meanenc:2": 4.2}
NAMES = {"baseline": "baseline", "multicrop": "MultiCrop", "scalemix": "ScaleMix",
         "stronger": "StrongerAug", "weaker": "WeakerAug", "syncbn": "SyncBN"}
# one design on one side (the placement study's rows): the gallery's and the gradient noise's
PLACEMENTS = ("baseline", "multicrop:source", "multicrop:target", "scalemix:source",
              "scalemix:target", "stronger:source", "stronger:target", "weaker:source",
              "weaker:target", "syncbn:source", "syncbn:target", "meanenc:3,1", "meanenc:1,3")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Variance reference (Wang et al. 2022, Fig. 2) and "
                                            "dimensional-collapse AUC",
                                formatter_class=augment.HelpFormatter,
                                epilog=__doc__[__doc__.index("Examples:"):])
    g = p.add_argument_group("data (the held-out split: val/ or test/, as the paper's validation "
                             "images)")
    g.add_argument("--data", default="synthetic",
                   help="synthetic (built in) | cifar10 | cifar100 | stl10 | ImageFolder root "
                        "with train/ and val/ or test/")
    g.add_argument("--data-root", default="data",
                   help="where cifar10 / cifar100 / stl10 are looked for and downloaded")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable images out with a warning instead of stopping: the "
                        "first --num-images are checked first and only the readable ones are "
                        "measured, each once")
    g.add_argument("--image-size", type=int,
                   help="standard crop size (default: the checkpoint's, else 224)")
    g.add_argument("--num-images", type=int, default=0,
                   help="first N held-out images (0: all; --skip-bad-images: the readable ones "
                        "among them); rounded down to a multiple of --batch-size")
    g.add_argument("--workers", type=int, default=4,
                   help="data loading processes per process (each holds a batch of B x r views: "
                        "fewer if memory is short)")
    g = p.add_argument_group("encoder")
    g.add_argument("--checkpoint", help="checkpoint.pth of any *_asym.py script, or its output dir "
                   "(none: a random-init encoder)")
    g.add_argument("--framework", choices=FRAMEWORKS,
                   help="which script's encoder and default views (default: detected from the "
                        "checkpoint, else mocov2)")
    g.add_argument("--arch", help="random-init encoder: its architecture (default resnet50); with "
                   "--checkpoint it comes from the checkpoint, and a different --arch is an error")
    g.add_argument("--cifar-stem", action="store_true", help="random-init encoder: 3x3 stride-1 "
                   "stem, no max-pool (with --checkpoint: from the checkpoint; given for one "
                   "without it, an error)")
    g.add_argument("--features", choices=["projector", "backbone"], default="projector",
                   help="encodings: backbone + projector (the paper) or the pool-5 backbone "
                        "features")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision; auto: bf16 (or fp16 without bf16 support) on CUDA, off "
                        "on CPU")
    g = p.add_argument_group("variance reference")
    g.add_argument("--designs", nargs="+", default=list(DESIGNS), metavar="DESIGN",
                   help="any of baseline multicrop scalemix stronger weaker syncbn meanenc:N")
    g.add_argument("--views", type=int, default=32, metavar="R",
                   help="r views per image (the paper: 32)")
    g.add_argument("--batch-size", type=int, default=32,
                   help="B images per BN batch, one view each: one device's batch in pretraining "
                        "(the paper: 256 on 8 GPUs)")
    g.add_argument("--syncbn-devices", type=int, default=8,
                   help="syncbn: the projector BN sees k batches of B at once, as SyncBN over k "
                        "devices would")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the views (per image) and a random-init encoder")
    g = p.add_argument_group("the run's own source and target (the training scripts' variance "
                             "monitor)")
    g.add_argument("--sides", action="store_true",
                   help="instead of --designs: the checkpoint's source and target, each with its "
                        "run's views, designs, BN and --seed, in its run's BN batches: the numbers "
                        "its variance monitor logs (v_source, v_target, v_ratio, ...), by the "
                        "monitor's own code; --num-images 256 --views 8 are its defaults")
    g.add_argument("--bn-splits", type=int,
                   help="--sides: per-device BN groups per process (default: the checkpoint's "
                        "--bn-splits); a run on W processes measured on one: W x its --bn-splits "
                        "(or run this on W processes)")
    g = p.add_argument_group("the views gallery and the gradient noise (the paper's Sec. 5)")
    g.add_argument("--gallery", action="store_true",
                   help="instead of --designs: draw the source's and the target's views of each "
                        "--placements for --gallery-images held-out images (views.png)")
    g.add_argument("--gallery-images", type=int, default=3,
                   help="images in the gallery, spread evenly over the held-out split")
    g.add_argument("--grad-noise", action="store_true",
                   help="instead of --designs: the checkpoint's loss gradient dL/dW on one batch "
                        "of held-out images (--num-images, default the run's --batch-size), "
                        "redrawing the target's views R = --views times (V_t), the source's (V_s) "
                        "or both (V), per --placements (gradient_noise.md, .csv)")
    g.add_argument("--placements", nargs="+", default=list(PLACEMENTS), metavar="PLACEMENT",
                   help="DESIGN:SIDE (multicrop, scalemix, stronger, weaker, syncbn on source, "
                        "target or both), meanenc:NS,NT (views averaged on each side), baseline")
    g.add_argument("--grad-params", choices=["last", "all"], default="last",
                   help="W: the source projector's last linear layer (the paper's, before z) or "
                        "every source parameter")
    g = p.add_argument_group("dimensional collapse")
    g.add_argument("--collapse", action="store_true", help="also the singular-value spectrum and "
                   "its AUC (Li et al. 2022): min(N, D) singular values of N images x D "
                   "dimensions, as their torch.svd(R).S")
    g.add_argument("--collapse-l2", action="store_true", help="l2-normalise the feature rows "
                   "before centring (default: raw pool-5)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/variance",
                   help="variance.md, variance.csv, variance_per_image.csv, plots; views.png "
                        "(--gallery); gradient_noise.md, .csv (--grad-noise)")
    g.add_argument("--print-freq", type=int, default=10, help="a progress line every N batches")
    return p.parse_args(argv)


def parse_design(name):
    """'meanenc:3' -> ('meanenc', 3); 'multicrop' -> ('multicrop', 1). Unknown names raise
    InputError."""
    kind, _, n = name.partition(":")
    if kind == "meanenc":
        if not n.isdigit() or int(n) < 1:
            raise augment.InputError(f"--designs {name}: write meanenc:N with N >= 1 encodings "
                                     f"averaged (e.g. meanenc:2)")
        return kind, int(n)
    if kind not in DESIGNS or n:
        raise augment.InputError(f"--designs {name}: unknown design (baseline, multicrop, "
                                 f"scalemix, stronger, weaker, syncbn, meanenc:N)")
    return kind, 1


def design_name(design):
    kind, n = parse_design(design)
    return f"MeanEnc(n={n})" if kind == "meanenc" else NAMES[kind]


# =============================================================================================
# Data and views
# =============================================================================================
class DesignViews:
    """Image -> (r*n)x3xSxS: the r views (n per encoding for MeanEnc) of one design, made by
    augment.Views on the source with the same flags training uses."""

    def __init__(self, design, size, framework, r):
        kind, n = parse_design(design)
        self.key = "source_small" if kind == "multicrop" else "source"
        self.views = augment.Views(
            size, framework, source_aug=kind if kind in ("stronger", "weaker") else "default",
            n_source=1 if kind == "multicrop" else r * n, multicrop=r if kind == "multicrop" else 0,
            multicrop_on="source", scalemix_on="source" if kind == "scalemix" else None)

    def __call__(self, image):
        return self.views(image)[self.key]


def image_batches(images, args):
    """Batches of B consecutive images (indices into the data set) in groups of k batches (one
    SyncBN group); process i takes every world-th group, so every design sees the same BN batches
    on any number of processes."""
    b, k = args.batch_size, args.syncbn_devices
    batches = [list(images[start:start + b]) for start in range(0, len(images), b)]
    groups = [batches[start:start + k] for start in range(0, len(batches), k)]
    return [batch for group in groups[rank()::world_size()] for batch in group]


def loader(dataset, batches, args):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                       pin_memory=torch.cuda.is_available(),
                                       # batches of B x r views are large
                                       prefetch_factor=1 if args.workers else None)


# =============================================================================================
# Model (the script's own Encoder, loaded from its checkpoint)
# =============================================================================================
world_size, rank = augment.world_size, augment.rank


def script_defaults(framework):
    module = importlib.import_module(f"{framework}_asym")
    return module, vars(module.parse_args([]))


def detect_framework(stored):
    """The script whose arguments the checkpoint stores: the closest set of argument names
    (each script's set differs from the others' by a few flags)."""
    return min(FRAMEWORKS, key=lambda name: len(set(stored) ^ set(script_defaults(name)[1])))


def checkpoint_framework(ckpt):
    """The script that wrote the checkpoint: its "framework", else (a checkpoint without one) the
    closest set of argument names (detect_framework)."""
    return ckpt["framework"] if "framework" in ckpt else detect_framework(ckpt["args"])


def read_checkpoint(path):
    """checkpoint.pth (or its output dir) -> its dict; anything else raises InputError."""
    path = os.path.join(path, "checkpoint.pth") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        raise augment.InputError(f"--checkpoint {path}: no such file")
    ckpt = augment.load_weights(path)
    if not isinstance(ckpt, dict) or not {"args", "source"} <= set(ckpt):
        raise augment.InputError(f"--checkpoint {path}: not a checkpoint.pth of the *_asym.py "
                                 f"scripts (no 'args' and 'source'; backbone.pth holds the "
                                 f"backbone only)")
    return ckpt


def build_encoder(args, device):
    """The source encoder (its backbone and projector; a predictor, where the script has one, is
    loaded but not used), from --checkpoint or randomly initialised as the script would at --seed.
    -> encoder, framework, the script's arguments."""
    ckpt = read_checkpoint(args.checkpoint) if args.checkpoint else None
    framework = args.framework or (checkpoint_framework(ckpt) if ckpt else "mocov2")
    module, defaults = script_defaults(framework)
    if ckpt:
        model_args = argparse.Namespace(**{**defaults, **ckpt["args"]})
        if args.arch and args.arch != model_args.arch:
            raise augment.InputError(f"--arch {args.arch}, but --checkpoint {args.checkpoint} "
                                     f"holds a {model_args.arch}: leave --arch out (the checkpoint "
                                     f"brings its own) or pass --arch {model_args.arch}")
        if args.cifar_stem and not model_args.cifar_stem:
            raise augment.InputError(f"--cifar-stem, but --checkpoint {args.checkpoint} has the "
                                     f"ImageNet stem: leave it out")
    else:
        known = module.RESNETS + list(getattr(module, "VITS", []))
        if (args.arch or "resnet50") not in known:
            raise augment.InputError(f"--arch {args.arch} is not an architecture of "
                                     f"{framework}_asym.py ({', '.join(known)})")
        model_args = argparse.Namespace(**{**defaults, "arch": args.arch or "resnet50",
                                           "cifar_stem": args.cifar_stem,
                                           "image_size": args.image_size or 224})
    torch.manual_seed(args.seed)
    with_predictor = "predictor" in inspect.signature(module.Encoder).parameters
    encoder = module.Encoder(model_args, predictor=True) if with_predictor else \
        module.Encoder(model_args)
    if ckpt:
        try:
            encoder.load_state_dict(ckpt["source"])
        except RuntimeError as e:
            raise augment.InputError(f"--checkpoint {args.checkpoint}: its source does not fit "
                                     f"{framework}_asym.py's encoder "
                                     f"({' '.join(str(e).split())[:200]})") from None
    # BN runs in train mode below (batch statistics) but must not overwrite the running statistics
    # the checkpoint holds: --collapse uses them in eval mode
    for m in encoder.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    return encoder.to(device).requires_grad_(False), framework, model_args


# =============================================================================================
# Measures
# =============================================================================================
def cumulative_explained_variance(s):
    """Singular values s_1 >= ... >= s_D (not squared) -> CEV_k = sum_{j<=k} s_j / sum_j s_j (D),
    and its AUC = mean_k CEV_k: (D+1)/(2D) for a flat spectrum, 1 for rank one."""
    s = s.double().sort(descending=True).values
    cev = s.cumsum(0) / s.sum()
    return cev, cev.mean().item()


def singular_values(features, l2=False):
    """N x D features -> the min(N, D) singular values of the column-centred matrix, as Li et al.'s
    torch.svd(R).S: with N < D the curve has N points, not D padded with zeros (which would count
    the D - N missing directions as collapsed and raise the AUC)."""
    r = F.normalize(features.double(), dim=1) if l2 else features.double()
    return torch.linalg.svdvals(r - r.mean(0))


def simsiam_std(z):
    """Std over images of the l2-normalised rows, averaged over channels, x sqrt(D): about 1 when
    spread on the sphere, 0 when collapsed (SimSiam's monitor)."""
    return (F.normalize(z.double(), dim=1).std(0).mean() * math.sqrt(z.shape[1])).item()


# =============================================================================================
# Loop and output
# =============================================================================================
def autocast(device, args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def backbone_features(encoder, views, n, device, args):
    """B x (r*n) x 3xSxS views of B images -> r x n x B x F pool-5 features. The n views of one
    MeanEnc encoding go through one forward (n*B, view-major), sharing BN as in pretraining."""
    b = views.shape[0]
    views = views.transpose(0, 1).reshape(-1, n * b, *views.shape[2:])  # r x (n*B) x 3xSxS
    with autocast(device, args):
        features = [encoder.backbone(x.to(device, non_blocking=True)) for x in views]
    return torch.stack(features).view(len(views), n, b, -1)


@torch.no_grad()
def encodings(encoder, features, device, args):
    """r x n x G x F features -> r x G x D encodings: the projector over each view's n*G rows in
    one batch (G = B, or k*B for syncbn), then the un-normalised mean of the n (MeanEnc)."""
    r, n, g, _ = features.shape
    if args.features == "backbone":
        z = features
    else:
        with autocast(device, args):
            z = torch.stack([encoder.projector(f.flatten(0, 1)) for f in features])  # r x (n*G) x D
    return z.float().view(r, n, g, -1).mean(1)


class Progress:
    """A line every --print-freq batches: images/s of the design being measured and the ETA of
    all designs, counting views (MeanEnc:N costs N x r per image) as the work."""

    def __init__(self, total_views, args):
        self.total, self.done, self.start, self.args = total_views, 0, time.time(), args

    def begin(self, design, n_images):
        self.design, self.n_images, self.images = design, n_images, 0
        self.design_start = time.time()

    def update(self, images, views, batch_index, last):
        self.images, self.done = self.images + images, self.done + views
        if rank() != 0 or not (last or (batch_index + 1) % self.args.print_freq == 0):
            return
        now = time.time()
        rate = self.images * world_size() / max(now - self.design_start, 1e-9)
        done = self.done * world_size()  # every process does about the same share
        eta = max(self.total - done, 0) * (now - self.start) / done
        print(f"{self.design}: {self.images * world_size()}/{self.n_images} images, "
              f"{rate:.1f} images/s, ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
              flush=True)


@torch.no_grad()
def measure(encoder, design, dataset, batches, device, progress, args):
    """Per-image variance of one design over this process's batches -> N_local, and d."""
    kind, n = parse_design(design)
    group = args.syncbn_devices if kind == "syncbn" else 1
    encoder.train()  # BN with per-batch statistics, as in pretraining
    dataset.transform = DesignViews(design, args.image_size, args.framework, args.views)
    out, pending = [], []
    for i, (views, _) in enumerate(loader(dataset, batches, args)):
        pending.append(backbone_features(encoder, views, n, device, args))
        last = i == len(batches) - 1
        # +---------------------------------------------------------------------------------+
        # | SyncBN on one process: the backbone keeps per-device BN (batches of B), and the  |
        # | projector normalises k batches at once: the statistics SyncBN over k devices     |
        # | gives the projector BN. Other designs: projector over each batch of B.           |
        # +---------------------------------------------------------------------------------+
        if len(pending) == group or last:  # a group's batches all come in a row (image_batches)
            z = encodings(encoder, torch.cat(pending, dim=2), device, args)  # r x G x D
            out.append(intra_sample_variance(z).cpu())
            pending = []
        progress.update(len(views), views.shape[0] * views.shape[1], i, last)
    return torch.cat(out), z.shape[-1]


@torch.no_grad()
def eval_features(encoder, dataset, batches, device, args):
    """Pool-5 features of this process's images, eval mode and eval views -> N_local x F."""
    encoder.eval()
    dataset.transform = augment.eval_transform(args.image_size)
    out = []
    for images, _ in loader(dataset, batches, args):
        with autocast(device, args):
            out.append(encoder.backbone(images.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out)


def gather_in_order(x, indices):
    """This process's rows and their image indices -> every process's rows in image order (rank 0
    uses them)."""
    if world_size() == 1:
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    n = torch.tensor([len(x)], device=device)
    sizes = [torch.empty_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    n_max = int(max(sizes))
    rows = torch.zeros(n_max, *x.shape[1:], dtype=x.dtype, device=device)
    rows[:len(x)] = x.to(device)
    index = torch.full((n_max,), -1, dtype=torch.long, device=device)
    index[:len(x)] = torch.as_tensor(indices, device=device)
    all_rows = [torch.empty_like(rows) for _ in sizes]
    all_index = [torch.empty_like(index) for _ in sizes]
    dist.all_gather(all_rows, rows)
    dist.all_gather(all_index, index)
    rows, index = torch.cat(all_rows).cpu(), torch.cat(all_index).cpu()
    return rows[index >= 0][index[index >= 0].argsort()]


def pyplot():
    """matplotlib.pyplot without a display, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_cdfs(per_image, path, plt):
    """Fig. 2: each design's CDF of per-image variance against the baseline's, means dotted;
    red where the design raises the mean variance, blue where it lowers it."""
    designs = [d for d in per_image if d != "baseline"] or ["baseline"]
    cols = min(3, len(designs))
    rows = math.ceil(len(designs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    base = per_image["baseline"].numpy() * 1e4
    for ax, design in zip(axes.flat, designs):
        v = per_image[design].numpy() * 1e4
        colour = "tab:red" if v.mean() > base.mean() else "tab:blue"
        curves = ((base, "baseline", "grey"), (v, design_name(design), colour))
        for values, name, c in curves[:1 if design == "baseline" else 2]:
            ax.plot(np.sort(values), np.arange(1, len(values) + 1) / len(values), color=c,
                    label=f"{name}, mean {values.mean():.1f}")
            ax.axvline(values.mean(), color=c, linestyle=":")
        ax.set_xlabel("per-image variance (x1e-4)")
        ax.set_ylabel("fraction of images")
        ax.legend(fontsize=8, loc="lower right")
    for ax in axes.flat[len(designs):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_spectrum(s, cev, auc, path, plt):
    """Normalised singular values (log) and the cumulative explained variance with its AUC."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    k = np.arange(1, len(s) + 1)
    left.semilogy(k, (s / s[0]).clamp(min=1e-12).numpy())
    left.set_xlabel("k")
    left.set_ylabel("s_k / s_1")
    right.plot(k, cev.numpy(), label=f"AUC {auc:.3f}")
    right.plot(k, k / len(k), color="grey", linestyle=":", label="flat spectrum")
    right.set_xlabel("k")
    right.set_ylabel("cumulative explained variance")
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def direction(design, v, base):
    """Whether the design raises (up) or lowers (down) v, ours (per-image v of the design and of
    the baseline, the same images) and the paper's: "up, up: agrees"; "within noise" where the
    mean paired difference is within twice its standard error."""
    if design == "baseline" or design not in PAPER:
        return ""
    paper = "up" if PAPER[design] > PAPER["baseline"] else "down"
    diff = (v - base).double()
    if diff.abs().mean() == 0 or diff.mean().abs() <= 2 * diff.std() / math.sqrt(len(diff)):
        return f"within noise, {paper}"
    ours = "up" if diff.mean() > 0 else "down"
    return f"{ours}, {paper}: {'agrees' if ours == paper else 'differs'}"


def ordering(v):
    """The designs by v (design -> mean v), against the paper's order: the pairs ordered alike."""
    ours = sorted(v, key=v.get, reverse=True)
    shared = [d for d in sorted(PAPER, key=PAPER.get, reverse=True) if d in v]
    pairs = [(a, b) for i, a in enumerate(shared) for b in shared[i + 1:]]  # a above b (paper)
    alike = sum(v[a] > v[b] for a, b in pairs)
    return (f"Ordered by v: {' > '.join(design_name(d) for d in ours)}; the paper's: "
            f"{' > '.join(design_name(d) for d in shared)}; {alike} of {len(pairs)} pairs of "
            f"designs in the paper's order.")


def write_outputs(per_image, images, collapse, d, info, args):
    """variance.md (printed too), variance.csv, variance_per_image.csv (one row per data-set index
    in `images`), collapse_spectrum.csv and the plots."""
    os.makedirs(args.output_dir, exist_ok=True)
    base = per_image["baseline"].mean().item()
    lines = [f"Variance reference: {info}. Encodings uniform on the sphere give (1 - 1/r)/d = "
             f"{1e4 * uniform_reference(args.views, d):.1f}e-4 for r={args.views}, d={d}.", "",
             "| design | v (x1e-4) | v / v_baseline | paper v (x1e-4) | paper v / v_baseline | "
             "direction (ours, beyond twice the paired standard error; paper's) |",
             "|---|---|---|---|---|---|"]
    with open(os.path.join(args.output_dir, "variance.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["design", "variance", "ratio_to_baseline", "images", "views", "dim"])
        for design, v in per_image.items():
            mean = v.mean().item()
            paper = PAPER.get(design)
            paper_cells = f"{paper:.1f} | {paper / PAPER['baseline']:.2f}" if paper else "- | -"
            lines.append(f"| {design_name(design)} | {mean * 1e4:.2f} | {mean / base:.2f} | "
                         f"{paper_cells} | {direction(design, v, per_image['baseline'])} |")
            writer.writerow([design, f"{mean:.6e}", f"{mean / base:.4f}", len(v), args.views, d])
    lines += ["", ordering({design: v.mean().item() for design, v in per_image.items()})]
    with open(os.path.join(args.output_dir, "variance_per_image.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image"] + list(per_image))
        for image, row in zip(images, torch.stack(list(per_image.values()), dim=1).tolist()):
            writer.writerow([image] + [f"{v:.6e}" for v in row])
    plt = pyplot()
    notes = []
    if plt:
        plot_cdfs(per_image, os.path.join(args.output_dir, "variance.png"), plt)
    else:
        notes.append("plots skipped: matplotlib is not installed (pip install matplotlib)")
    if collapse:
        s, cev, auc, std, n, d_features, rows = collapse
        lines += ["", "Partial dimensional collapse (Li, Efros, Pathak 2022): backbone features, "
                      "eval mode and eval views.", "",
                  "| images N | dim D | singular values min(N, D) | rows | AUC | std x sqrt(D) |",
                  "|---|---|---|---|---|---|",
                  f"| {n} | {d_features} | {len(s)} | {rows} | {auc:.3f} | {std:.3f} |"]
        with open(os.path.join(args.output_dir, "collapse_spectrum.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["k", "singular_value", "cev"])
            for k, (sk, ck) in enumerate(zip(s.tolist(), cev.tolist()), 1):
                writer.writerow([k, f"{sk:.6e}", f"{ck:.6f}"])
        if plt:
            plot_spectrum(s, cev, auc, os.path.join(args.output_dir, "collapse.png"), plt)
    with open(os.path.join(args.output_dir, "variance.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines + [""] + notes), flush=True)


def collapse_measures(features, args):
    """N x F backbone features -> singular values, CEV, AUC, SimSiam std x sqrt(F), N, F, row
    treatment."""
    n, f = features.shape
    if n < f:
        print(f"note: {n} images < {f} dimensions: the spectrum has {n} values (Li et al.'s "
              f"min(N, D)), at most {n - 1} of them non-zero, so the AUC compares only at equal N; "
              f"use more images than dimensions", flush=True)
    s = singular_values(features, args.collapse_l2)
    cev, auc = cumulative_explained_variance(s)
    return s, cev, auc, simsiam_std(features), n, f, "l2-normalised" if args.collapse_l2 else "raw"


def check_args(args, n_images):
    """Impossible settings as one clear error, before any work."""
    problems = []
    if args.views < 2:
        problems.append(f"--views {args.views}: a variance needs 2 or more views per image")
    if args.batch_size < 2:
        problems.append(f"--batch-size {args.batch_size}: BN in train mode needs 2 or more images "
                        f"per batch")
    elif n_images < args.batch_size:
        problems.append(f"{n_images} images is fewer than one --batch-size {args.batch_size}")
    if args.syncbn_devices < 1:
        problems.append(f"--syncbn-devices {args.syncbn_devices} must be 1 or more")
    if args.print_freq < 1:
        problems.append("--print-freq must be 1 or more")
    groups = math.ceil(n_images // max(args.batch_size, 1) / max(args.syncbn_devices, 1))
    if n_images >= args.batch_size >= 2 and groups < world_size():
        problems.append(f"{groups} groups of --syncbn-devices x --batch-size images for "
                        f"{world_size()} processes: use more images or fewer processes")
    if problems:
        raise augment.InputError("; ".join(problems))


def run(args):
    """variance.py: --designs on one encoder, or --sides of a run."""
    if "WORLD_SIZE" in os.environ:  # torchrun: env:// rendezvous
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    if args.amp == "auto":
        args.amp = "off" if device.type != "cuda" else \
            "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    modes = [name for name in ("sides", "gallery", "grad_noise") if getattr(args, name)]
    if len(modes) > 1:
        raise augment.InputError(f"{' and '.join('--' + m.replace('_', '-') for m in modes)}: "
                                 f"one at a time")
    if args.sides:
        measure_sides(args, device)
    elif args.gallery:
        gallery(args)
    elif args.grad_noise:
        grad_noise(args, device)
    else:
        measure_designs(args, device)
    if dist.is_initialized():
        dist.barrier()  # rank 0 hosts the rendezvous store: nobody leaves before all are done
        dist.destroy_process_group()


def measure_designs(args, device):
    """Fig. 2: every design's views on one fixed encoder (the checkpoint's source or a random
    one)."""
    # baseline first, once
    designs = list(dict.fromkeys(["baseline"] + [d.lower() for d in args.designs]))
    for design in designs:
        parse_design(design)
    encoder, args.framework, model_args = build_encoder(args, device)
    args.image_size = args.image_size or model_args.image_size
    dataset = augment.dataset(args.data, "test", None, args.data_root, args.seed)
    # the first N held-out images
    images = list(range(min(args.num_images or len(dataset), len(dataset))))
    check_args(args, len(images))
    skipped = 0
    if args.skip_bad_images:  # each readable image once: read them all now, measure those that load
        images, skipped = augment.readable(dataset.base, images, args.workers, "held-out images")
        check_args(args, len(images))
    n_images = len(images) - len(images) % args.batch_size
    batches = image_batches(images[:n_images], args)
    indices = [i for batch in batches for i in batch]
    if args.features == "backbone" and "syncbn" in designs and rank() == 0:
        print("note: --features backbone has no projector BN, so syncbn equals the baseline",
              flush=True)

    per_image = {}
    progress = Progress(sum(args.views * parse_design(design)[1] for design in designs) * n_images,
                        args)
    for design in designs:
        progress.begin(design, n_images)
        v, d = measure(encoder, design, dataset, batches, device, progress, args)
        per_image[design] = gather_in_order(v, indices)
    features = gather_in_order(eval_features(encoder, dataset, batches, device, args), indices) \
        if args.collapse else None
    if rank() == 0:
        collapse = features is not None and collapse_measures(features, args)
    if rank() == 0:
        source = f"{args.framework}_asym.py " + (
            f"checkpoint {args.checkpoint}" if args.checkpoint else
            f"random-init {model_args.arch} (seed {args.seed})")
        feature = "backbone + projector" if args.features == "projector" else "pool-5 backbone"
        unreadable = f" ({skipped} unreadable left out)" if args.skip_bad_images else ""
        info = (f"{source}, source {feature} (d={d}), {n_images} {args.data} held-out "
                f"images{unreadable} at {args.image_size} px, r={args.views} views, BN batches of "
                f"{args.batch_size} (syncbn: {args.syncbn_devices} x {args.batch_size})")
        write_outputs(per_image, images[:n_images], collapse, d, info, args)


def measure_sides(args, device):
    """--sides: the checkpoint's source and target measured by its own script's variance monitor
    (augment.asymmetry_variance with the script's side_encode, the one implementation: the same
    numbers as the run's log for the same views and images), on the first --num-images held-out
    images with --views draws per side."""
    if not args.checkpoint:
        raise augment.InputError("--sides measures a run's own source and target: give its "
                                 "--checkpoint")
    if args.features != "projector":
        raise augment.InputError("--sides measures the projector's encodings, as the monitor: "
                                 "leave --features out")
    if args.views < 2:
        raise augment.InputError(f"--views {args.views}: a variance needs 2 or more views per "
                                 f"image")
    ckpt = read_checkpoint(args.checkpoint)
    framework = args.framework or checkpoint_framework(ckpt)
    module, defaults = script_defaults(framework)
    run_args = argparse.Namespace(**{**defaults, **ckpt["args"]})
    if args.image_size and args.image_size != run_args.image_size:
        raise augment.InputError(f"--image-size {args.image_size}, but --sides measures the run's "
                                 f"views, at its {run_args.image_size} px: leave it out")
    if args.bn_splits is not None and args.bn_splits < 1:
        raise augment.InputError(f"--bn-splits {args.bn_splits} must be 1 or more")
    run_args.variance_views, run_args.workers, run_args.amp = args.views, args.workers, args.amp
    run_args.bn_splits = args.bn_splits or run_args.bn_splits
    dataset = augment.dataset(args.data, "test", None, args.data_root)
    # the first N held-out images
    images = list(range(min(args.num_images or len(dataset), len(dataset))))
    skipped = 0
    if args.skip_bad_images:  # the readable ones among them, each once
        images, skipped = augment.readable(dataset.base, images, args.workers, "held-out images")
    run_args.variance_images = len(images)
    probe = augment.probe_loader(torch.utils.data.Subset(dataset.base, images),
                                 module.make_views(run_args), run_args)
    source, target = module.build_encoders(run_args, device)
    try:
        source.load_state_dict(ckpt["source"])
        target.load_state_dict(ckpt["target"])
    except RuntimeError as e:
        raise augment.InputError(f"--checkpoint {args.checkpoint}: it does not fit "
                                 f"{framework}_asym.py's encoders "
                                 f"({' '.join(str(e).split())[:200]})") from None
    encode = lambda x, side: module.side_encode(source, target, x, side, run_args)  # noqa: E731
    record = augment.asymmetry_variance((source, target), encode, probe, device, run_args)
    if rank() == 0:
        used = sum(len(batch) for batch in probe.batch_sampler) // args.views * world_size()
        unreadable = f" ({skipped} unreadable left out)" if args.skip_bad_images else ""
        epoch = ckpt["step"] / ckpt["steps_per_epoch"]
        info = (f"{framework}_asym.py checkpoint {args.checkpoint} (step {ckpt['step']}, epoch "
                f"{epoch:g}): {used} of the first {len(images)} {args.data} held-out "
                f"images{unreadable} (whole BN batches), r={args.views} draws of the run's views "
                f"per side")
        write_sides(record, info, run_args, args)


def write_sides(record, info, run_args, args):
    """variance.md (printed too) and variance_sides.json (the monitor's record) for --sides."""
    os.makedirs(args.output_dir, exist_ok=True)
    lines = [f"Variance of each side: {info}.", "",
             "| side | v (x1e-4) | encodings per image K | uniform (1 - 1/K)/d (x1e-4) | "
             "std x sqrt(d) |", "|---|---|---|---|---|"]
    for side in ("source", "target"):
        uniform = record[f"v_uniform_{side}"]
        small = run_args.multicrop if run_args.multicrop_on in (side, "both") else 0
        k = args.views * (1 + small)
        lines.append(f"| {side} | {record[f'v_{side}'] * 1e4:.2f} | {k} | {uniform * 1e4:.2f} | "
                     f"{record[f'v_std_{side}']:.3f} |")
    verdict = ("below 1: the target varies less, the paper's placement" if record["v_ratio"] < 1
               else "above 1: the target varies more than the source, which the paper finds hurts")
    lines += ["", f"v_target / v_source = {record['v_ratio']:.3f} ({verdict})."]
    with open(os.path.join(args.output_dir, "variance_sides.json"), "w") as f:
        json.dump(record, f)
    with open(os.path.join(args.output_dir, "variance.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


# =============================================================================================
# Placements: one design on one side, as the scripts' flags (the gallery, the gradient noise)
# =============================================================================================
# the scripts' design flags with no design anywhere: a placement adds its own to these
PLAIN = {"multicrop": 0, "multicrop_on": "source", "scalemix_on": None, "source_aug": "default",
         "target_aug": "default", "syncbn_on": None, "mean_enc_source": 1, "mean_enc": 1}


def placement(spec):
    """'scalemix:target' -> ("ScaleMix target", the scripts' flags that place it there);
    'meanenc:1,3' -> ("MeanEnc (1,3)", 1 source and 3 target encodings averaged); 'baseline'."""
    design, _, side = spec.lower().partition(":")
    sides = ["source", "target"] if side == "both" else [side]
    if spec == "baseline":
        return "baseline", {}
    if design == "meanenc" and re.fullmatch(r"[1-9]\d*,[1-9]\d*", side):
        n_s, n_t = side.split(",")
        return f"MeanEnc ({n_s},{n_t})", {"mean_enc_source": int(n_s), "mean_enc": int(n_t)}
    if design in NAMES and design != "baseline" and side in ("source", "target", "both"):
        flags = {"multicrop": {"multicrop": 6, "multicrop_on": side},
                 "scalemix": {"scalemix_on": side}, "syncbn": {"syncbn_on": side},
                 "stronger": {f"{s}_aug": "stronger" for s in sides},
                 "weaker": {f"{s}_aug": "weaker" for s in sides}}[design]
        return f"{NAMES[design]} {side}", flags
    raise augment.InputError(f"--placements {spec}: write DESIGN:SIDE (multicrop, scalemix, "
                             f"stronger, weaker or syncbn on source, target or both), "
                             f"meanenc:NS,NT or baseline")


def placed(run_args, spec):
    """A run's arguments with its designs replaced by one placement's."""
    return argparse.Namespace(**{**vars(run_args), **PLAIN, **placement(spec)[1]})


# =============================================================================================
# The views gallery: what each placement gives the source and the target (Fig. 2, top row)
# =============================================================================================
@contextlib.contextmanager
def recorded_boxes(boxes):
    """ScaleMix's boxes, appended to `boxes` in the order augment.scalemix draws them."""
    draw = augment.random_scalemix_box

    def record(height, width):
        boxes.append(draw(height, width))
        return boxes[-1]
    augment.random_scalemix_box = record
    try:
        yield boxes
    finally:
        augment.random_scalemix_box = draw


def to_uint8(view):
    """A normalised float 3xHxW view -> uint8 3xHxW pixels."""
    mean, std = augment.imagenet_mean_std(view.device)
    return (view[None] * std + mean)[0].clamp(0, 1).mul(255).round().to(torch.uint8)


def gallery_cells(views, images, seed=0):
    """The views training draws for each image -> [(image index, side, label, uint8 3xHxW, ScaleMix
    box (top, bottom, left, right) or None)], the source's first. Labels: S/T the standard views
    (numbered where MeanEnc draws several), s/t MultiCrop's small crops, "mix" a ScaleMix view.
    Image i's views are seeded by (seed, i): the same picture every time."""
    cells = []
    for i, image in enumerate(images):
        with torch.random.fork_rng(devices=[]), recorded_boxes([]) as boxes:
            torch.manual_seed(seed * 1_000_003 + i)
            drawn = views(image)
        for kind, n in sorted(views.counts().items(), key=lambda kv: not kv[0].startswith("s")):
            side, small = kind.split("_")[0], kind.endswith("_small")
            mixed = not small and views.scalemix_on in (side, "both")
            letter = side[0] if small else side[0].upper()
            for j, view in enumerate(drawn[kind]):
                label = letter + (str(j + 1) if n > 1 else "") + (" mix" if mixed else "")
                cells.append((i, side, label, to_uint8(view), boxes.pop(0) if mixed else None))
    return cells


def draw_gallery(rows, path, zoom=3, title=""):
    """rows: [(name, cells)] -> one PNG: a row per placement, per image the source's views then
    the target's, each labelled; ScaleMix's pasted box outlined in red; views at `zoom`x their
    pixels, so MultiCrop's small crops show at their size."""
    from PIL import Image, ImageDraw, ImageFont
    font, pad, label_w, text_h = ImageFont.load_default(size=11), 6, 130, 14
    height = text_h + zoom * max(c[3].shape[1] for _, cells in rows for c in cells)
    layout, width = [], 0
    for name, cells in rows:  # x of every cell: images apart by 3 pads, sides apart by 2
        x, placed_cells, last, lines = label_w, [], None, []
        for cell in cells:
            if last is not None and cell[0] != last[0]:  # the next image: a grey line between
                lines.append(x + pad)
                x += 3 * pad
            elif last is not None and cell[1] != last[1]:  # the target's views
                x += 2 * pad
            placed_cells.append((x, cell))
            x, last = x + zoom * cell[3].shape[2] + 2, cell[:2]
        layout.append((name, placed_cells, lines))
        width = max(width, x + pad)
    canvas = Image.new("RGB", (width, text_h + 2 + len(rows) * (height + pad)), "white")
    pen = ImageDraw.Draw(canvas)
    pen.text((pad, 2), title, fill="black", font=font)
    for r, (name, placed_cells, lines) in enumerate(layout):
        top = text_h + 2 + r * (height + pad)
        pen.text((pad, top + height // 2), name, fill="black", font=font)
        for x in lines:
            pen.line((x, top, x, top + height), fill=(190, 190, 190))
        for x, (_, side, label, pixels, box) in placed_cells:
            tile = Image.fromarray(pixels.permute(1, 2, 0).numpy())
            tile = tile.resize((zoom * tile.width, zoom * tile.height), Image.NEAREST)
            canvas.paste(tile, (x, top + text_h))
            if box:  # (top, bottom, left, right) in the view's pixels
                b_top, b_bottom, b_left, b_right = (zoom * v for v in box)
                pen.rectangle((x + b_left, top + text_h + b_top, x + b_right - 1,
                               top + text_h + b_bottom - 1), outline="red")
            colour = (31, 119, 180) if side == "source" else (230, 110, 0)  # blue, orange
            pen.text((x, top), label, fill=colour, font=font)
    canvas.save(path)
    return path


def gallery(args):
    """--gallery: views.png of each --placements on --gallery-images held-out images, spread evenly
    over the split (an ImageFolder's come class by class)."""
    ckpt = read_checkpoint(args.checkpoint) if args.checkpoint else {"args": {}}
    framework = args.framework or (checkpoint_framework(ckpt) if args.checkpoint else "mocov2")
    module, defaults = script_defaults(framework)  # a checkpoint's run: its views' size, recipe
    run_args = argparse.Namespace(**{**defaults, **ckpt["args"], "gpu_aug": False})
    run_args.image_size = args.image_size or run_args.image_size
    base = augment.base_dataset(args.data, "test", args.data_root)
    if args.gallery_images < 1:
        raise augment.InputError(f"--gallery-images {args.gallery_images} must be 1 or more")
    n = min(args.gallery_images, len(base))
    images = [base[i * len(base) // n][0] for i in range(n)]  # spread over the split's classes
    specs = [spec for spec in args.placements if not spec.lower().startswith("syncbn")]
    if len(specs) < len(args.placements):
        print("note: SyncBN changes the projector's BN, not the views: not in the gallery")
    rows = [(placement(spec)[0], gallery_cells(module.make_views(placed(run_args, spec)), images,
                                               args.seed)) for spec in specs]
    os.makedirs(args.output_dir, exist_ok=True)
    path = draw_gallery(rows, os.path.join(args.output_dir, "views.png"),
                        zoom=max(1, 96 // run_args.image_size), title=(
                            f"{framework} views of {len(images)} {args.data} held-out images at "
                            f"{run_args.image_size} px (seed {args.seed}): S source, T target, s/t "
                            f"MultiCrop's small crops, red: ScaleMix's pasted box"))
    print(f"views gallery: {path} ({len(rows)} placements x {len(images)} images, "
          f"{sum(len(cells) for _, cells in rows)} views)", flush=True)
    return rows


# =============================================================================================
# The gradient noise of each placement (the paper's Sec. 5, measured)
# =============================================================================================
# +-----------------------------------------------------------------------------------------+
# | Sec. 5: for z = W f, dL/dW takes the target's features through differences f'_j - f'_i |
# | and the source's through f_i. More variance on the target side raises the variance of   |
# | the gradient without changing its expectation: a noisier step for nothing. Measured     |
# | here: the spread of dL/dW over redrawn views, one side at a time.                      |
# +-----------------------------------------------------------------------------------------+
def spread(gradients):
    """R flat gradients -> V = mean_j ||g_j - mean g||^2, its standard error (the spread of the R
    terms / sqrt(R)) and the mean gradient."""
    g = torch.stack(gradients).double()
    mean = g.mean(0)
    terms = (g - mean).square().sum(1)
    return terms.mean().item(), terms.std().item() / math.sqrt(len(terms)), mean


def gradient_noise(gradient, r):
    """gradient(s, t) -> dL/dW (flat) with the source's views of draw s and the target's of draw t.
    The source's draw 0 held and the target's redrawn (1..r): V_t; the reverse: V_s; both: V. The
    signal ||E g||^2 from the last: ||mean g||^2 less the noise's share in it, V / (r - 1) (the
    mean of r draws keeps 1/r of their variance), so that it is unbiased. -> dict: the three, their
    standard errors (*_se), the signal and V / signal."""
    v_t, v_t_se, _ = spread([gradient(0, j) for j in range(1, r + 1)])
    v_s, v_s_se, _ = spread([gradient(j, 0) for j in range(1, r + 1)])
    v, v_se, mean = spread([gradient(j, j) for j in range(1, r + 1)])
    signal = mean.square().sum().item() - v / (r - 1)
    return {"V_t": v_t, "V_s": v_s, "V": v, "signal": signal,
            "noise_to_signal": v / signal if signal > 0 else math.inf,
            "V_t_se": v_t_se, "V_s_se": v_s_se, "V_se": v_se}


def draw_seed(seed, side, j, i):
    """The seed of draw j of image i's views on one side: each side is redrawn alone."""
    return ((seed * 2 + (side == "target")) * 1_000_003 + j) * 1_000_003 + i


def side_draws(views, images, side, r, seed):
    """Draws 0..r of one side's views of a batch of images (kind -> (n*N)x3xHxW, view-major, as
    collate_views)."""
    draws = []
    for j in range(r + 1):
        samples = []
        for i, image in enumerate(images):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(draw_seed(seed, side, j, i))
                drawn = views(image)
            samples.append(({k: v for k, v in drawn.items() if k.split("_")[0] == side}, 0))
        draws.append(augment.collate_views(samples)[0])
    return draws


def loss_gradient(module, encoders, queue, run_args, weights):
    """-> gradient(batch): dL/dW of the script's own train_step on one batch, BN in train mode, the
    random state (MoCo's shuffled BN) the same at every call, so only the views vary."""
    source, target = encoders

    def gradient(batch):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run_args.seed)
            extra = [queue] if queue is not None else []
            loss = module.train_step(source, target, *extra, batch, run_args)[0]
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
        return torch.cat([torch.zeros(w.numel()) if g is None else g.flatten().cpu()
                          for w, g in zip(weights, grads)])
    return gradient


def grad_noise(args, device):
    """--grad-noise: gradient_noise for each --placements on the checkpoint's encoders (source,
    target, MoCo v2's queue), the run's designs replaced by the placement's."""
    if world_size() > 1:
        raise augment.InputError("--grad-noise runs on one process: run it without torchrun")
    if not args.checkpoint:
        raise augment.InputError("--grad-noise measures a trained run: give its --checkpoint")
    ckpt = read_checkpoint(args.checkpoint)
    framework = args.framework or checkpoint_framework(ckpt)
    module, defaults = script_defaults(framework)
    # the asymmetric loss: --sym's mirrored pair would feed each side's views to both encoders
    run_args = argparse.Namespace(**{**defaults, **ckpt["args"], "gpu_aug": False, "sym": False})
    specs = [placement(spec)[0] for spec in args.placements]  # bad names: one line, before work
    base = augment.base_dataset(args.data, "test", args.data_root)
    n = min(args.num_images or run_args.batch_size, len(base))
    if n < 2 * run_args.bn_splits or n % run_args.bn_splits or args.views < 2:
        raise augment.InputError(f"--num-images {n}: a multiple of the run's --bn-splits "
                                 f"{run_args.bn_splits}, 2 or more per BN group; --views 2 or more")
    images = [base[i][0] for i in range(n)]
    rows = []
    for spec, name in zip(args.placements, specs):
        start, p_args = time.time(), placed(run_args, spec)
        encoders = module.build_encoders(p_args, device)
        for encoder, part in zip(encoders, ("source", "target")):
            encoder.load_state_dict(ckpt[part])
            for m in encoder.modules():  # train-mode BN, its running statistics left alone
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.momentum = 0.0
            encoder.train()
        queue = None
        if "queue" in ckpt:
            queue = module.Queue(run_args.queue_size, run_args.dim).to(device)
            queue.load_state_dict(ckpt["queue"])
        source = encoders[0]
        weights = list(source.parameters()) if args.grad_params == "all" else \
            [[m for m in source.projector.modules() if isinstance(m, nn.Linear)][-1].weight]
        views = module.make_views(p_args)
        draws = {side: side_draws(views, images, side, args.views, args.seed)
                 for side in ("source", "target")}
        batch_gradient = loss_gradient(module, encoders, queue, p_args, weights)
        result = gradient_noise(lambda s, t: batch_gradient(
            {k: x.to(device) for k, x in {**draws["source"][s], **draws["target"][t]}.items()}),
            args.views)
        rows.append((name, result))
        print(f"{name}: V_t {result['V_t']:.3g}, V_s {result['V_s']:.3g}, V {result['V']:.3g}, "
              f"signal {result['signal']:.3g} ({time.time() - start:.0f} s)", flush=True)
    weight = "every source parameter" if args.grad_params == "all" else \
        "the source projector's last linear layer"
    info = (f"{framework}_asym.py checkpoint {args.checkpoint} (step {ckpt['step']}), W = "
            f"{weight}, the first {n} {args.data} held-out images in one batch, R = {args.views} "
            f"draws of each side's views")
    write_grad_noise(rows, info, args)
    return rows


def predicted(name):
    """Sec. 5's prediction for V_t against the baseline's: "higher" where a design that raises the
    variance is on the target, "lower" where one that lowers it is; None: the target unchanged."""
    if name.startswith("MeanEnc"):
        return "lower" if int(name[9:-1].split(",")[1]) > 1 else None
    design, _, side = name.rpartition(" ")
    if side not in ("target", "both"):
        return None
    return "higher" if design in ("MultiCrop", "ScaleMix", "StrongerAug") else "lower"


def compared(result, base, prediction):
    """V_t against the baseline's: higher or lower, beyond twice the standard error of the
    difference or within it, and against Sec. 5's prediction."""
    diff = result["V_t"] - base["V_t"]
    word = "higher" if diff > 0 else "lower"
    if abs(diff) <= 2 * math.hypot(result["V_t_se"], base["V_t_se"]):
        return f"{word}, within noise"
    if prediction is None:
        return f"{word}, beyond noise"
    return f"{word}, beyond noise: {'as predicted' if word == prediction else 'not as predicted'}"


def write_grad_noise(rows, info, args):
    """gradient_noise.md (printed too) and gradient_noise.csv."""
    os.makedirs(args.output_dir, exist_ok=True)
    base = rows[0][1]
    keys = ("V_t", "V_s", "V", "signal", "noise_to_signal")
    lines = [f"Gradient noise (Sec. 5): {info}. Each cell: the value and, in brackets, its "
             f"ratio to the first row's ({rows[0][0]}).", "",
             "| placement | V_t (target redrawn) | V_s (source redrawn) | V (both) | signal S "
             "(E g, squared norm) | noise / signal V / S | Sec. 5 predicts V_t | V_t measured |",
             "|---|---|---|---|---|---|---|---|"]
    with open(os.path.join(args.output_dir, "gradient_noise.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["placement", *keys, "V_t_se", "V_s_se", "V_se",
                         *(f"{k}_vs_{rows[0][0]}" for k in keys)])
        for i, (name, result) in enumerate(rows):
            ratios = [result[k] / base[k] if base[k] else math.nan for k in keys]
            cells = [f"{result[k]:.3g} (x{ratio:.2f})" if math.isfinite(result[k]) else
                     "- (the signal is within its noise)" for k, ratio in zip(keys, ratios)]
            prediction = predicted(name)
            verdict = compared(result, base, prediction) if i else "reference"
            lines.append(f"| {name} | {' | '.join(cells)} | "
                         f"{prediction or 'nothing: the target unchanged'} | {verdict} |")
            writer.writerow([name, *(f"{result[k]:.6e}" for k in keys),
                             *(f"{result[k + '_se']:.6e}" for k in ("V_t", "V_s", "V")),
                             *(f"{ratio:.4f}" for ratio in ratios)])
    with open(os.path.join(args.output_dir, "gradient_noise.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


# =============================================================================================
# Main
# =============================================================================================
def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except augment.InputError as e:  # from this process or a data worker
        # a worker's error arrives as its traceback: keep its last line, the message
        if rank() == 0:
            message = str(e).strip().splitlines()[-1].split("InputError: ")[-1]
            print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
