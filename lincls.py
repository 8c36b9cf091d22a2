"""Linear probe of a pretrained backbone (ImageNet top-1 / top-5), the evaluation of Wang et al. 2022.

Protocol in five lines:
    backbone <- any of our scripts' checkpoint.pth / backbone.pth, or an official MoCo / MoCo v3 /
                SimSiam / asymmetry-paper checkpoint; frozen, in eval mode (BN statistics fixed)
    head = Linear(D, classes), init N(0, 0.01), bias 0; optional parameter-free BN before it (--head-bn)
    train: RandomResizedCrop + flip -> backbone (no gradient) -> head; cross-entropy; only the head moves
    val: Resize(256) + CenterCrop(224); top-1 / top-5 every epoch; a check at the end that no backbone weight moved

Presets (--preset; any flag given overrides it; lr = base x batch / 256):
    paper   the paper's default (SimSiam's): LARS, batch 4096, base lr 0.1, wd 0, 90 epochs, cosine
    moco    MoCo v2's: SGD, batch 256, base lr 30, 100 epochs, x0.1 at 60% and 80% (the paper's final
            model: SGD, batch 256, lr 120: --preset moco --lr 120)
    mocov3  MoCo v3's: SGD, batch 1024, base lr 0.1 (3 for ViTs), 90 epochs, cosine
--cached-features extracts the features of every training image once (center crop, no augmentation)
and trains the head on them: minutes instead of hours on small data and on CPU.

Examples:
    python lincls.py --pretrained runs/quickstart/checkpoint.pth --data synthetic --image-size 32 \\
        --cached-features --head-bn --optimizer sgd --lr 1.0 --batch-size 256 --epochs 50 --workers 2   # CPU minutes
    torchrun --nproc_per_node=8 lincls.py --pretrained runs/baseline/backbone.pth --arch resnet50 --data $IMAGENET
    torchrun --nproc_per_node=8 lincls.py --pretrained moco_v2_800ep_pretrain.pth.tar --data $IMAGENET --preset moco
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

import augment
import mocov3_asym
# the same pieces as the pretraining scripts (ResNet, ViT, LARS, collectives, a run that survives clusters):
# MoCo v3's has them all
from mocov3_asym import (LARS, RESNETS, StopSignals, Stopped, agree, autocast, concat_all_gather, control_group,
                         guarded, ignore_stop_signals, init_distributed, lock_output_dir, log, non_finite, on_disk, rank,
                         read_checkpoint, resnet_backbone, resume_path, save_atomic, world_size)

# =============================================================================================
# Arguments
# =============================================================================================
VITS = list(mocov3_asym.VITS)
# preset -> optimizer, global batch, base lr per 256 images (ResNet, ViT), epochs, schedule
PRESETS = {
    "paper": ("lars", 4096, (0.1, 0.1), 90, "cosine"),
    "moco": ("sgd", 256, (30.0, 30.0), 100, "step"),
    "mocov3": ("sgd", 1024, (0.1, 3.0), 90, "cosine"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Linear probe of a frozen pretrained backbone",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic",
                   help="synthetic (built in) | cifar10 | cifar100 | stl10 | ImageFolder root with train/ and val/ or test/")
    g.add_argument("--data-root", default="data", help="where cifar10 / cifar100 / stl10 are looked for and downloaded")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable images out with a warning instead of stopping: every image is decoded once "
                        "before training (cached), and each readable held-out one counts once (the final line gives val_skipped)")
    g.add_argument("--no-image-check", action="store_true",
                   help="skip the header check of every image before training (cached per data set)")
    g.add_argument("--image-size", type=int, default=224, help="crop size (32 for CIFAR); val resizes to size x 256/224 first")
    g.add_argument("--workers", type=int, default=8, help="data loading processes per process")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained", required=True,
                   help="checkpoint.pth or backbone.pth of our scripts, an official MoCo / MoCo v3 / SimSiam checkpoint, "
                        "or 'random' (a randomly initialised backbone: the reference to beat)")
    g.add_argument("--arch", help="backbone: taken from our checkpoint.pth or an official checkpoint's arch (a "
                   "different --arch is an error); otherwise needed, default resnet50. "
                   "Any torchvision ResNet or " + ", ".join(VITS) + " (CIFAR stem and ViT patch size are read from the weights)")
    g.add_argument("--head-bn", action="store_true", help="parameter-free BN (no affine, per process) before the linear head: "
                   "standardises the features and removes most of the lr sensitivity")
    g = p.add_argument_group("optimization (defaults from --preset)")
    g.add_argument("--preset", default="paper", choices=list(PRESETS),
                   help="paper: LARS bs 4096 lr 0.1 90 ep cosine | moco: SGD bs 256 lr 30 100 ep step | mocov3: SGD bs 1024 lr 0.1 (ViT 3) 90 ep cosine")
    g.add_argument("--optimizer", choices=["lars", "sgd"], help="LARS (trust 0.001) or SGD, both momentum 0.9")
    g.add_argument("--batch-size", type=int, help="global batch over all processes")
    g.add_argument("--lr", type=float, help="base learning rate per 256 images (lr = base x batch / 256)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--schedule", choices=["cosine", "step"], help="cosine decay per step, or x0.1 at 60%% and 80%% of training")
    g.add_argument("--wd", type=float, default=0.0, help="weight decay (0 in all three presets)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision of the backbone forward; auto: bf16 (or fp16 without bf16 support) on CUDA, off on CPU")
    g = p.add_argument_group("probe")
    g.add_argument("--cached-features", action="store_true",
                   help="extract the training features once (center crop, no augmentation) and train the head on them")
    g.add_argument("--no-aug", action="store_true",
                   help="train on center crops (the eval transform) instead of RandomResizedCrop + flip; what --cached-features sees")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/lincls", help="checkpoint.pth and log.jsonl")
    g.add_argument("--resume", default="auto",
                   help="auto (output-dir/checkpoint.pth if present) | none (start afresh) | a checkpoint to start from "
                        "(output-dir/checkpoint.pth, once there, wins: a requeued command continues its own run)")
    g.add_argument("--resume-anyway", action="store_true",
                   help="resume even though the command changes flags of the checkpoint's run (listed otherwise as an error)")
    g.add_argument("--save-every", type=int, default=0, help="also save a checkpoint every N steps (0: at epoch ends only)")
    g.add_argument("--dist-timeout", type=float, default=10,
                   help="minutes a process waits for the others (a hung or dead process) before the run stops with an error")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps in all (0: run all epochs); the schedule is unchanged")
    g.add_argument("--print-freq", type=int, default=50, help="log every N steps")
    args = p.parse_args(argv)
    if args.cached_features:
        args.no_aug = True  # cached features are center crops: say so in the checkpoint's args
    return args


def resolve_preset(args, arch):
    """Fill the optimisation flags left unset from --preset (the base lr depends on ResNet / ViT)."""
    optimizer, batch, lrs, epochs, schedule = PRESETS[args.preset]
    args.optimizer = args.optimizer or optimizer
    args.batch_size = args.batch_size or batch
    args.lr = lrs[arch in VITS] if args.lr is None else args.lr
    args.epochs = args.epochs or epochs
    args.schedule = args.schedule or schedule


# =============================================================================================
# Data
# =============================================================================================
def train_transform(size):
    """The probe's training augmentation: RandomResizedCrop + flip, nothing else."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)])


def make_datasets(args):
    """Labelled training images (augmented or center crops) and the held-out split (center crops),
    every split numbered by the training split's classes (augment.folder_split)."""
    eval_t = augment.eval_transform(args.image_size)
    train_t = eval_t if args.no_aug else train_transform(args.image_size)
    train_set = augment.dataset(args.data, "train_labeled", train_t, args.data_root, args.seed)
    val_set = augment.dataset(args.data, "test", eval_t, args.data_root)
    return train_set, val_set


def train_loader(train_set, epoch, skip_batches, args):
    """This process's batches of `epoch`, from batch `skip_batches` on (a resumed epoch)."""
    sampler = torch.utils.data.DistributedSampler(train_set, world_size(), rank(), shuffle=True,
                                                  seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    local_batch = args.batch_size // world_size()
    train_set.epoch = epoch  # seeds the crops: the same whatever the workers, world size or resume
    workers = 0 if args.cached_features else args.workers  # cached: rows of a tensor, nothing to load
    return torch.utils.data.DataLoader(
        train_set, batch_size=local_batch, sampler=list(sampler)[skip_batches * local_batch:],
        num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=True, worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(args.seed))


def eval_loader(dataset, args):
    """This process's shard (every world_size-th image) of a data set, in batches of 256 or more
    (no gradient: big batches cost little memory and run much faster on CPU)."""
    shard = torch.utils.data.Subset(dataset, range(rank(), len(dataset), world_size()))
    return torch.utils.data.DataLoader(shard, batch_size=max(args.batch_size // world_size(), 256),
                                       num_workers=args.workers, pin_memory=torch.cuda.is_available(),
                                       worker_init_fn=ignore_stop_signals, generator=torch.Generator().manual_seed(0))


# =============================================================================================
# Model: the collectives, the backbone from any checkpoint, the head
# =============================================================================================
def mean_over_processes(x):
    """The mean of a tensor over all processes (the identity on one)."""
    if world_size() == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / world_size()


# where each layout keeps its backbone: ours (checkpoint.pth "source"), MoCo v1/v2 and the asymmetry
# paper's code, MoCo v3 (ResNets), SimSiam. Their projectors sit in "fc.*" and are dropped.
OFFICIAL_PREFIXES = ("module.encoder_q.", "module.base_encoder.", "module.encoder.")
HEAD_KEYS = ("fc.", "head.", "heads.")


def short_list(keys, n=4):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "") if keys else "none"


def read_backbone_weights(path):
    """Any supported checkpoint -> (torchvision-keyed backbone state dict without fc, the architecture
    the file declares: our checkpoint.pth's args, an official checkpoint's "arch", else None).
    Unreadable or foreign files raise InputError."""
    if not os.path.isfile(path):
        raise augment.InputError(f"--pretrained {path}: no such file")
    ckpt = augment.load_weights(path)
    if not isinstance(ckpt, dict):
        raise augment.InputError(f"{path} holds a {type(ckpt).__name__}, not a state dict or checkpoint")
    declared = ckpt.get("arch")
    if isinstance(ckpt.get("source"), dict):  # our checkpoint.pth: the source encoder's backbone
        state, prefix, declared = ckpt["source"], "backbone.", ckpt.get("args", {}).get("arch")
    else:  # an official checkpoint {"arch": ..., "state_dict": ...}, or a plain state dict (our backbone.pth)
        state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
        prefix = next((p for p in OFFICIAL_PREFIXES if any(k.startswith(p) for k in state)), "")
    state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    if any(k.startswith(("blocks.", "patch_embed.")) for k in state):
        raise augment.InputError(f"{path} is a timm-named ViT (e.g. an official MoCo v3 ViT checkpoint); only the "
                                 f"torchvision-keyed ViTs of mocov3_asym.py are supported")
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_KEYS)}
    if not state:
        raise augment.InputError(f"no backbone weights in {path} (looked for keys starting with backbone., "
                                 f"{', '.join(OFFICIAL_PREFIXES)} or torchvision names)")
    return state, declared if isinstance(declared, str) else None


def make_backbone(arch, state):
    """A randomly initialised backbone of `arch` shaped like the weights `state` (CIFAR stem, ViT
    patch and image size; `state` None: the defaults) -> (backbone, feature dim)."""
    if arch in VITS:
        patch, image_size = 16, 224
        if state is not None and "conv_proj.weight" in state and "encoder.pos_embedding" in state:
            patch = state["conv_proj.weight"].shape[-1]  # Dx3xPxP
            image_size = math.isqrt(state["encoder.pos_embedding"].shape[1] - 1) * patch  # 1x(1+g*g)xD
        return mocov3_asym.vit_backbone(arch, image_size, patch)
    cifar_stem = state is not None and "conv1.weight" in state and state["conv1.weight"].shape[-1] == 3
    return resnet_backbone(arch, cifar_stem)


def fits(arch, state):
    """Whether `state` has exactly the keys and shapes of an `arch` backbone (built on the meta
    device: no memory, no time)."""
    with torch.device("meta"):
        expected = make_backbone(arch, state)[0].state_dict()
    return expected.keys() == state.keys() and all(expected[k].shape == state[k].shape for k in state)


def guess_arch(state):
    """The first architecture (torchvision ResNets, then the ViTs) whose keys and shapes `state` has, or None.
    The blocks tell them apart: ResNet-18/34 have two 3x3 convolutions per block, 50/101/152 a
    1x1-3x3-1x1 bottleneck (conv3); the depth is the number of blocks per stage."""
    return next((arch for arch in RESNETS + VITS if fits(arch, state)), None)


def build_backbone(arch, state, declared=None):
    """A backbone of `arch` shaped like the weights `state`, loaded strictly; -> (backbone, feature
    dim). `state` None: random initialisation. Weights that do not fit say which architecture the
    file declares or appears to hold."""
    net, dim = make_backbone(arch, state)
    if state is None:
        return net, dim
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    resized = [f"{k} ({'x'.join(map(str, state[k].shape))} in the file, {'x'.join(map(str, expected[k].shape))} here)"
               for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or resized:
        guess = guess_arch(state)
        hint = (f"; the file declares {declared}" if declared else "") + (
            f"; its keys and shapes are those of a {guess}: pass --arch {guess}" if guess else
            "; its keys and shapes fit none of the torchvision ResNets or the ViTs here")
        raise augment.InputError(f"the weights do not fit a {arch} backbone: missing keys {short_list(missing)}; "
                                 f"unexpected keys {short_list(unexpected)}"
                                 + (f"; other shapes: {short_list(resized, 2)}" if resized else "") + hint)
    net.load_state_dict(state)
    return net, dim


def load_backbone(pretrained, arch, seed=0):
    """--pretrained and --arch -> (frozen backbone in eval mode, feature dim, arch, a copy of the
    weights it must keep). Without --arch: the architecture the file declares (our checkpoint.pth's
    args, an official checkpoint's "arch"), else resnet50; a flag that disagrees with it is an error."""
    if pretrained == "random":
        state, declared = None, None
    else:
        state, declared = read_backbone_weights(pretrained)
    if arch and declared and arch != declared:
        raise augment.InputError(f"--arch {arch}, but {pretrained} holds a {declared}: pass --arch {declared} or leave it out")
    source = "--arch" if arch else f"{pretrained} declares arch" if declared else "--arch"
    arch = arch or declared or "resnet50"
    if arch not in RESNETS + VITS:
        raise augment.InputError(f"{source} {arch}, which is not a torchvision ResNet or one of {', '.join(VITS)}")
    torch.manual_seed(seed)
    backbone, dim = build_backbone(arch, state, declared)
    backbone.requires_grad_(False)
    backbone.eval()  # BN uses its running statistics and never updates them
    reference = {k: v.clone() for k, v in backbone.state_dict().items()}
    return backbone, dim, arch, reference


def check_backbone_unchanged(backbone, reference):
    """The probe must not have moved a single backbone weight or BN statistic."""
    moved = [k for k, v in backbone.state_dict().items() if not torch.equal(v.cpu(), reference[k])]
    if moved:
        raise RuntimeError(f"backbone weights changed during the linear probe: {short_list(moved)}")


def make_head(feature_dim, num_classes, head_bn):
    """[parameter-free BN] + Linear(D, classes) with init N(0, 0.01), bias 0."""
    linear = nn.Linear(feature_dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    if not head_bn:
        return linear
    return nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6), linear)


# =============================================================================================
# Probe: optimizer, schedule, accuracy
# =============================================================================================
def make_optimizer(head, args):
    if args.optimizer == "lars":
        return LARS(head.parameters(), weight_decay=args.wd)
    return torch.optim.SGD(head.parameters(), lr=0.0, momentum=0.9, weight_decay=args.wd)


def learning_rate(step, total_steps, peak, schedule):
    """cosine: half-cosine from `peak` to 0 per step; step: x0.1 at 60% and 80% of the steps (MoCo's 60/80 of 100)."""
    if schedule == "step":
        return peak * 0.1 ** sum(step >= m * total_steps for m in (0.6, 0.8))
    return peak * 0.5 * (1 + math.cos(math.pi * step / max(1, total_steps)))


def encode(backbone, images, device, args):
    """Nx3xHxW -> NxD float features of the frozen backbone (no gradient)."""
    with torch.no_grad(), autocast(device, args):
        return backbone(images.to(device, non_blocking=True)).float()


@torch.no_grad()
def extract_features(backbone, dataset, device, args):
    """Features of every image of `dataset` (center crops) on every process: each process encodes
    its shard (images r, r+w, ...), the shards are gathered and interleaved back -> NxD, N."""
    features, labels = [], []
    for images, y in eval_loader(dataset, args):
        features.append(encode(backbone, images, device, args))
        labels.append(y.to(device))
    features, labels = torch.cat(features), torch.cat(labels)
    n_max = (len(dataset) + world_size() - 1) // world_size()  # rank 0's shard, the longest
    pad = n_max - len(features)
    features = torch.cat([features, features.new_zeros(pad, features.shape[1])])
    labels = torch.cat([labels, labels.new_zeros(pad)])
    # row j of rank r is image j*w + r: gathered as w x rows x D, transposed, flattened -> image order;
    # in chunks of local rows, so that the gather never holds more than w x 65536 rows on the GPU
    interleave = lambda x: concat_all_gather(x[None]).transpose(0, 1).flatten(0, 1).cpu()
    features = torch.cat([interleave(chunk) for chunk in features.split(65536)])  # (n_max*w)xD
    labels = torch.cat([interleave(chunk) for chunk in labels.split(65536)])
    return features[:len(dataset)], labels[:len(dataset)]


class CachedFeatures(torch.utils.data.TensorDataset):
    """Training features in dataset order: row i is image i, so the sampler picks the same
    images as in a direct probe (an `epoch` attribute like augment.SeededDataset's)."""
    epoch = 0


@torch.no_grad()
def accuracy(backbone, head, val_loader, device, args):
    """Top-1 and top-5 (%) over every process's shard of the held-out images."""
    head.eval()
    counts = torch.zeros(3, device=device)  # top-1 hits, top-5 hits, images
    for images, y in val_loader:
        features = images.to(device) if backbone is None else encode(backbone, images, device, args)
        logits, y = head(features), y.to(device)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        counts += torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(1).sum(), torch.tensor(len(y), device=device)])
    head.train()
    if world_size() > 1:
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


# =============================================================================================
# Loop and checkpoint
# =============================================================================================
def restore(ckpt, path, head, optimizer):
    """Load the head and optimizer -> (step, best top-1)."""
    try:
        head.load_state_dict(ckpt["head"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except Exception as e:
        detail = " ".join(str(e).split())[:300]
        raise augment.InputError(f"cannot resume from {path}: {type(e).__name__}: {detail}") from None
    return ckpt["step"], ckpt["best_top1"]


def save_checkpoint(args, step, steps_per_epoch, head, optimizer, best_top1, control):
    """output-dir/checkpoint.pth: the head (a plain Linear / BN+Linear state dict), to resume or to reuse,
    written by rank 0 once every process has found it finite; -> the step saved."""
    ckpt = {"step": step, "epoch": step / steps_per_epoch, "steps_per_epoch": steps_per_epoch, "args": vars(args),
            "head": head.state_dict(), "optimizer": optimizer.state_dict(), "best_top1": best_top1}
    bad = non_finite(ckpt)
    failure = FloatingPointError(f"the probe diverged by step {step}: non-finite values in {', '.join(bad[:3])}; "
                                 f"lower --lr or use --head-bn; nothing saved, {on_disk(args)}") if bad else None
    agree(False, failure, control)
    if rank() == 0:
        try:
            save_atomic(ckpt, os.path.join(args.output_dir, "checkpoint.pth"))
        except OSError as e:
            failure = augment.InputError(f"cannot save to {args.output_dir}: {e.strerror or e}; {on_disk(args)}")
    agree(False, failure, control)
    return step


def check_args(args, train_set, backbone):
    """Impossible settings as one clear error, before any work."""
    problems = []
    if args.batch_size % world_size():
        problems.append(f"--batch-size {args.batch_size} is not divisible by the {world_size()} processes")
    if len(train_set) < args.batch_size:
        problems.append(f"--batch-size {args.batch_size} is larger than the {len(train_set)} training images "
                        f"(the presets assume ImageNet; pass a smaller --batch-size)")
    patch = getattr(backbone, "patch_size", 1)  # ViTs only
    if args.image_size % patch:
        problems.append(f"--image-size {args.image_size} is not a multiple of the ViT's patch size {patch}")
    if args.epochs < 1 or args.lr <= 0:
        problems.append("--epochs and --lr must be positive")
    if problems:
        raise augment.InputError("; ".join(problems))


def train(args):
    device = init_distributed(args)
    control = control_group()
    if args.amp == "auto":
        args.amp = "off" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    torch.backends.cudnn.benchmark = True

    # inputs, output directory and checkpoint checked on every process before any work; a problem on
    # any of them stops all of them with its message (agree), instead of hanging the others
    lock, failure = None, None
    try:
        backbone, feature_dim, args.arch, reference = load_backbone(args.pretrained, args.arch, args.seed)
        resolve_preset(args, args.arch)
        train_set, val_set = make_datasets(args)
        check_args(args, train_set, backbone)
        num_classes = len(train_set.base.classes)
        lock = lock_output_dir(args)
    except augment.InputError as e:
        failure = e
    agree(False, failure, control)
    try:
        val_images = len(val_set)
        if args.skip_bad_images or not args.no_image_check:  # unreadable images stop the probe now, or are left out
            augment.check_images(train_set, args.skip_bad_images, args.workers, control, "training images")
            augment.check_images(val_set, args.skip_bad_images, args.workers, control, "held-out images")
        val_skipped = val_images - len(val_set)
        steps_per_epoch = len(train_set) // args.batch_size
        resume = resume_path(args)
        ckpt = read_checkpoint(resume, args, steps_per_epoch) if resume else None
    except augment.InputError as e:
        failure = e
    agree(False, failure, control)
    backbone.to(device)
    torch.manual_seed(args.seed)
    head = make_head(feature_dim, num_classes, args.head_bn).to(device)
    optimizer = make_optimizer(head, args)
    step, best_top1 = 0, 0.0
    try:
        if ckpt:
            step, best_top1 = restore(ckpt, resume, head, optimizer)
    except augment.InputError as e:
        failure = e
    agree(False, failure, control)
    if step:
        log(args, {"resumed": resume, "step": step})
    head_ddp = nn.parallel.DistributedDataParallel(head) if world_size() > 1 else head
    total_steps = args.epochs * steps_per_epoch
    peak_lr = args.lr * args.batch_size / 256

    if args.cached_features:  # one pass over center crops; the loop below then never runs the backbone
        tick = time.time()
        train_set = CachedFeatures(*extract_features(backbone, train_set, device, args))
        val_features = CachedFeatures(*extract_features(backbone, val_set, device, args))
        val_loader = eval_loader(val_features, argparse.Namespace(batch_size=args.batch_size, workers=0))
        log(args, {"features": "cached", "train": len(train_set), "val": len(val_features), "seconds": time.time() - tick})
        run_backbone = None
    else:
        val_loader, run_backbone = eval_loader(val_set, args), backbone

    last_step = min(total_steps, args.max_steps or total_steps)
    top1 = top5 = None
    saved_step = step
    with StopSignals() as signals:
        while step < last_step:
            window_start, window_steps = time.time(), 0
            for (images, labels), failure in guarded(train_loader(train_set, step // steps_per_epoch, step % steps_per_epoch, args)):
                if agree(signals.pending(), failure, control):  # a stop signal reached some process
                    if step != saved_step:
                        save_checkpoint(args, step, steps_per_epoch, head, optimizer, best_top1, control)
                    raise Stopped(f"{signals.pending() or 'a signal to another process'} at step {step}: {on_disk(args)}; "
                                  f"the same command continues from there")
                lr = learning_rate(step, total_steps, peak_lr, args.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                features = images.to(device) if run_backbone is None else encode(backbone, images, device, args)
                loss = F.cross_entropy(head_ddp(features), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                window_steps += 1
                if step % args.print_freq == 0 or step == last_step or step % steps_per_epoch == 0:
                    loss_value = mean_over_processes(loss.detach()).item()  # the global batch's loss
                    diverged = None if math.isfinite(loss_value) else FloatingPointError(
                        f"the probe diverged at step {step} (loss {loss_value}); lower --lr or use --head-bn; {on_disk(args)}")
                    agree(False, diverged, control)
                    elapsed = time.time() - window_start
                    log(args, {"epoch": step / steps_per_epoch, "step": step, "loss": loss_value, "lr": lr,
                               "images_per_s": args.batch_size * window_steps / elapsed})
                    window_start, window_steps = time.time(), 0
                if step == last_step or step % steps_per_epoch == 0:
                    break
                if args.save_every and step % args.save_every == 0:
                    saved_step = save_checkpoint(args, step, steps_per_epoch, head, optimizer, best_top1, control)
            top1, top5 = accuracy(run_backbone, head, val_loader, device, args)
            best_top1 = max(best_top1, top1)
            log(args, {"epoch": step / steps_per_epoch, "step": step, "top1": top1, "top5": top5})
            saved_step = save_checkpoint(args, step, steps_per_epoch, head, optimizer, best_top1, control)
    if top1 is None:  # resumed a finished run: report its accuracy again
        top1, top5 = accuracy(run_backbone, head, val_loader, device, args)
    check_backbone_unchanged(backbone, reference)
    log(args, {"best_top1": best_top1, "final_top1": top1, "final_top5": top5, "backbone_unchanged": True,
               "val_images": len(val_set), "val_skipped": val_skipped})
    if lock:
        lock.close()
    if dist.is_initialized():
        dist.barrier()  # rank 0 hosts the rendezvous store: nobody leaves before all are done


# =============================================================================================
# Main (the pretraining scripts' own: stop signals, errors from any process, lost contact)
# =============================================================================================
def main(argv=None):
    mocov3_asym.run(train, parse_args(argv))


if __name__ == "__main__":
    main()
