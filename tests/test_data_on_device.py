"""--data-on-device: the images kept on the device as uint8 and every view made there. The crop
boxes are torchvision's draws in distribution (and its fallback exactly), the resize is
torchvision's resized_crop image by image, the colour parameters are the recipes' draws in
distribution, the finished views are the CPU path's in distribution; the scripts train on them
and a resumed run sees the same views."""
import collections
import math
import os

import pytest
import torch
import torchvision.transforms as T
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import augment
from conftest import ROOT, read_log, run_in_processes, step_losses
from test_frameworks import SCRIPTS, error_line, module, small


def total_variation(a, b):
    """Total variation distance between the empirical distributions of two lists of values."""
    ca, cb = collections.Counter(a), collections.Counter(b)
    return 0.5 * sum(abs(ca[k] / len(a) - cb[k] / len(b)) for k in set(ca) | set(cb))


@pytest.mark.parametrize("height, width, scale", [(32, 32, (0.2, 1.0)), (32, 32, (0.05, 0.14)), (20, 30, (0.08, 1.0))])
def test_crop_boxes_are_drawn_as_torchvision_draws_them(height, width, scale):
    """Box sides and positions of 20000 draws against torchvision's RandomResizedCrop.get_params:
    two samples of torchvision itself differ by about 0.02 in the sides' marginals."""
    n = 20000
    ours = augment.random_crop_boxes(n, height, width, scale, torch.Generator().manual_seed(0)).tolist()
    torch.manual_seed(1)
    image = torch.zeros(1, height, width)
    theirs = [T.RandomResizedCrop.get_params(image, list(scale), [3 / 4, 4 / 3]) for _ in range(n)]
    for i in (2, 3):  # box height, box width
        assert total_variation([b[i] for b in ours], [b[i] for b in theirs]) < 0.04
    for i in (0, 1):  # top, left
        mean_ours, mean_theirs = (sum(b[i] for b in boxes) / n for boxes in (ours, theirs))
        assert abs(mean_ours - mean_theirs) < 0.15
    assert all(0 <= t and 0 <= l and t + h <= height and l + w <= width and h > 0 and w > 0 for t, l, h, w in ours)


@pytest.mark.parametrize("height, width", [(10, 40), (40, 10), (16, 16)])
def test_crop_box_fallback_is_torchvision_s(height, width):
    """No try fits (area 90-100% at a ratio the image cannot hold, or scale over 1): the centred
    box of torchvision's fallback, exactly."""
    scale = (1.5, 2.0) if height == width else (0.9, 1.0)
    ours = augment.random_crop_boxes(50, height, width, scale, torch.Generator().manual_seed(0)).tolist()
    theirs = T.RandomResizedCrop.get_params(torch.zeros(1, height, width), list(scale), [3 / 4, 4 / 3])
    assert all(tuple(box) == tuple(theirs) for box in ours)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("height, width, size", [(32, 32, 32), (64, 64, 32), (32, 48, 16), (40, 30, 56)])
def test_resized_crops_are_torchvision_resized_crop(height, width, size, interpolation):
    """Enlarging and shrinking (antialiased), bilinear (the crops of most frameworks) or bicubic (BYOL's,
    Barlow Twins'), mirrored or not: torchvision's resized_crop and horizontal_flip of each image, to
    float rounding (bicubic's overshoot clipped to [0, 1], as the CPU path's uint8 result)."""
    g = torch.Generator().manual_seed(size)
    images = torch.randint(0, 256, (24, 3, height, width), dtype=torch.uint8, generator=g)
    boxes = augment.random_crop_boxes(24, height, width, (0.05, 1.0), g)
    flip = torch.rand(24, generator=g) < 0.5
    got = augment.resized_crops(images, boxes, size, flip, interpolation)
    mode = TF.InterpolationMode(interpolation)
    for image, (top, left, h, w), mirrored, result in zip(images, boxes.tolist(), flip, got):
        expected = TF.resized_crop(image.float() / 255, top, left, h, w, [size, size], mode, antialias=True).clamp(0, 1)
        torch.testing.assert_close(result, TF.horizontal_flip(expected) if mirrored else expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("recipe, size", [("mocov2", 32), ("byol1", 64), ("byol2", 64), ("simclr", 64)])
def test_colour_parameters_are_the_recipes_draws(recipe, size):
    """Against --gpu-aug's worker half (DeviceAugView), which draws with torchvision's own
    ColorJitter, RandomApply and RandomGrayscale: the share of views each operation touches, the
    factors' means and ranges, and every jitter order about equally often."""
    n = 4000
    ours = augment.random_colour_params(recipe, n, size, torch.Generator().manual_seed(0))
    worker = augment.DeviceAugView(recipe, size)
    torch.manual_seed(0)
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    theirs = torch.stack([worker(image)[1] for _ in range(n)])
    column = dict(zip(augment.PARAMS, range(len(augment.PARAMS))))
    for name in ("jitter", "gray", "solarize"):
        assert ours[:, column[name]].mean().item() == pytest.approx(theirs[:, column[name]].mean().item(), abs=0.03), name
    blurred = [(p[:, column["sigma"]] > 0).float().mean().item() for p in (ours, theirs)]
    assert blurred[0] == pytest.approx(blurred[1], abs=0.03)
    jittered = [p[p[:, column["jitter"]] > 0] for p in (ours, theirs)]
    for name in ("brightness", "contrast", "saturation", "hue"):
        a, b = (p[:, column[name]] for p in jittered)
        assert a.mean().item() == pytest.approx(b.mean().item(), abs=0.02), name
        assert a.min().item() == pytest.approx(b.min().item(), abs=0.02) and a.max().item() == pytest.approx(b.max().item(), abs=0.02)
    orders = collections.Counter(tuple(row) for row in jittered[0][:, column["order0"]:column["order3"] + 1].long().tolist())
    assert len(orders) == 24 and max(orders.values()) < 2 * min(orders.values())
    sigma = ours[:, column["sigma"]]
    assert ((sigma == 0) | ((sigma >= 0.1) & (sigma <= 2.0))).all()


def describe_cpu_view(transform):
    """A view_transform pipeline -> (size, crop scale, ColorJitter ranges or None, blur p, solarize p)."""
    ops = {type(op).__name__: op for op in transform.transforms}
    applied = {type(op.transforms[0]).__name__: op for op in transform.transforms if isinstance(op, v2.RandomApply)}
    jitter = applied["ColorJitter"].transforms[0] if "ColorJitter" in applied else None
    crop = ops["RandomResizedCrop"]
    return (crop.size[0], tuple(crop.scale), jitter and (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue),
            applied["GaussianBlur"].p if "GaussianBlur" in applied else 0.0,
            ops["RandomSolarize"].p if "RandomSolarize" in ops else 0.0)


def describe_device_view(recipe, size, scale):
    """The same description of what DeviceViews makes for a kind, from the recipe table."""
    if recipe == "weaker":
        return size, tuple(scale), None, 0.0, 0.0
    _, strengths, blur_p, solarize_p = augment.RECIPES[recipe]
    ranges = [(max(0.0, 1 - s), 1 + s) for s in strengths[:3]] + [(-strengths[3], strengths[3])]
    return size, tuple(scale), tuple(ranges), blur_p if augment.blur_kernel(size) else 0.0, solarize_p


@pytest.mark.parametrize("settings", [dict(), dict(framework="byol", multicrop=2, multicrop_on="both", scalemix_on="source"),
                                      dict(framework="simclr", n_target=2), dict(target_aug="weaker", multicrop=6),
                                      dict(framework="mocov3", crop_min=0.2, source_aug="weaker", scalemix_on="both")])
@pytest.mark.parametrize("size", [32, 64])
def test_device_views_make_the_views_kinds_recipes_and_counts(settings, size):
    """For every kind of view: the crop size and scale, jitter ranges, blur and solarize that Views
    builds its pipeline from, and as many views."""
    cpu, device = augment.Views(size, **settings), augment.DeviceViews(augment.Views(size, **settings))
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    counts = {kind: len(views) for kind, views in cpu(image).items()}
    assert device.counts == counts
    for kind in counts:
        assert describe_device_view(*device.recipes[kind]) == describe_cpu_view(cpu.transforms[kind]), kind
    assert device.interpolation == cpu.interpolation == ("bicubic" if settings.get("framework") == "byol" else "bilinear")
    assert device.mixed == {k for k in ("source", "target") if settings.get("scalemix_on") in (k, "both")}


def test_scalemix_boxes_are_drawn_as_on_the_cpu():
    """Box corners of 20000 draws against random_scalemix_box's (torch's RNG, one image at a time)."""
    ours = augment.random_scalemix_boxes(20000, 32, 24, torch.Generator().manual_seed(0)).tolist()
    torch.manual_seed(0)
    theirs = [augment.random_scalemix_box(32, 24) for _ in range(20000)]
    for i in range(4):
        assert total_variation([b[i] for b in ours], [b[i] for b in theirs]) < 0.04, i


def view_statistics(views):
    """Nx3xSxS views (ImageNet-normalised) -> NxK statistics of each view in [0, 1] units: channel
    means, pixel std, mean horizontal gradient (how zoomed in), colourfulness, and whether it is gray."""
    std = torch.tensor(augment.IMAGENET_STD).view(1, 3, 1, 1)
    mean = torch.tensor(augment.IMAGENET_MEAN).view(1, 3, 1, 1)
    x = views * std + mean
    colour = (x[:, 0] - x[:, 1]).abs().mean((1, 2)) + (x[:, 1] - x[:, 2]).abs().mean((1, 2))
    return torch.stack([*x.mean((2, 3)).unbind(1), x.std((1, 2, 3)), (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)),
                        colour, (colour < 2e-3).float()], 1)


def largest_z(a, b):
    """Largest two-sample z-score of the means of each statistic (columns of a and b)."""
    se = (a.var(0) / len(a) + b.var(0) / len(b)).sqrt().clamp(min=1e-6)
    return ((a.mean(0) - b.mean(0)).abs() / se).max().item()


def tinted_shapes(n):
    """n synthetic shapes of 64 px, each tinted by its own colour (the colour operations need colour)."""
    base = augment.SyntheticShapes("train")
    tint = 0.3 + 0.7 * torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    return (torch.stack([TF.pil_to_tensor(base[i][0]) for i in range(n)]) * tint).round().to(torch.uint8)


@pytest.mark.parametrize("size, settings", [(32, dict(multicrop=2)), (64, dict(framework="byol", scalemix_on="source"))])
def test_device_views_are_the_cpu_views_in_distribution(size, settings):
    """The same tinted images, each viewed 3 times by the CPU path (Views) and by DeviceViews: the
    same kinds and shapes, and per-view statistics (colour, contrast, zoom, the share of gray
    views) whose means agree (z < 4; about 1 is typical). WeakerAug on the target, which never
    turns a view gray, is told apart (z > 4): the statistics see a recipe's difference."""
    n = 48
    images = tinted_shapes(n)
    cpu_set = augment.SeededDataset([(TF.to_pil_image(image), 0) for image in images], augment.Views(size, **settings), seed=1)
    cpu = []
    for epoch in range(3):
        cpu_set.epoch = epoch
        cpu.append(augment.collate_views([cpu_set[i] for i in range(n)])[0])
    g, index = torch.Generator().manual_seed(0), torch.arange(n)
    ours = [augment.DeviceViews(augment.Views(size, **settings))(images, index, g) for _ in range(3)]
    assert {k: v.shape for k, v in ours[0].items()} == {k: v.shape for k, v in cpu[0].items()}
    statistics = {k: [view_statistics(torch.cat([b[k] for b in batches])) for batches in (cpu, ours)] for k in cpu[0]}
    for kind, (a, b) in statistics.items():
        assert largest_z(a, b) < 4, kind
    weaker_target = dict(settings, target_aug="weaker", scalemix_on=None)  # (the source's ScaleMix does not matter here)
    weaker = [augment.DeviceViews(augment.Views(size, **weaker_target))(images, index, g) for _ in range(3)]
    assert largest_z(statistics["target"][0], view_statistics(torch.cat([b["target"] for b in weaker]))) > 4


def test_on_device_holds_the_decoded_images_and_batches_follow_the_indices(folder):
    train_set = augment.dataset(folder, "train", augment.Views(32, n_target=2), seed=3)
    on_device = augment.OnDevice(train_set, workers=0)
    assert on_device.images.dtype == torch.uint8 and on_device.images.shape == (48, 3, 64, 64) and len(on_device) == 48
    for i in (0, 17, 47):
        image, label = train_set.base[i]
        assert torch.equal(on_device.images[i], TF.pil_to_tensor(image)) and on_device.labels[i].item() == label
    indices = list(range(47, -1, -3))  # 16 indices: one full batch of 8 and one of 8
    first = list(on_device.batches(indices, 8, epoch=2, first_batch=0))
    assert len(first) == 2 and [len(labels) for _, labels in first] == [8, 8]
    assert first[1][1].tolist() == [on_device.labels[i].item() for i in indices[8:]]
    views, _ = first[0]
    assert views.keys() == {"source", "target"} and views["target"].shape == (16, 3, 32, 32)
    # a resumed epoch (from batch 1) draws batch 1's views again; another epoch draws others
    resumed = list(on_device.batches(indices[8:], 8, epoch=2, first_batch=1))
    assert torch.equal(resumed[0][0]["source"], first[1][0]["source"])
    other = list(on_device.batches(indices, 8, epoch=3, first_batch=0))
    assert not torch.equal(other[0][0]["source"], views["source"])


def test_bad_input_is_one_error_line(folder, tmp_path, capsys):
    script = "mocov2_asym.py"
    out = ["--output-dir", str(tmp_path / "run")]
    line = error_line(script, small(script) + ["--data-on-device", "--asym-aug"] + out, capsys)
    assert "RandAugment" in line
    for split in ("train", "test"):
        (tmp_path / "odd" / split / "a").mkdir(parents=True)
    for i, side in enumerate((32, 32, 40)):
        augment.SyntheticShapes("train")[i][0].resize((side, side)).save(tmp_path / "odd" / "train" / "a" / f"{i}.png")
    augment.SyntheticShapes("test")[0][0].save(tmp_path / "odd" / "test" / "a" / "0.png")
    line = error_line(script, small(script) + ["--data", str(tmp_path / "odd"), "--data-on-device", "--batch-size", "2",
                                               "--queue-size", "4"] + out, capsys)
    assert "needs images of one size: found 3x40x40 after 3x32x32" in line
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_resume_equals_uninterrupted(folder, tmp_path):
    """3 steps an epoch; stop mid-epoch (2), resume and cross the epoch's end (4): the same losses
    and weights as one run, with every view made on the device."""
    script = "mocov2_asym.py"
    common = small(script) + ["--data", folder, "--data-on-device"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    module(script).main(common + ["--max-steps", "4", "--output-dir", str(whole)])
    for stop in ("2", "4"):
        module(script).main(common + ["--max-steps", stop, "--output-dir", str(parts)])
    a, b = step_losses(whole), step_losses(parts)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and all(a[s] == b[s] for s in a), (a, b)
    ca = torch.load(whole / "checkpoint.pth", weights_only=True)
    cb = torch.load(parts / "checkpoint.pth", weights_only=True)
    assert all(torch.equal(ca["source"][k], cb["source"][k]) for k in ca["source"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_trains_on_device_views(script, folder, tmp_path):
    """The flag's lines are the same in the six scripts, and each trains on the device's views."""
    module(script).main(small(script) + ["--data", folder, "--data-on-device", "--max-steps", "2", "--output-dir", str(tmp_path)])
    records = [r for r in read_log(tmp_path) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    lines = [line for line in open(os.path.join(ROOT, script)) if "data_on_device" in line or "data-on-device" in line]
    assert lines == [line for line in open(os.path.join(ROOT, SCRIPTS[0])) if "data_on_device" in line or "data-on-device" in line]
    assert len(lines) == 3


def test_two_processes_each_make_views_of_their_shard(folder, tmp_path):
    """Each process keeps its own copy of the images and makes its shard's views (seeded by its rank)."""
    run_in_processes("mocov2_asym.py", [small("mocov2_asym.py") + ["--data", folder, "--data-on-device", "--max-steps", "2",
                                                                   "--output-dir", str(tmp_path)]])
    records = [r for r in read_log(tmp_path) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
