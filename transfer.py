r"""Linear transfer to 12 downstream data sets (the paper's Table 4), by the standard protocol of
Kornblith et al. 2019 as used by SimCLR, BYOL and NNCLR.

Protocol in five lines:
    features: frozen backbone (eval mode), pool-5, of resize-224 (bicubic, shorter side) +
    center crop 224
    probe: L2-regularised multinomial logistic regression, sum CE + wd/2 ||W||^2 (bias free;
    scikit-learn's C = 1/wd), fitted in float64 as mean CE + lambda/2 ||W||^2 with lambda = wd / n
    for n images, L-BFGS
    search: 45 log-spaced wd in [1e-6, 1e5], each trained on train, scored on the validation split
    (official for Aircraft, DTD, Flowers, VOC07; else a seeded 20% of train); retrain on train+val
    with the best wd; report on test: top-1, mean per-class accuracy, or VOC07 11-point mAP

Data sets live in --data-root/<name>/ (where each is expected is printed when it is missing);
features are cached per (checkpoint, data set) in --cache-dir, and recomputed when any file of the
data set changed. --dataset folder --data DIR takes any ImageFolder tree DIR/train, DIR/test and
optionally DIR/val, every split numbered by DIR/train's classes.

Examples:
    python transfer.py --pretrained runs/baseline/backbone.pth --arch resnet50 --datasets all \
        --data-root data
    python transfer.py --pretrained runs/quickstart/checkpoint.pth --dataset cifar10 flowers \
        --data-root data
    python transfer.py --pretrained runs/quickstart/backbone.pth --arch resnet18 --dataset folder \
        --data my_images
"""
import argparse
import csv
import hashlib
import io
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from torchvision.transforms import v2

import augment
import lincls  # the backbone from any checkpoint: shared with the ImageNet linear probe

# =============================================================================================
# Arguments
# =============================================================================================
# Table 4's columns in order: name -> (column title, metric, the paper's number for its 1600-ep
# model)
DATASETS = {
    "food101": ("Food", "top1", 79.4),
    "cifar10": ("CIFAR-10", "top1", 92.8),
    "cifar100": ("CIFAR-100", "top1", 77.8),
    "birdsnap": ("Birdsnap", "top1", 58.5),
    "sun397": ("SUN397", "top1", 67.8),
    "cars": ("Cars", "top1", 69.7),
    "aircraft": ("Aircraft", "mean_per_class", 59.3),
    "voc2007": ("VOC07", "map11", 93.8),
    "dtd": ("DTD", "top1", 80.2),
    "pets": ("Pets", "mean_per_class", 87.2),
    "caltech101": ("Caltech-101", "mean_per_class", 93.1),
    "flowers": ("Flowers", "mean_per_class", 92.5),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Linear transfer (L-BFGS logistic regression) to the "
                                            "12 data sets of Table 4",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", "--datasets", nargs="+", default=["all"],
                   help="all (those present) | folder (with --data) | any of: "
                        + " ".join(DATASETS))
    g.add_argument("--data-root", default="data",
                   help="data set <name> is looked for in DATA_ROOT/<name>/")
    g.add_argument("--data", help="--dataset folder: an ImageFolder root with train/, test/ and "
                                  "optionally val/")
    g.add_argument("--metric", default="top1", choices=["top1", "mean_per_class"],
                   help="--dataset folder: its metric")
    g.add_argument("--download", action="store_true",
                   help="let torchvision download the data sets it can (not Cars, Birdsnap, "
                        "VOC07, SUN397's partitions)")
    g.add_argument("--skip-bad-images", action="store_true",
                   help="leave unreadable images out with a warning instead of stopping: every "
                        "split is read once first and each readable image counts once (the results "
                        "give how many were skipped)")
    g.add_argument("--image-size", type=int, default=224,
                   help="resize the shorter side to this (bicubic), then center-crop it")
    g.add_argument("--batch-size", type=int, default=256,
                   help="images per forward when extracting features")
    g.add_argument("--workers", type=int, default=8, help="data loading processes")
    g = p.add_argument_group("model")
    g.add_argument("--pretrained", required=True,
                   help="checkpoint.pth or backbone.pth of our scripts, an official MoCo / "
                        "MoCo v3 / SimSiam checkpoint, or 'random'")
    g.add_argument("--arch", help="backbone: taken from our checkpoint.pth or an official "
                   "checkpoint's arch (a different --arch is an error); otherwise needed, default "
                   "resnet50")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                   help="mixed precision of the backbone forward; auto: bf16 (or fp16) on CUDA, "
                        "off on CPU")
    g = p.add_argument_group("probe")
    g.add_argument("--lambdas", type=int, default=45,
                   help="log-spaced L2 strengths wd in [1e-6, 1e5] to search, on the summed "
                        "loss as scikit-learn's C = 1/wd (docs/evaluation.md)")
    g.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="validation share of train where no official split exists")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds the validation split and Caltech-101's 30 training images per class")
    g = p.add_argument_group("run")
    g.add_argument("--cache-dir", default="runs/transfer/features",
                   help="features per (checkpoint, data set)")
    g.add_argument("--output-dir", default="runs/transfer",
                   help="results.jsonl, transfer.md and transfer.csv")
    return p.parse_args(argv)


# =============================================================================================
# Data: the 12 data sets, each as {"train", "val" (or None), "test"} of (PIL image, label)
# =============================================================================================
def to_rgb(image):
    return image.convert("RGB")  # some data sets (Caltech-101) hold grayscale images


def probe_transform(size):
    """Resize the shorter side to `size` (bicubic), center-crop `size`: no augmentation."""
    return v2.Compose([to_rgb, v2.ToImage(),
                       v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
                       v2.CenterCrop(size), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(augment.IMAGENET_MEAN, augment.IMAGENET_STD)])


class Transformed(torch.utils.data.Dataset):
    """(image, target) of `base` at `indices` (all by default), with `transform` applied. An image
    that cannot be read raises InputError (torchvision's data sets raise PIL's own errors)."""

    def __init__(self, base, transform, indices=None):
        self.base, self.transform = base, transform
        self.indices = list(range(len(base))) if indices is None else list(indices)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        try:
            image, target = self.base[self.indices[i]]
        except augment.InputError:
            raise
        except Exception as e:
            raise augment.InputError(f"cannot read image {self.indices[i]} of "
                                     f"{type(self.base).__name__}: {' '.join(str(e).split())} "
                                     "(--skip-bad-images leaves it out)") from None
        return self.transform(image), target


class FileList(torch.utils.data.Dataset):
    """Images from a list of paths, with their targets (a class index, or a 0/1/-1 row for
    VOC07)."""

    def __init__(self, paths, targets, classes=None):
        self.paths, self.targets, self.classes = paths, targets, classes

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return augment.load_rgb(self.paths[i]), self.targets[i]


def read_lines(path):
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def sun397(root):
    """SUN397 with the first of its ten official partitions (Training_01.txt / Testing_01.txt,
    50 + 50 images per class); torchvision's SUN397 has no split."""
    data = os.path.join(root, "SUN397")
    lists = [next((os.path.join(d, name) for d in (root, data)
                   if os.path.exists(os.path.join(d, name))), None)
             for name in ("Training_01.txt", "Testing_01.txt")]
    if not os.path.exists(os.path.join(data, "ClassName.txt")) or None in lists:
        raise FileNotFoundError
    names = read_lines(os.path.join(data, "ClassName.txt"))  # "/a/abbey": one map for both splits
    classes = {c: i for i, c in enumerate(names)}

    def split(listing):  # lines like /a/abbey/sun_aaalbzqrimafwbiv.jpg
        lines = read_lines(listing)
        return FileList([data + line for line in lines],
                        [classes[os.path.dirname(line)] for line in lines], names)

    return {"train": split(lists[0]), "val": None, "test": split(lists[1])}


def birdsnap(root):
    """Birdsnap from its file lists: images.txt (tab-separated, columns path and species_id) and
    test_images.txt; the images as fetched by its get_birdsnap.py under download/images/.
    Many URLs are dead: listed images that are missing are left out (counted in the log)."""
    images = next((d for d in (os.path.join(root, "download", "images"),
                               os.path.join(root, "images")) if os.path.isdir(d)), None)
    if images is None or not os.path.exists(os.path.join(root, "images.txt")):
        raise FileNotFoundError
    rows = [line.split("\t") for line in read_lines(os.path.join(root, "images.txt"))]
    path_col, species_col = rows[0].index("path"), rows[0].index("species_id")
    test = set(read_lines(os.path.join(root, "test_images.txt"))[1:])  # header "path"
    splits = {"train": ([], []), "test": ([], [])}
    for row in rows[1:]:
        path = os.path.join(images, row[path_col])
        if os.path.exists(path):
            paths, labels = splits["test" if row[path_col] in test else "train"]
            paths.append(path)
            labels.append(int(row[species_col]) - 1)
    return {"train": FileList(*splits["train"]), "val": None, "test": FileList(*splits["test"])}


VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep",
               "sofa", "train", "tvmonitor")


def voc2007(root):
    """VOC2007 classification from ImageSets/Main/<class>_<split>.txt: per image and class 1
    (present), 0 (only 'difficult' objects: ignored, as in the VOC evaluation) or -1 (absent) ->
    targets 1 / -1 / 0."""
    base = os.path.join(root, "VOCdevkit", "VOC2007")
    main = os.path.join(base, "ImageSets", "Main")
    if not all(os.path.exists(os.path.join(main, f"aeroplane_{s}.txt"))
               for s in ("train", "val", "test")):
        raise FileNotFoundError

    def split(name):
        ids = read_lines(os.path.join(main, f"{name}.txt"))
        targets = torch.zeros(len(ids), len(VOC_CLASSES), dtype=torch.int8)
        row = {image_id: i for i, image_id in enumerate(ids)}
        for c, cls in enumerate(VOC_CLASSES):
            for line in read_lines(os.path.join(main, f"{cls}_{name}.txt")):
                image_id, flag = line.split()
                targets[row[image_id], c] = {"1": 1, "0": -1, "-1": 0}[flag]
        return FileList([os.path.join(base, "JPEGImages", f"{i}.jpg") for i in ids], list(targets))

    return {"train": split("train"), "val": split("val"), "test": split("test")}


def caltech101(root, seed, download):
    """Caltech-101 (torchvision drops the background class): 30 random training images per class
    (seeded), the rest test."""
    if not download and not os.path.isdir(os.path.join(root, "caltech101", "101_ObjectCategories")):
        raise FileNotFoundError  # before torchvision, which would create the folders
    base = torchvision.datasets.Caltech101(root, download=download)
    labels = torch.tensor(base.y)
    generator = torch.Generator().manual_seed(seed)
    train = []
    for c in range(int(labels.max()) + 1):
        members = (labels == c).nonzero().flatten()
        train += members[torch.randperm(len(members), generator=generator)[:30]].tolist()
    test = sorted(set(range(len(base))) - set(train))
    return {"train": (base, sorted(train)), "val": None, "test": (base, test)}


def torchvision_splits(name, root, download):
    """The data sets torchvision has, with their official splits (val: None where there is none)."""
    tv = torchvision.datasets
    if name in ("cifar10", "cifar100"):
        cls = tv.CIFAR10 if name == "cifar10" else tv.CIFAR100
        return {"train": cls(root, train=True, download=download), "val": None,
                "test": cls(root, train=False, download=download)}
    make = {
        "food101": lambda s: tv.Food101(root, split=s, download=download),
        # no download: the files must be fetched by hand
        "cars": lambda s: tv.StanfordCars(root, split=s),
        "aircraft": lambda s: tv.FGVCAircraft(root, split=s, annotation_level="variant",
                                              download=download),
        "dtd": lambda s: tv.DTD(root, split=s, partition=1, download=download),
        "pets": lambda s: tv.OxfordIIITPet(root, split=s, target_types="category",
                                           download=download),
        "flowers": lambda s: tv.Flowers102(root, split=s, download=download),
    }[name]
    train_split = {"pets": "trainval"}.get(name, "train")
    official_val = name in ("aircraft", "dtd", "flowers")
    return {"train": make(train_split), "val": make("val") if official_val else None,
            "test": make("test")}


# where each data set is expected, for the message when it is missing
WHERE = {
    "food101": "{root}/food-101/ (torchvision Food101: images/, meta/; --download fetches it)",
    "cifar10": "{root}/cifar-10-batches-py/ (torchvision CIFAR10; --download fetches it)",
    "cifar100": "{root}/cifar-100-python/ (torchvision CIFAR100; --download fetches it)",
    "birdsnap": "{root}/images.txt, {root}/test_images.txt and the images under "
                "{root}/download/images/ (Birdsnap's get_birdsnap.py)",
    "sun397": "{root}/SUN397/ "
              "(torchvision SUN397: ClassName.txt, a/abbey/...; --download fetches it) and "
              "Training_01.txt, Testing_01.txt of SUN397's Partitions.zip in {root}/",
    "cars": "{root}/stanford_cars/ (torchvision StanfordCars: cars_train/, cars_test/, devkit/, "
            "cars_test_annos_withlabels.mat; fetched by hand)",
    "aircraft": "{root}/fgvc-aircraft-2013b/ (torchvision FGVCAircraft; --download fetches it)",
    "voc2007": "{root}/VOCdevkit/VOC2007/ with JPEGImages/ and ImageSets/Main/ of both "
               "VOCtrainval_06-Nov-2007 and VOCtest_06-Nov-2007",
    "dtd": "{root}/dtd/ (torchvision DTD; --download fetches it)",
    "pets": "{root}/oxford-iiit-pet/ "
            "(torchvision OxfordIIITPet: images/, annotations/; --download fetches it)",
    "caltech101": "{root}/caltech101/101_ObjectCategories/ "
                  "(torchvision Caltech101; --download fetches it)",
    "flowers": "{root}/flowers-102/ "
               "(torchvision Flowers102: jpg/, imagelabels.mat, setid.mat; --download fetches it)",
}


def load_splits(name, args):
    """Data set `name` -> ({"train", "val" or None, "test"} datasets of (transformed image, target),
    metric). A data set that is not there raises InputError saying where to put it."""
    transform = probe_transform(args.image_size)
    if name == "folder":
        if not args.data or not os.path.isdir(os.path.join(args.data, "train")):
            raise augment.InputError("--dataset folder needs --data DIR with DIR/train/ and "
                                     f"DIR/test/ (got {args.data})")
        if not os.path.isdir(os.path.join(args.data, "test")):
            raise augment.InputError(f"--data {args.data}: no test/ folder")
        # every split numbered by train/'s classes: a class missing from test/ shifts no label
        splits = {s: augment.folder_split(args.data, s)
                  if os.path.isdir(os.path.join(args.data, s)) else None
                  for s in ("train", "val", "test")}
        metric = args.metric
    else:
        root = os.path.join(args.data_root, name)
        try:
            if name in ("sun397", "birdsnap", "voc2007"):
                splits = {"sun397": sun397, "birdsnap": birdsnap, "voc2007": voc2007}[name](root)
            elif name == "caltech101":
                splits = caltech101(root, args.seed, args.download)
            else:
                splits = torchvision_splits(name, root, args.download)
        except Exception as e:
            # torchvision says RuntimeError("Dataset not found"), ours FileNotFoundError
            detail = f" ({type(e).__name__}: {' '.join(str(e).split()[:25])})" if str(e) else ""
            raise augment.InputError(f"{name} not found{detail}: "
                                     f"put it in {WHERE[name].format(root=root)}") from None
        metric = DATASETS[name][1]
    out = {}
    for split, s in splits.items():  # a data set, or (data set, indices) for Caltech-101's split
        out[split] = (None if s is None
                      else Transformed(s[0], transform, s[1]) if isinstance(s, tuple)
                      else Transformed(s, transform))
    return out, metric


# =============================================================================================
# Model: the frozen backbone and its features, cached per (checkpoint, data set, its files)
# =============================================================================================
def data_root(name, args):
    """The folder that holds every file of data set `name`."""
    return args.data if name == "folder" else os.path.join(args.data_root, name)


def data_fingerprint(root, args):
    """SHA-1 of (relative path, size, modification time) of every file under `root` (but the cache
    and output folders), and of --skip-bad-images: an image added, removed, replaced or edited in
    place changes it."""
    skip = {os.path.abspath(d) for d in (args.cache_dir, args.output_dir)}
    digest = hashlib.sha1(f"skip_bad_images={args.skip_bad_images}".encode())
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders
                               if os.path.abspath(os.path.join(folder, d)) not in skip)
        for name in sorted(files):
            path = os.path.join(folder, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, root)}\0{stat.st_size}\0"
                          f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_path(args, name):
    """One file per (checkpoint, data set, image size): keyed by the checkpoint's path, size and
    time."""
    if args.pretrained == "random":
        key = f"random-{args.arch}-{args.seed}"
    else:
        stat = os.stat(args.pretrained)
        key = f"{os.path.abspath(args.pretrained)}-{stat.st_size}-{stat.st_mtime_ns}-{args.arch}"
    if name == "folder":
        key += os.path.abspath(args.data)
        name = "folder-" + os.path.basename(os.path.normpath(args.data))
    key = hashlib.sha1(f"{key}-{args.image_size}-{args.seed}".encode()).hexdigest()[:10]
    tag = os.path.splitext(os.path.basename(args.pretrained))[0]
    return os.path.join(args.cache_dir, f"{tag}-{key}", f"{name}.pt")


@torch.no_grad()
def extract(backbone, dataset, device, args):
    """Features of every image of `dataset` -> NxD float32 (CPU), N targets (or NxC for VOC07)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size,
                                         num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    features, targets = [], []
    for images, y in loader:
        with augment.autocast(device, args.amp):
            features.append(backbone(images.to(device, non_blocking=True)).float().cpu())
        targets.append(torch.as_tensor(y))
    return torch.cat(features), torch.cat(targets)


def read_cache(path, fingerprint):
    """The cached {"features", "skipped"} at `path` if it was computed from these very files, else
    None."""
    if not os.path.exists(path):
        return None
    try:
        cached = augment.load_weights(path)
    except augment.InputError as e:
        print(f"{path}: {e}; recomputing", flush=True)
        return None
    if not isinstance(cached, dict) or cached.get("fingerprint") != fingerprint:
        print(f"{path}: the data set's files changed since these features were computed; "
              "recomputing", flush=True)
        return None
    return cached


def features_of(name, splits, backbone, device, args):
    """{"train", "val" (or None), "test"}: (features, targets) from the cache or computed, and
    {split: how many unreadable images --skip-bad-images left out}."""
    path = cache_path(args, name)
    fingerprint = data_fingerprint(data_root(name, args), args)
    cached = read_cache(path, fingerprint)
    if cached is not None:
        return cached["features"], cached["skipped"]
    tick = time.time()
    skipped = {}
    for split, ds in splits.items():
        if ds is not None and args.skip_bad_images:  # each readable image once
            ds.indices, skipped[split] = augment.readable(ds.base, ds.indices, args.workers,
                                                          f"{name} {split} images")
    feats = {split: None if ds is None else extract(backbone, ds, device, args)
             for split, ds in splits.items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"fingerprint": fingerprint, "features": feats, "skipped": skipped}, path + ".tmp")
    os.replace(path + ".tmp", path)  # whole or not at all
    print(f"{name}: features of "
          f"{', '.join(f'{len(v[0])} {k}' for k, v in feats.items() if v)} images "
          f"in {time.time() - tick:.0f} s -> {path}", flush=True)
    return feats, skipped


def check_classes(name, feats, splits):
    """A val or test class without training images could not be scored: an error naming it."""
    train = set(feats["train"][1].tolist())
    for split in ("val", "test"):
        # VOC07's multi-label rows: 20 fixed classes
        if feats.get(split) is None or feats[split][1].ndim != 1:
            continue
        unknown = sorted(set(feats[split][1].tolist()) - train)
        if unknown:
            classes = getattr(splits[split].base, "classes", None) or []
            names = [f"{classes[c]}" if c < len(classes) else f"class {c}" for c in unknown]
            raise augment.InputError(f"{name}: the {split} split has images of {len(unknown)} "
                                     "class(es) without training images, which cannot be scored: "
                                     f"{', '.join(names[:5])}"
                                     + (", ..." if len(unknown) > 5 else ""))


def validation_split(feats, fraction, seed):
    """(train, val) feature pairs: the official val split, or a seeded `fraction` of train."""
    if feats.get("val") is not None:
        return feats["train"], feats["val"]
    x, y = feats["train"]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = round(fraction * len(x))
    val, train = order[:n_val], order[n_val:]
    return (x[train], y[train]), (x[val], y[val])


# =============================================================================================
# Probe: logistic regression with L-BFGS, the metrics, the search over wd
# =============================================================================================
# L-BFGS stops when no partial derivative of the probe loss exceeds this (or at --max-iter)
TOLERANCE = 1e-6


def probe_loss(x, y, weight, bias, lam):
    """Mean cross-entropy (multi-class, y: N) or mean over images of the summed one-vs-rest
    logistic losses (multi-label, y: NxC of 1 / 0 / -1 = ignore) + lam/2 ||W||^2; the bias is
    free."""
    logits = x @ weight + bias  # NxC
    if y.ndim == 1:
        loss = F.cross_entropy(logits, y)
    else:
        per_entry = F.binary_cross_entropy_with_logits(logits, (y > 0).to(logits.dtype),
                                                       reduction="none")
        loss = (per_entry * (y >= 0)).sum() / len(x)
    return loss + lam / 2 * weight.pow(2).sum()


def fit_logistic(x, y, num_classes, lam, max_iter=1000, init=None):
    """L-BFGS on the convex probe loss -> (weight DxC, bias C). init: a warm start (weight, bias).
    In float32 it stalls short of the optimum (its rounding floors the gradient near 1e-4): give it
    float64 features. It stops when no partial derivative (of the weights or the bias) exceeds the
    TOLERANCE, after max_iter iterations, or when the line search can make no step; never on a
    small change of the loss, which comes early when lam is small."""
    # +-------------------------------------------------------------------------------------------+
    # | The same fit in better units: pool-5 features have row norms of tens, so the weights'     |
    # | curvature dwarfs the bias' and L-BFGS crawls. On x / s (s: the root-mean-square row norm) |
    # | with weights V = s W and strength lam / s^2 the loss is the same function, with           |
    # | curvatures of one size; dL/dW = dL/dV / s, so V's tolerance is TOLERANCE / s (the bias'   |
    # | is unchanged).                                                                            |
    # +-------------------------------------------------------------------------------------------+
    s = x.pow(2).sum(1).mean().sqrt().clamp(min=1.0).item()
    x = x / s
    weight = (torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device) if init is None
              else init[0] * s)
    bias = (torch.zeros(num_classes, dtype=x.dtype, device=x.device) if init is None
            else init[1].clone())
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20,
                                  tolerance_grad=TOLERANCE / s, tolerance_change=0.0,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = probe_loss(x, y, weight, bias, lam / s ** 2)
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach() / s, bias.detach()


def max_gradient(x, y, weight, bias, lam):
    """The largest partial derivative of the probe loss at (weight, bias): 0 at the optimum."""
    weight, bias = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    grads = torch.autograd.grad(probe_loss(x, y, weight, bias, lam), [weight, bias])
    return max(g.abs().max().item() for g in grads)


def top1(scores, y):
    return 100.0 * (scores.argmax(1) == y).float().mean().item()


def mean_per_class(scores, y):
    """Mean over the classes present in y of the share of their images predicted right."""
    prediction = scores.argmax(1)
    return 100.0 * torch.stack([(prediction[y == c] == c).float().mean()
                                for c in y.unique()]).mean().item()


def ap11(scores, positive):
    """VOC07 11-point average precision of one class: mean over recall levels t = 0, 0.1, ..., 1
    of the best precision at recall >= t (0 if never reached)."""
    positive = positive[scores.argsort(descending=True)].float()
    hits = positive.cumsum(0)
    precision = hits / torch.arange(1, len(positive) + 1)
    recall = hits / max(positive.sum().item(), 1)
    levels = [precision[recall >= t / 10 - 1e-12].max().item()
              if (recall >= t / 10 - 1e-12).any() else 0.0 for t in range(11)]
    return sum(levels) / 11


def map11(scores, y):
    """Mean over classes of ap11, each over the images not marked 'ignore' (-1) for it; y: NxC."""
    aps = [ap11(scores[y[:, c] >= 0, c], y[y[:, c] >= 0, c] > 0)
           for c in range(y.shape[1]) if (y[:, c] > 0).any()]
    return 100.0 * sum(aps) / len(aps)


METRICS = {"top1": top1, "mean_per_class": mean_per_class, "map11": map11}


def wd_grid(n):
    """n log-spaced L2 strengths wd from 1e-6 to 1e5 (n = 45: the standard grid, 4 per
    decade + 1)."""
    return torch.logspace(-6, 5, n, dtype=torch.float64).tolist()


# +---------------------------------------------------------------------------------------------+
# | One grid, two scales. The reference code (scikit-learn, C = 1/wd) minimises                 |
# |     sum_i CE_i + wd/2 ||W||^2,   i.e. n x (mean_i CE_i + lambda/2 ||W||^2), lambda = wd / n |
# | for n training images. The grid is in wd, as the literature's; each fit minimises the mean  |
# | form with lambda = wd / n (better scaled), so the search (n = train) and the retrain          |
# | (n = train + val) use the same wd with their own lambda, as scikit-learn with the same C.    |
# +---------------------------------------------------------------------------------------------+
def probe(train, val, test, num_classes, metric, grid, max_iter=1000):
    """The protocol on features: search wd on (train, val), retrain on train+val, score test. Each
    of train / val / test is (NxD features, targets); the fits run in float64. -> dict of the
    results, with the largest partial derivative left at the end of the retrain (converged:
    <= TOLERANCE) and how many search fits stopped at max_iter short of the TOLERANCE."""
    score = METRICS[metric]
    train, val, test = ((x.double(), y) for x, y in (train, val, test))
    val_scores, init, unconverged = {}, None, 0
    # strongest first: each fit warm-starts the next, weaker one
    for wd in sorted(grid, reverse=True):
        init = fit_logistic(train[0], train[1], num_classes, wd / len(train[0]), max_iter, init)
        val_scores[wd] = score(val[0] @ init[0] + init[1], val[1])
        unconverged += max_gradient(*train, *init, wd / len(train[0])) > TOLERANCE
    best = max(sorted(grid, reverse=True), key=lambda wd: val_scores[wd])  # ties: the stronger wd
    both = (torch.cat([train[0], val[0]]), torch.cat([train[1], val[1]]))
    lam = best / len(both[0])
    weight, bias = fit_logistic(both[0], both[1], num_classes, lam, max_iter)
    return {"best_wd": best, "lambda": lam, "val_score": val_scores[best],
            "test_score": score(test[0] @ weight + bias, test[1]),
            "val_scores": [val_scores[wd] for wd in grid],
            "max_gradient": max_gradient(*both, weight, bias, lam),
            "unconverged_search_fits": unconverged, "weight": weight, "bias": bias}


# =============================================================================================
# Loop over the data sets and the table
# =============================================================================================
def table(results, folder_title=None):
    """Markdown and CSV of Table 4's columns: the paper's row and this checkpoint's."""
    names = list(DATASETS) + (["folder"] if "folder" in results else [])
    titles = [DATASETS[n][0] if n in DATASETS else folder_title for n in names]
    paper = ["paper (Table 4, 1600 ep)"] + [f"{DATASETS[n][2]:.1f}" if n in DATASETS else "-"
                                            for n in names]
    ours = ["this checkpoint"] + [f"{results[n]['test_score']:.1f}" if n in results else "-"
                                  for n in names]
    markdown = "\n".join(["| | " + " | ".join(titles) + " |", "|---" * (len(names) + 1) + "|",
                          "| " + " | ".join(paper) + " |", "| " + " | ".join(ours) + " |"])
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([["model"] + titles, paper, ours])
    return markdown, out.getvalue()


def run(args):
    names = list(DATASETS) if args.dataset == ["all"] else args.dataset
    unknown = [n for n in names if n not in DATASETS and n != "folder"]
    if unknown:
        raise augment.InputError(f"unknown --dataset {' '.join(unknown)} "
                                 f"(all, folder or: {' '.join(DATASETS)})")
    if args.lambdas < 1 or not 0 < args.val_fraction < 1:
        raise augment.InputError("--lambdas must be positive and --val-fraction in (0, 1)")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if args.amp == "auto":
        args.amp = ("off" if device.type != "cuda"
                    else "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    backbone, _, args.arch, reference = lincls.load_backbone(args.pretrained, args.arch, args.seed)
    backbone.to(device)
    present = {}
    for name in names:  # every missing data set is reported before any work
        try:
            present[name] = load_splits(name, args)
        except augment.InputError as e:
            if args.dataset != ["all"]:
                raise
            print(f"skipping {e}", flush=True)
    if not present:
        raise augment.InputError(f"none of the 12 data sets is in --data-root {args.data_root}")
    os.makedirs(args.output_dir, exist_ok=True)
    results = {}
    for name, (splits, metric) in present.items():
        tick = time.time()
        feats, skipped = features_of(name, splits, backbone, device, args)
        check_classes(name, feats, splits)
        train, val = validation_split(feats, args.val_fraction, args.seed)
        test = feats["test"]
        num_classes = (train[1].shape[1] if train[1].ndim == 2
                       else int(max(train[1].max(), val[1].max(), test[1].max())) + 1)
        on = lambda pair: (pair[0].to(device), pair[1].to(device))
        result = probe(on(train), on(val), on(test), num_classes, metric, wd_grid(args.lambdas),
                       args.max_iter)
        if result["max_gradient"] > TOLERANCE:
            augment.warn(f"{name}: the final fit stopped at --max-iter {args.max_iter} "
                         f"with a gradient of {result['max_gradient']:.1e} > {TOLERANCE:g}, "
                         "short of the optimum; raise --max-iter")
        results[name] = {"dataset": name, "metric": metric, "test_score": result["test_score"],
                         "best_wd": result["best_wd"], "lambda": result["lambda"],
                         "val_score": result["val_score"], "max_gradient": result["max_gradient"],
                         "unconverged_search_fits": result["unconverged_search_fits"],
                         "train": len(train[0]), "val": len(val[0]), "test": len(test[0]),
                         "classes": num_classes, "skipped": sum(skipped.values()),
                         "pretrained": args.pretrained, "arch": args.arch,
                         "seconds": round(time.time() - tick, 1)}
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                       for k, v in results[name].items()), flush=True)
        with open(os.path.join(args.output_dir, "results.jsonl"), "a") as f:
            f.write(json.dumps(results[name]) + "\n")
    lincls.check_backbone_unchanged(backbone, reference)
    folder_title = os.path.basename(os.path.normpath(args.data)) if args.data else "folder"
    markdown, csv_text = table(results, folder_title)
    for ext, text in (("md", markdown), ("csv", csv_text)):
        with open(os.path.join(args.output_dir, f"transfer.{ext}"), "w") as f:
            f.write(text + "\n")
    print(markdown + "\n\n" + csv_text, end="", flush=True)
    return results


# =============================================================================================
# Main
# =============================================================================================
def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except augment.InputError as e:  # from this process or a data worker
        message = str(e).strip().splitlines()[-1].split("InputError: ")[-1]
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
