"""Data-loading throughput of each view recipe: images/s and views/s, per data-loading worker.

Each image is decoded once and all its views are cut from that one decode (augment.Views), so a
recipe's cost is one decode plus its views' crops and colour operations. Compare a recipe's
images/s per worker with the training step's images/s (benchmarks/throughput.py) to see whether
data or compute bounds a design: with W workers per GPU the loader delivers about W x the
per-worker figure.

    python benchmarks/dataloader.py --data /path/to/imagenet --image-size 224 --workers 0 2 4
    python benchmarks/dataloader.py --cifar-tar data/cifar10-jpg.tar.gz --upscale 256 --images 1000

`--gpu-aug` measures the workers' half of each view under --gpu-aug (decode, crop, flip, drawing the
colour parameters) and, separately, the device's half (augment.finish_views on the last batch, on
the GPU if there is one): the two together are what a training run with --gpu-aug pays.

With 0 workers the recipe runs in this process on one thread, as a worker does, and the row also
gives images per second of CPU time: the rate of one core, which other processes on a shared
machine do not change (wall-clock rates there do).

`--data-on-device` measures, per recipe, the images/s of the views made on the device from the
images held there as uint8 (augment.OnDevice, on the GPU if there is one): no workers at all.

`--cifar-tar` takes the CIFAR-10 JPEG copy and writes `--images` of its training images,
upscaled to `--upscale` px (bicubic, JPEG quality 90), to a temporary ImageFolder: 32 px images
would make decoding unrealistically cheap next to ImageNet's (about 400 x 350 px on average).
`--upscale 0` keeps the original 32 px JPEGs (CIFAR training at 32 px). Each row is printed the
moment it is measured.
"""
import argparse
import os
import sys
import tarfile
import tempfile
import time

import torch
from PIL import Image
from torchvision.transforms import v2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import augment  # noqa: E402  (after the path)

# name -> augment.Views arguments (MoCo v2's recipe pair unless a framework is named)
RECIPES = {
    "decode": None,  # decode and convert only: the floor under every recipe
    "baseline": dict(),
    "byol": dict(framework="byol"),
    "simclr": dict(framework="simclr"),
    "multicrop": dict(multicrop=6),
    "scalemix": dict(scalemix_on="source"),
    "stronger": dict(source_aug="stronger"),
    "asymaug": dict(source_aug="stronger", target_aug="weaker"),
    "meanenc": dict(n_target=2),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="views per second per data-loading worker for each recipe",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", help="an ImageFolder root with train/ (or synthetic)")
    p.add_argument("--cifar-tar", help="the CIFAR-10 JPEG tarball: a temporary upscaled ImageFolder is made from it")
    p.add_argument("--upscale", type=int, default=256, help="side of the upscaled CIFAR images (0: the original 32 px files)")
    p.add_argument("--images", type=int, default=512, help="images per measurement (and taken from --cifar-tar)")
    p.add_argument("--image-size", type=int, default=224, help="standard view size")
    p.add_argument("--batch-size", type=int, default=32, help="images per batch")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="data-loading processes to try (0: in this process)")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--gpu-aug", action="store_true", help="the workers' half of --gpu-aug, and the device's half timed apart")
    p.add_argument("--data-on-device", action="store_true", help="also the views made on the device from its uint8 copy (per recipe)")
    args = p.parse_args(argv)
    if bool(args.data) == bool(args.cifar_tar):
        p.error("give one of --data or --cifar-tar")
    return args


def upscaled_cifar(tar_path, n, side, out):
    """The first n training JPEGs of the CIFAR-10 tarball, resized to side x side (0: as they are), as out/train/<class>/."""
    with tarfile.open(tar_path) as tar:
        count = 0
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or "train" not in parts or not member.name.endswith(".jpg"):
                continue
            folder = os.path.join(out, "train", parts[-2])
            os.makedirs(folder, exist_ok=True)
            if side:
                with Image.open(tar.extractfile(member)) as image:
                    image.convert("RGB").resize((side, side), Image.BICUBIC).save(os.path.join(folder, parts[-1]), quality=90)
            else:
                with open(os.path.join(folder, parts[-1]), "wb") as f:
                    f.write(tar.extractfile(member).read())
            count += 1
            if count == n:
                break
    if count == 0:
        raise augment.InputError(f"no training JPEGs in {tar_path}")
    return out


def decode_only(image):
    """No views, only the decoded image (a corner of it, so that images of any size collate)."""
    return {"decoded": v2.functional.pil_to_tensor(image)[None, :, :32, :32].contiguous()}


def count_views(batch):
    """The views a training step receives: ScaleMix sends both views of a pair under --gpu-aug."""
    return sum(len(v) // (2 if kind + "_box" in batch else 1) for kind, v in batch.items()
               if not kind.endswith(("_params", "_box")))


def time_device_half(batch, images, repeats=5):
    """--gpu-aug: images/s of augment.finish_views on one batch of `images`, on the GPU if there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = {k: v.to(device) for k, v in batch.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    augment.finish_views(batch)  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        augment.finish_views(batch)
    sync()
    return repeats * images / (time.perf_counter() - start)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_on_device(data, recipe, args, repeats=5):
    """--data-on-device: images/s of the views made on the device (GPU if any) from its uint8 copy of
    the images; None where the recipe needs the workers (RandAugment) or the images differ in size."""
    transform = augment.Views(args.image_size, **RECIPES[recipe])
    dataset = augment.dataset(data, "train", transform)
    n = min(args.images, len(dataset))
    try:
        on_device = augment.OnDevice(augment.SeededDataset(torch.utils.data.Subset(dataset.base, range(n)), transform),
                                     workers=max(args.workers))
    except augment.InputError:
        return None
    indices = list(range(n)) * (1 + args.batch_size * repeats // n)
    batches = on_device.batches(indices, args.batch_size, epoch=0, first_batch=0)
    next(batches)  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        next(batches)
    sync()
    return repeats * args.batch_size / (time.perf_counter() - start)


def measure(data, recipe, workers, args):
    """-> images/s and views/s over args.images images (the first batch, worker start-up, untimed),
    with --gpu-aug the device half's images/s (else None), and with 0 workers the images per second
    of this process's CPU time, on one thread as a worker runs (else None): a per-core rate that
    other processes on a shared machine do not change."""
    transform = (decode_only if RECIPES[recipe] is None
                 else augment.Views(args.image_size, device_aug=args.gpu_aug, **RECIPES[recipe]))
    dataset = augment.dataset(data, "train", transform)
    n = min(args.images, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=args.batch_size,
                                         num_workers=workers, collate_fn=augment.collate_views)
    images = views = 0
    start = None
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)  # as in a data worker
    for batch, labels in loader:
        if start is None:  # the first batch pays for starting the workers
            start, cpu_start = time.perf_counter(), time.process_time()
            continue
        images += len(labels)
        views += count_views(batch) if RECIPES[recipe] is not None else 0
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    torch.set_num_threads(threads)
    device_half = time_device_half(batch, len(labels)) if args.gpu_aug and RECIPES[recipe] is not None else None
    return images / elapsed, views / elapsed, device_half, images / cpu if workers == 0 else None


def print_header(args):
    source = (f"{args.cifar_tar} " + (f"upscaled to {args.upscale} px" if args.upscale else "as it is (32 px)")
              if args.cifar_tar else args.data)
    print(f"{source} | views of {args.image_size} px | {args.images} images, batch {args.batch_size} | "
          f"{os.cpu_count()} CPUs | torch {torch.__version__}", flush=True)
    device = ("cuda: " + torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu"
    extra = f" device half images/s ({device}) |" if args.gpu_aug else ""
    extra += f" on-device views images/s ({device}) |" if args.data_on_device else ""
    print(f"| recipe{' (--gpu-aug: workers half)' if args.gpu_aug else ''} | workers | images/s | views/s | "
          f"images/s per worker | images per CPU s |{extra}", flush=True)
    print("|---|---|---|---|---|---|" + "---|" * (args.gpu_aug + args.data_on_device), flush=True)


def print_row(args, r):
    number = lambda x: " - |" if x is None else f" {x:.0f} |"  # noqa: E731
    extra = number(r["device_half_images_per_s"]) if args.gpu_aug else ""
    extra += number(r["on_device_images_per_s"]) if args.data_on_device else ""
    print(f"| {r['recipe']} | {r['workers']} | {r['images_per_s']:.0f} | {r['views_per_s']:.0f} | "
          f"{r['images_per_s_per_worker']:.0f} |{number(r['images_per_cpu_s'])}{extra}", flush=True)


def run(args):
    """Every recipe x workers, each row printed as soon as it is measured -> the rows."""
    with tempfile.TemporaryDirectory() as tmp:
        data = upscaled_cifar(args.cifar_tar, args.images, args.upscale, tmp) if args.cifar_tar else args.data
        print_header(args)
        rows = []
        measure(data, args.recipes[0], 0, args)  # untimed: a process's first pass pays for caches and lazy set-up
        for recipe in args.recipes:
            on_device = time_on_device(data, recipe, args) if args.data_on_device and RECIPES[recipe] is not None else None
            for workers in args.workers:
                images_per_s, views_per_s, device_half, per_cpu_s = measure(data, recipe, workers, args)
                rows.append({"recipe": recipe, "workers": workers, "images_per_s": images_per_s,
                             "views_per_s": views_per_s, "images_per_s_per_worker": images_per_s / max(1, workers),
                             "images_per_cpu_s": per_cpu_s, "device_half_images_per_s": device_half,
                             "on_device_images_per_s": on_device})
                print_row(args, rows[-1])
    return rows


def main(argv=None):
    args = parse_args(argv)
    try:
        rows = run(args)
    except augment.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    return rows


if __name__ == "__main__":
    main()
