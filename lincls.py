"""Linear probe of a pretrained backbone (top-1 / top-5), the evaluation of Wang et al. 2022.

Protocol in five lines:
    backbone <- any of our scripts' checkpoint.pth / backbone.pth, or an official MoCo / MoCo v3 /
                SimSiam / asymmetry-paper checkpoint; frozen, in eval mode (BN statistics fixed)
    head = Linear(D, classes), init N(0, 0.01), bias 0; a parameter-free BN before it (--head-bn)
    train: RandomResizedCrop + flip -> backbone (no gradient) -> head; cross-entropy; only the head
    val: Resize(256) + CenterCrop(224); top-1 / top-5 every epoch; no backbone weight may move

Presets (--preset; any flag given overrides it; lr = base x batch / 256):
    auto    paper with 100,000 training images or more, else small (the default)
    paper   the paper's default (SimSiam's): LARS, batch 4096, base lr 0.1, wd 0, 90 epochs, cosine
    small   small data sets (CIFAR, the built-in shapes): SGD, batch 256, base lr 1.0, 90 epochs,
            cosine (LARS at batch 4096 takes few, large steps there and learns little)
    moco    MoCo v2's: SGD, batch 256, base lr 30, 100 epochs, x0.1 at 60% and 80% (the paper's
            final model: SGD, batch 256, lr 120: --preset moco --lr 120)
    mocov3  MoCo v3's: SGD, batch 1024, base lr 0.1 (3 for ViTs), 90 epochs, cosine
--cached-features extracts the features of every training image once (center crop, no
augmentation) and trains the head on them: minutes instead of hours on small data and on CPU.

Examples:
    python lincls.py --pretrained runs/quickstart/checkpoint.pth --data synthetic \\
        --image-size 32 --cached-features --head-bn --epochs 50 --workers 2   # CPU minutes
    torchrun --nproc_per_node=8 lincls.py --pretrained runs/baseline/backbone.pth \\
        --arch resnet50 --data $IMAGENET
    torchrun --nproc_per_node=8 lincls.py --pretrained moco_v2_800ep_pretrain.pth.tar \\
        --data $IMAGENET --preset moco
"""
import argparse
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record
from torchvision.transforms import v2

import augment
from mocov3_asym import LARS, RESNETS, VITS, resnet_backbone, vit_backbone  # the scripts' models

world_size, rank = augment.world_size, augment.rank

# =============================================================================================
# Arguments
# =============================================================================================
# preset -> optimizer, global batch, base lr per 256 images (ResNet, ViT), epochs, schedule
PRESETS = {
    "paper": ("lars", 4096, (0.1, 0.1), 90, "cosine"),
    "small": ("sgd", 256, (1.0, 1.0), 90, "cosine"),
    "moco": ("sgd", 256, (30.0, 30.0), 100, "step"),
    "mocov3": ("sgd", 1024, (0.1, 3.0), 90, "cosine"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=augment.HelpFormatter,
                                epilog=__doc__[__doc__.index("Examples:"):])
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", help="synthetic (built in) | cifar10 | cifar100 "
                   "| stl10 | an ImageFolder root with train/ and val/ or test/")
    g.add_argument("--data-root", default="data", help="where cifar10/cifar100/stl10 are (put)")
    g.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out "
                   "(each held-out one that reads counts once: val_skipped in the final line)")
    g.add_argument("--no-image-check", action="store_true",
                   help="do not check every image file before training")
    g.add_argument("--image-size", type=int, default=224,
                   help="crop size (CIFAR: 32); val resizes to size x 256/224 first")
    g.add_argument("--workers", type=int, default=8, help="data workers per process")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained", required=True, help="checkpoint.pth or backbone.pth of our "
                   "scripts, an official MoCo / MoCo v3 / SimSiam checkpoint, or 'random'")
    g.add_argument("--arch", help="the architecture (default: the file's, else resnet50): a "
                   "torchvision ResNet or " + ", ".join(VITS))
    g.add_argument("--head-bn", action="store_true", help="a parameter-free BN before the head: "
                   "standardised features, far less sensitive to the lr")
    g = p.add_argument_group("optimization (defaults from --preset)")
    g.add_argument("--preset", default="auto", choices=["auto"] + list(PRESETS),
                   help="auto: paper from 100,000 training images, else small | paper: LARS bs "
                   "4096 lr 0.1 90 ep cosine | small: SGD bs 256 lr 1.0 90 ep cosine | moco: SGD "
                   "bs 256 lr 30 100 ep step | mocov3: SGD bs 1024 lr 0.1 (ViT 3) 90 ep cosine")
    g.add_argument("--optimizer", choices=["lars", "sgd"], help="LARS or SGD, momentum 0.9")
    g.add_argument("--batch-size", type=int, help="global batch over all processes")
    g.add_argument("--lr", type=float, help="base lr: lr = base x batch / 256")
    g.add_argument("--epochs", type=int, help="training epochs")
    g.add_argument("--schedule", choices=["cosine", "step"],
                   help="cosine decay per step, or x0.1 at 60%% and 80%% of training")
    g.add_argument("--wd", type=float, default=0.0, help="weight decay (0 in every preset)")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision of the backbone (auto: bf16 or fp16 on CUDA, off on CPU)")
    g = p.add_argument_group("probe")
    g.add_argument("--cached-features", action="store_true", help="extract the training features "
                   "once (center crops) and train the head on them")
    g.add_argument("--no-aug", action="store_true", help="train on center crops instead of "
                   "RandomResizedCrop + flip (what --cached-features sees)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/lincls", help="checkpoint.pth and log.jsonl")
    g.add_argument("--resume", metavar="PATH", help="start from this checkpoint.pth (the output "
                   "directory's own, once there, wins: a requeued command continues its run)")
    g.add_argument("--resume-anyway", action="store_true",
                   help="resume although this command changes flags of the checkpoint's run")
    g.add_argument("--save-every", type=int, default=0,
                   help="also save every N steps (0: at epoch ends, stops and the end only)")
    g.add_argument("--dist-timeout", type=float, default=10,
                   help="minutes a process waits for the others before the job fails")
    g.add_argument("--seed", type=int, default=0, help="seeds the head and every crop")
    g.add_argument("--max-steps", type=int, default=0,
                   help="stop after N steps in all, the schedule unchanged (0: all epochs)")
    g.add_argument("--print-freq", type=int, default=10,
                   help="log the loss every N steps; a stop signal takes effect there")
    args = p.parse_args(argv)
    if args.amp == "auto":
        args.amp = "off" if not torch.cuda.is_available() else \
            "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    args.no_aug = args.no_aug or args.cached_features  # cached features are center crops
    return args


def resolve_preset(args, arch, n_train):
    """Fill the optimisation flags left unset from --preset (auto: by the training images; the
    base lr depends on ResNet/ViT)."""
    if args.preset == "auto":
        args.preset = "paper" if n_train >= 100_000 else "small"
    optimizer, batch, lrs, epochs, schedule = PRESETS[args.preset]
    args.optimizer = args.optimizer or optimizer
    args.batch_size = args.batch_size or batch
    args.lr = lrs[arch in VITS] if args.lr is None else args.lr
    args.epochs = args.epochs or epochs
    args.schedule = args.schedule or schedule


# =============================================================================================
# Model: the backbone from any checkpoint, frozen; the head
# =============================================================================================
# where each layout keeps its backbone: ours (checkpoint.pth "source"), MoCo v1/v2 and the
# asymmetry paper's code, MoCo v3 (ResNets), SimSiam. Their projectors sit in "fc.*": dropped.
OFFICIAL_PREFIXES = ("module.encoder_q.", "module.base_encoder.", "module.encoder.")
HEAD_KEYS = ("fc.", "head.", "heads.")


def short_list(keys, n=4):
    keys = sorted(keys)
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def read_backbone_weights(path):
    """Any supported checkpoint -> (torchvision-keyed backbone state dict without fc, the
    architecture the file declares: our checkpoint.pth's args, an official checkpoint's "arch",
    else None). Unreadable or foreign files raise InputError."""
    if not os.path.isfile(path):
        raise augment.InputError(f"--pretrained {path}: no such file")
    ckpt = augment.load_weights(path)
    if not isinstance(ckpt, dict):
        raise augment.InputError(f"{path} holds a {type(ckpt).__name__}, not a state dict or "
                                 f"checkpoint")
    declared = ckpt.get("arch")
    if isinstance(ckpt.get("source"), dict):  # our checkpoint.pth: the source encoder's backbone
        state, prefix, declared = ckpt["source"], "backbone.", ckpt.get("args", {}).get("arch")
    else:  # an official {"arch": ..., "state_dict": ...}, or a plain state dict (backbone.pth)
        state = ckpt["state_dict"] if isinstance(ckpt.get("state_dict"), dict) else ckpt
        prefix = next((p for p in OFFICIAL_PREFIXES if any(k.startswith(p) for k in state)), "")
    state = {k[len(prefix):]: v for k, v in state.items()
             if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    if any(k.startswith(("blocks.", "patch_embed.")) for k in state):
        raise augment.InputError(f"{path} is a timm-named ViT (e.g. an official MoCo v3 ViT "
                                 f"checkpoint); only the torchvision-keyed ViTs of mocov3_asym.py "
                                 f"are supported")
    state = {k: v for k, v in state.items() if not k.startswith(HEAD_KEYS)}
    if not state:
        raise augment.InputError(f"no backbone weights in {path} (looked for keys starting with "
                                 f"backbone., {', '.join(OFFICIAL_PREFIXES)} or torchvision names)")
    return state, declared if isinstance(declared, str) else None


def make_backbone(arch, state):
    """A randomly initialised backbone of `arch` shaped like the weights `state` (CIFAR stem, ViT
    patch and image size; `state` None: the defaults) -> (backbone, feature dim)."""
    if arch in VITS:
        patch, image_size = 16, 224
        if state is not None and "conv_proj.weight" in state and "encoder.pos_embedding" in state:
            patch = state["conv_proj.weight"].shape[-1]  # Dx3xPxP
            image_size = math.isqrt(state["encoder.pos_embedding"].shape[1] - 1) * patch
        return vit_backbone(arch, image_size, patch)
    cifar_stem = state is not None and "conv1.weight" in state \
        and state["conv1.weight"].shape[-1] == 3
    return resnet_backbone(arch, cifar_stem)


def fits(arch, state):
    """Whether `state` has exactly the keys and shapes of an `arch` backbone (built on the meta
    device: no memory, no time)."""
    with torch.device("meta"):
        expected = make_backbone(arch, state)[0].state_dict()
    return expected.keys() == state.keys() and all(expected[k].shape == state[k].shape
                                                   for k in state)


def guess_arch(state):
    """The first architecture (torchvision ResNets, then the ViTs) whose keys and shapes `state`
    has, or None. ResNet-18/34 have two 3x3 convolutions per block, 50/101/152 a 1x1-3x3-1x1
    bottleneck (conv3); the depth is the number of blocks per stage."""
    return next((arch for arch in RESNETS + list(VITS) if fits(arch, state)), None)


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
    shape = lambda t: "x".join(map(str, t.shape))  # noqa: E731
    resized = [f"{k} ({shape(state[k])} in the file, {shape(expected[k])} here)"
               for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or resized:
        guess = guess_arch(state)
        hint = (f"; the file declares {declared}" if declared else "") + (
            f"; its keys and shapes are those of a {guess}: pass --arch {guess}" if guess else
            "; its keys and shapes fit none of the torchvision ResNets or the ViTs here")
        raise augment.InputError(f"the weights do not fit a {arch} backbone: missing keys "
                                 f"{short_list(missing)}; unexpected keys {short_list(unexpected)}"
                                 + (f"; other shapes: {short_list(resized, 2)}" if resized else "")
                                 + hint)
    net.load_state_dict(state)
    return net, dim


def load_backbone(pretrained, arch, seed=0):
    """--pretrained and --arch -> (frozen backbone in eval mode, feature dim, arch, a copy of the
    weights it must keep). Without --arch: the architecture the file declares, else resnet50; a
    flag that disagrees with it is an error."""
    state, declared = (None, None) if pretrained == "random" else read_backbone_weights(pretrained)
    if arch and declared and arch != declared:
        raise augment.InputError(f"--arch {arch}, but {pretrained} holds a {declared}: pass --arch "
                                 f"{declared} or leave it out")
    source = "--arch" if arch or not declared else f"{pretrained} declares arch"
    arch = arch or declared or "resnet50"
    if arch not in RESNETS + list(VITS):
        raise augment.InputError(f"{source} {arch}, which is not a torchvision ResNet or one of "
                                 f"{', '.join(VITS)}")
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
# Probe: optimizer, schedule, features, accuracy
# =============================================================================================
def make_optimizer(head, args):
    if args.optimizer == "lars":
        return LARS(head.parameters(), weight_decay=args.wd)
    return torch.optim.SGD(head.parameters(), lr=0.0, momentum=0.9, weight_decay=args.wd)


def learning_rate(step, total_steps, peak, schedule):
    """cosine: half-cosine from `peak` to 0 per step; step: x0.1 at 60% and 80% of the steps
    (MoCo's 60/80 of 100)."""
    if schedule == "step":
        return peak * 0.1 ** sum(step >= m * total_steps for m in (0.6, 0.8))
    return peak * 0.5 * (1 + math.cos(math.pi * step / max(1, total_steps)))


def encode(backbone, images, device, args):
    """Nx3xHxW -> NxD float features of the frozen backbone (no gradient)."""
    with torch.no_grad(), augment.autocast(device, args.amp):
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
    pad = (len(dataset) + world_size() - 1) // world_size() - len(features)  # to rank 0's count
    features = torch.cat([features, features.new_zeros(pad, features.shape[1])])
    labels = torch.cat([labels, labels.new_zeros(pad)])
    # row j of rank r is image j*w + r: gathered as w x rows x D, transposed, flattened -> image
    # order; in chunks, so that the gather never holds more than w x 65536 rows on the GPU
    interleave = lambda x: augment.gather(x[None]).transpose(0, 1).flatten(0, 1).cpu()  # noqa
    features = torch.cat([interleave(chunk) for chunk in features.split(65536)])
    labels = torch.cat([interleave(chunk) for chunk in labels.split(65536)])
    return features[:len(dataset)], labels[:len(dataset)]


class CachedFeatures(torch.utils.data.TensorDataset):
    """Training features in dataset order: row i is image i, so the sampler picks the same images
    as in a direct probe (an `epoch` attribute like augment.SeededDataset's)."""
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
        counts += torch.stack([(top5[:, 0] == y).sum(), (top5 == y[:, None]).any(1).sum(),
                               torch.tensor(len(y), device=device)])
    head.train()
    if world_size() > 1:
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


# =============================================================================================
# Plumbing: data, checkpoint, loop, main (the pretraining scripts' protocol)
# =============================================================================================
def train_transform(size):
    """The probe's training augmentation: RandomResizedCrop + flip, nothing else."""
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)])


def make_datasets(args):
    """Labelled training images (augmented or center crops) and the held-out split (center
    crops), every split numbered by the training split's classes (augment.folder_split)."""
    eval_t = augment.eval_transform(args.image_size)
    train_t = eval_t if args.no_aug else train_transform(args.image_size)
    train_set = augment.dataset(args.data, "train_labeled", train_t, args.data_root, args.seed)
    return train_set, augment.dataset(args.data, "test", eval_t, args.data_root)


def train_loader(train_set, epoch, skip_batches, args):
    """This process's batches of `epoch`, from batch `skip_batches` on (a resumed epoch)."""
    sampler = torch.utils.data.DistributedSampler(train_set, world_size(), rank(), shuffle=True,
                                                  seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    local_batch = args.batch_size // world_size()
    train_set.epoch = epoch  # seeds the crops: the same whatever the workers, processes, resume
    return torch.utils.data.DataLoader(
        train_set, batch_size=local_batch, sampler=list(sampler)[skip_batches * local_batch:],
        num_workers=0 if args.cached_features else args.workers,  # cached: rows of a tensor
        pin_memory=torch.cuda.is_available(), drop_last=True,
        worker_init_fn=augment.ignore_stop_signals,
        generator=torch.Generator().manual_seed(args.seed))


def eval_loader(dataset, args):
    """This process's shard (every world_size-th image) of a data set, in batches of 256 or more
    (no gradient: big batches cost little memory and run much faster on CPU)."""
    shard = torch.utils.data.Subset(dataset, range(rank(), len(dataset), world_size()))
    return torch.utils.data.DataLoader(
        shard, batch_size=max(args.batch_size // world_size(), 256), num_workers=args.workers,
        pin_memory=torch.cuda.is_available(), worker_init_fn=augment.ignore_stop_signals,
        generator=torch.Generator().manual_seed(0))  # not the global RNG: the head's


# The flags a resumed probe may change; any other difference would make it another probe.
RESUMABLE = {"output_dir", "resume", "resume_anyway", "workers", "print_freq", "max_steps",
             "save_every", "dist_timeout", "data_root", "no_image_check", "epochs"}


def save_checkpoint(args, step, steps_per_epoch, head, optimizer, best_top1, evaluated=True):
    """Rank 0 writes output-dir/checkpoint.pth (the head: a plain Linear or BN + Linear state
    dict, to resume or reuse) through a .tmp file and a rename; nothing non-finite is written.
    `evaluated` False: stopped at an epoch's end before evaluating (the resume evaluates)."""
    if rank() == 0:
        ckpt = {"framework": "lincls", "step": step, "steps_per_epoch": steps_per_epoch,
                "evaluated": evaluated, "args": vars(args), "head": head.state_dict(),
                "optimizer": optimizer.state_dict(), "best_top1": best_top1}
        bad = augment.non_finite(ckpt)
        if bad:
            augment.end_run(1, f"error: the probe diverged by step {step}: non-finite values in "
                               f"{', '.join(bad[:3])}; lower --lr or use --head-bn")
        path = os.path.join(args.output_dir, "checkpoint.pth")
        torch.save(ckpt, path + ".tmp")
        os.replace(path + ".tmp", path)
    if world_size() > 1:
        dist.barrier()  # nobody stops or exits while rank 0 writes


def read_checkpoint(args):
    """The probe to continue: output-dir/checkpoint.pth if there is one, else --resume; checked
    (a probe's checkpoint, the same flags). -> (path, checkpoint) or (None, None)."""
    path = os.path.join(args.output_dir, "checkpoint.pth")
    path = path if os.path.exists(path) else args.resume
    if not path:
        return None, None
    if not os.path.isfile(path):
        raise augment.InputError(f"--resume {path}: no such file")
    ckpt = augment.load_weights(path)
    if not isinstance(ckpt, dict) or ckpt.get("framework") != "lincls":
        raise augment.InputError(f"cannot resume from {path}: not a checkpoint.pth of lincls.py")
    changed = [f"--{k.replace('_', '-')} {v} -> {getattr(args, k)}"
               for k, v in ckpt["args"].items() if k not in RESUMABLE and getattr(args, k, v) != v]
    if changed and not args.resume_anyway:
        raise augment.InputError(f"cannot resume from {path}: this command changes its run "
                                 f"({', '.join(changed)}); --resume-anyway if that is intended")
    return path, ckpt


def check_args(args, train_set, backbone):
    """Impossible settings as one clear error, before any work."""
    problems = []
    if args.batch_size % world_size():
        problems.append(f"--batch-size {args.batch_size} is not divisible by the {world_size()} "
                        f"processes")
    if len(train_set) < args.batch_size:
        problems.append(f"--batch-size {args.batch_size} is larger than the {len(train_set)} "
                        f"training images (pass a smaller one)")
    patch = getattr(backbone, "patch_size", 1)  # ViTs only
    if args.image_size % patch:
        problems.append(f"--image-size {args.image_size} is not a multiple of the ViT's patch "
                        f"size {patch}")
    if args.epochs < 1 or args.lr <= 0 or args.print_freq < 1:
        problems.append("--epochs, --lr and --print-freq must be positive")
    if problems:
        raise augment.InputError("; ".join(problems))


def log(args, record, progress=""):
    """Print `record` (a training step's after its `progress`) and append it to
    output-dir/log.jsonl (rank 0)."""
    if rank() == 0:
        shown = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                 for k, v in record.items() if not (progress and k == "step")]
        print(" | ".join([progress] * bool(progress) + [" ".join(shown)]), flush=True)
        with open(os.path.join(args.output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def train(args):
    device = augment.init_distributed(args.dist_timeout)
    torch.backends.cudnn.benchmark = True
    with augment.agreed():  # each process checks alone; a problem on any: one line, exit code 2
        backbone, feature_dim, args.arch, reference = load_backbone(args.pretrained, args.arch,
                                                                    args.seed)
        train_set, val_set = make_datasets(args)
        resolve_preset(args, args.arch, len(train_set))
        check_args(args, train_set, backbone)
        resume, ckpt = read_checkpoint(args)
        try:
            os.makedirs(args.output_dir, exist_ok=True)
            open(os.path.join(args.output_dir, "log.jsonl"), "a").close()
        except OSError as e:
            raise augment.InputError(f"cannot write to --output-dir {args.output_dir}: {e}")
    with augment.agreed():  # the processes share the image check: each gets every answer
        val_images = len(val_set)
        if args.skip_bad_images or not args.no_image_check:
            augment.check_images({"training images": train_set, "held-out images": val_set},
                                 args.skip_bad_images, args.workers)
        steps_per_epoch = len(train_set) // args.batch_size
        if ckpt and ckpt["steps_per_epoch"] != steps_per_epoch:
            raise augment.InputError(f"cannot resume from {resume}: {ckpt['steps_per_epoch']} "
                                     f"steps per epoch, this run {steps_per_epoch} (other data?)")
    backbone.to(device)
    torch.manual_seed(args.seed)
    head = make_head(feature_dim, len(train_set.base.classes), args.head_bn).to(device)
    optimizer = make_optimizer(head, args)
    step, best_top1 = 0, 0.0
    with augment.agreed():
        if ckpt:
            try:
                head.load_state_dict(ckpt["head"])
                optimizer.load_state_dict(ckpt["optimizer"])
            except (KeyError, RuntimeError, ValueError) as e:
                raise augment.InputError(f"cannot resume from {resume}: {type(e).__name__}: "
                                         f"{' '.join(str(e).split()[:40])}") from None
            step, best_top1 = ckpt["step"], ckpt["best_top1"]
    total_steps = args.epochs * steps_per_epoch
    last = min(total_steps, args.max_steps or total_steps)
    owed = not ckpt.get("evaluated", True) if ckpt else False  # a stop signal came first
    if step >= last and not owed:  # a rerun of a finished command
        return augment.say(f"already finished at step {step}: {resume} (best top-1 "
                           f"{best_top1:.1f}%); nothing to do")
    augment.say(f"linear probe {f'resumed at step {step}' if step else 'starts'}: {args.arch} of "
                f"{args.pretrained}; {args.data}, {len(train_set)} training and {len(val_set)} "
                f"held-out images; --preset {args.preset}: {args.optimizer}, batch "
                f"{args.batch_size}, base lr {args.lr}, {args.epochs} epochs {args.schedule}; "
                f"{steps_per_epoch} steps an epoch, {last} in all; {world_size()} process(es); "
                f"writes {args.output_dir}")
    if step:
        log(args, {"resumed": resume, "step": step})
    head_ddp = nn.parallel.DistributedDataParallel(head) if world_size() > 1 else head
    peak_lr = args.lr * args.batch_size / 256
    if args.cached_features:  # one pass over center crops; the loop never runs the backbone
        tick = time.time()
        train_set = CachedFeatures(*extract_features(backbone, train_set, device, args))
        val_features = CachedFeatures(*extract_features(backbone, val_set, device, args))
        val_loader = eval_loader(val_features, argparse.Namespace(batch_size=args.batch_size,
                                                                  workers=0))
        log(args, {"features": "cached", "train": len(train_set), "val": len(val_features),
                   "seconds": time.time() - tick})
        run_backbone = None
    else:
        val_loader, run_backbone = eval_loader(val_set, args), backbone

    top1 = top5 = None
    if owed:  # the evaluation a stop signal cut off: first thing
        top1, top5 = accuracy(run_backbone, head, val_loader, device, args)
        best_top1 = max(best_top1, top1)
        log(args, {"epoch": step / steps_per_epoch, "step": step, "top1": top1, "top5": top5})
        save_checkpoint(args, step, steps_per_epoch, head, optimizer, best_top1)
    first, start, shown = step, time.time(), time.time()  # the ETA's pace; the last line's time
    received = []  # SIGTERM, SIGUSR1, SIGINT: save and stop at the next logged step
    handlers = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in augment.STOP_SIGNALS}
    try:
        while step < last:
            window_start, window_steps, stop = time.time(), 0, False
            for images, labels in train_loader(train_set, step // steps_per_epoch,
                                               step % steps_per_epoch, args):
                lr = learning_rate(step, total_steps, peak_lr, args.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                features = images.to(device) if run_backbone is None \
                    else encode(backbone, images, device, args)
                loss = F.cross_entropy(head_ddp(features), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step, window_steps = step + 1, window_steps + 1
                epoch_end = step % steps_per_epoch == 0 or step == last
                if step % args.print_freq == 0 or epoch_end:
                    x = torch.stack([loss.detach(), torch.tensor(float(bool(received)),
                                                                 device=device)])
                    if world_size() > 1:  # the global batch's loss; any process asked to stop
                        dist.all_reduce(x)
                    loss_value, stop = x[0].item() / world_size(), x[1].item() > 0
                    if not math.isfinite(loss_value):
                        augment.end_run(1, f"error: the probe diverged at step {step} (loss "
                                           f"{loss_value}); lower --lr or use --head-bn")
                    elapsed, shown = time.time() - window_start, time.time()
                    log(args, {"epoch": step / steps_per_epoch, "step": step, "loss": loss_value,
                               "lr": lr, "images_per_s": args.batch_size * window_steps / elapsed},
                        augment.progress(step, last, first, start))
                    window_start, window_steps = time.time(), 0
                elif time.time() - shown > 30:  # a line at least every 30 s whatever --print-freq
                    augment.say(augment.progress(step, last, first, start, args.batch_size))
                    shown = time.time()
                if stop or epoch_end:
                    break
                if args.save_every and step % args.save_every == 0:
                    save_checkpoint(args, step, steps_per_epoch, head, optimizer, best_top1)
            if not stop:
                top1, top5 = accuracy(run_backbone, head, val_loader, device, args)
                best_top1 = max(best_top1, top1)
                log(args, {"epoch": step / steps_per_epoch, "step": step, "top1": top1,
                           "top5": top5})
            save_checkpoint(args, step, steps_per_epoch, head, optimizer, best_top1,
                            evaluated=not (stop and epoch_end))
            if stop:
                by = signal.Signals(received[0]).name if received else "a signal to another process"
                augment.end_run(augment.EXIT_STOPPED, f"stopped at step {step} by {by}: "
                                f"{args.output_dir}/checkpoint.pth holds it; the same command "
                                f"continues")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    check_backbone_unchanged(backbone, reference)
    log(args, {"best_top1": best_top1, "final_top1": top1, "final_top5": top5,
               "backbone_unchanged": True, "val_images": len(val_set),
               "val_skipped": val_images - len(val_set)})
    augment.say(f"finished at step {step}: top-1 {top1:.1f}% (best {best_top1:.1f}%), top-5 "
                f"{top5:.1f}% on {len(val_set)} held-out images; the backbone unchanged; "
                f"{args.output_dir}/checkpoint.pth holds the head")


@record  # under torchrun: a failing process's traceback and rank in torchrun's report
def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except augment.InputError as e:  # found while training (an image a data worker cannot read)
        where = f" (rank {rank()})" if world_size() > 1 else ""
        print(f"error{where}: {str(e).strip().splitlines()[-1]}", file=sys.stderr, flush=True)
        sys.exit(augment.EXIT_BAD_INPUT)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
