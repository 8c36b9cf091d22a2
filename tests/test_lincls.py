"""lincls.py: the backbone from each checkpoint layout (ours from a real run, the official ones built
here), one clear error naming the keys that do not fit and the architecture the file holds, a
refused pickle in one clean line, the no-weight-moved check, the presets, 1 process == 2 processes
(with a resume), cached features == a direct probe on center crops, the held-out split numbered by
train's classes, and --skip-bad-images counting each readable held-out image once."""
import os
import shutil

import pytest
import torch
import torch.nn as nn

import augment
import lincls
import mocov2_asym
import mocov3_asym
from conftest import FAST, read_log, run_in_processes, sigterm_in_step

PROBE = ["--image-size", "16", "--workers", "0", "--print-freq", "1", "--optimizer", "sgd", "--lr", "2.0"]


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """checkpoint.pth and backbone.pth of one real mocov2_asym.py step."""
    out = tmp_path_factory.mktemp("mocov2")
    mocov2_asym.main(FAST + ["--max-steps", "1", "--output-dir", str(out)])
    return out


def resnet18_state(cifar_stem=False):
    torch.manual_seed(0)
    return lincls.resnet_backbone("resnet18", cifar_stem)[0].state_dict()


def assert_same_weights(backbone, state):
    got = backbone.state_dict()
    assert sorted(got) == sorted(state)
    assert all(torch.equal(got[k], state[k]) for k in state)


def test_our_checkpoint_and_backbone_file(ours):
    source = torch.load(ours / "checkpoint.pth", weights_only=True)["source"]
    expected = {k[len("backbone."):]: v for k, v in source.items() if k.startswith("backbone.")}
    backbone, dim, arch, _ = lincls.load_backbone(str(ours / "checkpoint.pth"), None)  # arch from its args
    assert (arch, dim) == ("resnet18", 512) and not backbone.training
    assert all(not p.requires_grad for p in backbone.parameters())
    assert_same_weights(backbone, expected)
    backbone, _, _, _ = lincls.load_backbone(str(ours / "backbone.pth"), "resnet18")
    assert_same_weights(backbone, expected)
    with pytest.raises(augment.InputError, match="do not fit a resnet50 backbone: missing keys layer1.0.bn3"):  # a plain file needs --arch
        lincls.load_backbone(str(ours / "backbone.pth"), None)
    with pytest.raises(augment.InputError, match="--arch resnet34, but .* holds a resnet18"):
        lincls.load_backbone(str(ours / "checkpoint.pth"), "resnet34")


@pytest.mark.parametrize("prefix,others", [
    ("module.encoder_q.", ["module.encoder_k.conv1.weight", "queue"]),  # MoCo v1/v2, the asymmetry paper's code
    ("module.base_encoder.", ["module.momentum_encoder.conv1.weight", "module.predictor.0.weight"]),  # MoCo v3
    ("module.encoder.", ["module.predictor.0.weight"]),  # SimSiam
])
def test_official_layouts(prefix, others, tmp_path):
    state = resnet18_state()
    ckpt = {prefix + k: v for k, v in state.items()}
    ckpt.update({prefix + "fc.0.weight": torch.randn(4, 512), prefix + "fc.0.bias": torch.zeros(4),  # projector as fc
                 **{k: torch.randn(2) for k in others}})
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": ckpt, "optimizer": {"state": {}, "param_groups": []}},
               tmp_path / "official.pth.tar")
    backbone, _, _, _ = lincls.load_backbone(str(tmp_path / "official.pth.tar"), "resnet18")
    assert_same_weights(backbone, state)


def test_cifar_stem_and_vit_are_read_from_the_weights(tmp_path):
    state = resnet18_state(cifar_stem=True)
    torch.save(state, tmp_path / "backbone.pth")
    backbone, _, _, _ = lincls.load_backbone(str(tmp_path / "backbone.pth"), "resnet18")
    assert backbone.conv1.kernel_size == (3, 3) and isinstance(backbone.maxpool, nn.Identity)
    assert_same_weights(backbone, state)
    torch.manual_seed(0)
    vit, _ = mocov3_asym.vit_backbone("vit_small", 32, 8)
    source = {"backbone." + k: v for k, v in vit.state_dict().items()}
    torch.save({"step": 1, "args": {"arch": "vit_small", "image_size": 32, "patch_size": 8}, "source": source},
               tmp_path / "checkpoint.pth")
    backbone, dim, arch, _ = lincls.load_backbone(str(tmp_path / "checkpoint.pth"), None)
    assert (arch, dim, backbone.patch_size, backbone.image_size) == ("vit_small", 384, 8, 32)
    assert_same_weights(backbone, vit.state_dict())
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 384)
    timm = {"state_dict": {"module.base_encoder.patch_embed.proj.weight": torch.zeros(1),
                           "module.base_encoder.blocks.0.attn.qkv.weight": torch.zeros(1)}}
    torch.save(timm, tmp_path / "timm.pth")
    with pytest.raises(augment.InputError, match="timm-named ViT"):
        lincls.load_backbone(str(tmp_path / "timm.pth"), "vit_small")


def test_missing_and_unexpected_keys_are_named(tmp_path, capsys):
    state = resnet18_state()
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(3)
    torch.save({"state_dict": {"module.encoder_q." + k: v for k, v in state.items()}}, tmp_path / "bad.pth")
    with pytest.raises(augment.InputError) as error:
        lincls.load_backbone(str(tmp_path / "bad.pth"), "resnet18")
    assert "missing keys layer4.1.bn2.weight; unexpected keys extra.weight" in str(error.value)
    # from the command line: one error line, exit 2, before any work
    for pretrained, message in ((tmp_path / "bad.pth", "missing keys layer4.1.bn2.weight"),
                                (tmp_path / "none.pth", "no such file")):
        with pytest.raises(SystemExit) as exit_:
            lincls.main(PROBE + ["--pretrained", str(pretrained), "--arch", "resnet18", "--output-dir", str(tmp_path / "run")])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "run").exists()


def test_weights_that_do_not_fit_name_the_architecture_they_hold(tmp_path, capsys):
    """A ResNet-18 file probed as the default resnet50: its keys and shapes say resnet18. An official
    checkpoint's "arch" is used without --arch, and a contradicting --arch is refused."""
    state = resnet18_state()
    torch.save(state, tmp_path / "backbone.pth")
    with pytest.raises(augment.InputError, match="those of a resnet18: pass --arch resnet18$"):
        lincls.load_backbone(str(tmp_path / "backbone.pth"), None)
    with pytest.raises(augment.InputError, match="do not fit a resnet34 .* those of a resnet18: pass --arch resnet18$"):
        lincls.load_backbone(str(tmp_path / "backbone.pth"), "resnet34")
    wide = lincls.make_backbone("wide_resnet50_2", None)[0].state_dict()
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(augment.InputError, match="those of a wide_resnet50_2: pass --arch wide_resnet50_2$"):
        lincls.load_backbone(str(tmp_path / "wide.pth"), "resnet50")  # the same keys, twice the width
    torch.save({"arch": "resnet18", "state_dict": {"module.encoder_q." + k: v for k, v in state.items()}},
               tmp_path / "official.pth.tar")
    backbone, _, arch, _ = lincls.load_backbone(str(tmp_path / "official.pth.tar"), None)
    assert arch == "resnet18"
    assert_same_weights(backbone, state)
    with pytest.raises(SystemExit):
        lincls.main(PROBE + ["--pretrained", str(tmp_path / "official.pth.tar"), "--arch", "resnet50",
                             "--output-dir", str(tmp_path / "run")])
    assert capsys.readouterr().err == (f"error: --arch resnet50, but {tmp_path / 'official.pth.tar'} holds a resnet18: "
                                       f"pass --arch resnet18 or leave it out\n")


def test_refused_pickle_is_one_clean_line(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return os.system, ("true",)

    torch.save({"state_dict": resnet18_state(), "hook": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(SystemExit) as exit_:
        lincls.main(PROBE + ["--pretrained", str(tmp_path / "evil.pth"), "--arch", "resnet18", "--output-dir", str(tmp_path / "run")])
    lines = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and "\x1b" not in lines[0]
    assert lines[0].startswith(f"error: cannot load {tmp_path / 'evil.pth'}: it holds objects other than tensors and "
                               f"plain containers (the first: posix.system)") and "re-save" in lines[0]


def test_held_out_split_is_numbered_by_train_classes(folder, tmp_path):
    """test/ without class 0: the probe scores its images against their own classes 1..9."""
    data = shutil.copytree(folder, tmp_path / "data")
    shutil.rmtree(data / "test" / "0")
    train_set, val_set = lincls.make_datasets(lincls.parse_args(PROBE + ["--data", str(data), "--pretrained", "random"]))
    assert train_set.base.classes == val_set.base.classes == [str(c) for c in range(10)]
    assert val_set.base.targets == [int(os.path.basename(os.path.dirname(p))) for p, _ in val_set.base.samples]
    assert min(val_set.base.targets) == 1


def test_skip_bad_images_counts_each_readable_held_out_image_once(ours, folder, tmp_path):
    """An unreadable test image with --skip-bad-images: the accuracy of the data set without that
    file (not 16 images with a readable one twice), and the count skipped."""
    data = shutil.copytree(folder, tmp_path / "data")
    (data / "test" / "3" / "3.png").write_bytes(b"not a png")
    args = PROBE + ["--pretrained", str(ours / "backbone.pth"), "--arch", "resnet18", "--batch-size", "16",
                    "--epochs", "2", "--cached-features", "--skip-bad-images"]
    lincls.main(args + ["--data", str(data), "--output-dir", str(tmp_path / "skipping")])
    os.remove(data / "test" / "3" / "3.png")
    lincls.main(args + ["--data", str(data), "--output-dir", str(tmp_path / "clean")])
    skipping, clean = read_log(tmp_path / "skipping")[-1], read_log(tmp_path / "clean")[-1]
    assert skipping["final_top1"] == clean["final_top1"] and skipping["final_top5"] == clean["final_top5"]
    assert (skipping["val_images"], skipping["val_skipped"], clean["val_images"], clean["val_skipped"]) == (15, 1, 15, 0)


def test_sanity_check_catches_a_moved_weight(tmp_path):
    torch.save(resnet18_state(), tmp_path / "backbone.pth")
    backbone, _, _, reference = lincls.load_backbone(str(tmp_path / "backbone.pth"), "resnet18")
    with torch.no_grad():
        backbone(torch.randn(4, 3, 32, 32))  # eval mode: the BN statistics stay
    lincls.check_backbone_unchanged(backbone, reference)
    backbone.layer1[0].bn1.running_mean += 1e-3
    with pytest.raises(RuntimeError, match="layer1.0.bn1.running_mean"):
        lincls.check_backbone_unchanged(backbone, reference)


PRESETS_OPTIMIZER = {"small": "sgd", "paper": "lars"}


def test_presets_and_schedules():
    for preset, expected in (("paper", ("lars", 4096, 0.1, 90, "cosine")), ("moco", ("sgd", 256, 30.0, 100, "step")),
                             ("mocov3", ("sgd", 1024, 0.1, 90, "cosine")), ("small", ("sgd", 256, 1.0, 90, "cosine"))):
        args = lincls.parse_args(["--pretrained", "x", "--preset", preset])
        lincls.resolve_preset(args, "resnet50", 5000)
        assert (args.optimizer, args.batch_size, args.lr, args.epochs, args.schedule) == expected
    for n_train, preset in ((99_999, "small"), (100_000, "paper")):  # auto, the default: by data size
        args = lincls.parse_args(["--pretrained", "x"])
        lincls.resolve_preset(args, "resnet50", n_train)
        assert args.preset == preset and args.optimizer == PRESETS_OPTIMIZER[preset]
    args = lincls.parse_args(["--pretrained", "x", "--preset", "mocov3"])
    lincls.resolve_preset(args, "vit_base", 10**6)
    assert args.lr == 3.0
    args = lincls.parse_args(["--pretrained", "x", "--preset", "moco", "--lr", "120", "--schedule", "cosine"])
    lincls.resolve_preset(args, "resnet50", 10**6)
    assert (args.lr, args.schedule, args.batch_size) == (120.0, "cosine", 256)
    assert [lincls.learning_rate(s, 100, 30.0, "step") for s in (0, 59, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    assert [lincls.learning_rate(s, 100, 1.6, "cosine") for s in (0, 50, 100)] == pytest.approx([1.6, 0.8, 0.0])
    head = lincls.make_head(512, 10, head_bn=True)
    assert isinstance(head[0], nn.BatchNorm1d) and not head[0].affine and not list(head[0].parameters())
    assert head[1].bias.abs().sum() == 0 and head[1].weight.std().item() == pytest.approx(0.01, rel=0.1)


def losses(log):
    return {r["step"]: r["loss"] for r in log if "loss" in r}


def assert_same_head(a, b, atol=1e-6):
    a, b = (torch.load(out / "checkpoint.pth", weights_only=True)["head"] for out in (a, b))
    assert sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], atol=atol) for k in a)


def test_one_process_equals_two(ours, folder, tmp_path):
    """In one process and in two: 3 steps of batch 32 on synthetic (the same losses, head and
    accuracy); and on a folder, the cached features of two processes' shards, put back in order,
    train the same head as one process's direct probe on center crops."""
    synthetic = PROBE + ["--data", "synthetic", "--pretrained", str(ours / "checkpoint.pth"), "--batch-size", "32",
                         "--epochs", "1", "--max-steps", "3"]
    probe = PROBE + ["--data", folder, "--pretrained", str(ours / "backbone.pth"), "--arch", "resnet18",
                     "--batch-size", "16", "--epochs", "2"]
    lincls.main(synthetic + ["--output-dir", str(tmp_path / "one")])
    lincls.main(probe + ["--no-aug", "--output-dir", str(tmp_path / "direct")])
    run_in_processes("lincls.py", [synthetic + ["--output-dir", str(tmp_path / "two")],
                                   probe + ["--cached-features", "--output-dir", str(tmp_path / "cached")]])
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert sorted(losses(one)) == sorted(losses(two)) == [1, 2, 3]
    assert all(losses(one)[s] == pytest.approx(losses(two)[s], rel=1e-5) for s in range(1, 4))
    assert_same_head(tmp_path / "one", tmp_path / "two")
    assert one[-1]["final_top1"] == pytest.approx(two[-1]["final_top1"]) and one[-1]["backbone_unchanged"]
    assert 0 <= one[-1]["final_top1"] <= one[-1]["final_top5"] <= 100
    direct, cached = read_log(tmp_path / "direct"), read_log(tmp_path / "cached")
    assert "features" not in direct[0] and cached[0]["features"] == "cached"
    assert losses(direct) == pytest.approx(losses(cached), rel=1e-4) and len(losses(direct)) == 6
    assert_same_head(tmp_path / "direct", tmp_path / "cached", atol=1e-5)


def test_resume_equals_uninterrupted(ours, folder, tmp_path, capsys):
    """3 steps an epoch; stop at step 2 (mid-epoch) and 4, then finish: the losses, the head, the
    per-epoch accuracy and the best of an uninterrupted run. The run's first and last lines say
    what it does and did; the finished command again does nothing."""
    args = PROBE + ["--data", folder, "--pretrained", str(ours / "backbone.pth"), "--arch", "resnet18",
                    "--batch-size", "16", "--epochs", "2"]
    capsys.readouterr()
    lincls.main(args + ["--output-dir", str(tmp_path / "whole")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"linear probe starts: resnet18 of {ours / 'backbone.pth'}; {folder}, 48 training and 16 "
                        f"held-out images; --preset small: sgd, batch 16, base lr 2.0, 2 epochs cosine; 3 steps "
                        f"an epoch, 6 in all; 1 process(es); writes {tmp_path / 'whole'}")
    top1 = read_log(tmp_path / "whole")[-1]["final_top1"]
    assert lines[-1].startswith(f"finished at step 6: top-1 {top1:.1f}% (best ")
    lincls.main(args + ["--output-dir", str(tmp_path / "whole")])
    assert capsys.readouterr().out.startswith("already finished at step 6: ")
    for stop in ("2", "4", "0"):
        lincls.main(args + ["--max-steps", stop, "--output-dir", str(tmp_path / "parts")])
    whole, parts = read_log(tmp_path / "whole"), read_log(tmp_path / "parts")
    assert [r["step"] for r in parts if "resumed" in r] == [2, 4]
    assert losses(whole) == pytest.approx(losses(parts), rel=1e-6) and sorted(losses(whole)) == list(range(1, 7))
    epoch_top1 = lambda log: {r["epoch"]: r["top1"] for r in log if "top1" in r and r["epoch"] in (1.0, 2.0)}
    assert epoch_top1(whole) == epoch_top1(parts) and len(epoch_top1(whole)) == 2
    assert_same_head(tmp_path / "whole", tmp_path / "parts")
    assert whole[-1]["best_top1"] == parts[-1]["best_top1"] == max(epoch_top1(whole).values())


def test_a_stop_signal_saves_and_the_same_command_continues(ours, folder, tmp_path, monkeypatch, capsys):
    """SIGTERM during step 5 (of 6; 3 an epoch): the step ends, the checkpoint is saved, exit 3; the
    same command then ends as an uninterrupted run; a changed flag is refused."""
    args = PROBE + ["--data", folder, "--pretrained", str(ours / "backbone.pth"), "--arch", "resnet18",
                    "--batch-size", "16", "--epochs", "2"]
    lincls.main(args + ["--output-dir", str(tmp_path / "whole")])
    sigterm_in_step(monkeypatch, lincls, 5)
    with pytest.raises(SystemExit) as stopped:
        lincls.main(args + ["--output-dir", str(tmp_path / "parts")])
    monkeypatch.undo()
    assert stopped.value.code == 3 and "stopped at step 5 by SIGTERM: " in capsys.readouterr().err
    assert torch.load(tmp_path / "parts" / "checkpoint.pth", weights_only=True)["step"] == 5
    with pytest.raises(SystemExit):
        lincls.main(args + ["--lr", "1.0", "--output-dir", str(tmp_path / "parts")])
    assert "changes its run (--lr 2.0 -> 1.0)" in capsys.readouterr().err
    lincls.main(args + ["--output-dir", str(tmp_path / "parts")])
    assert_same_head(tmp_path / "whole", tmp_path / "parts")
    assert read_log(tmp_path / "whole")[-1]["final_top1"] == read_log(tmp_path / "parts")[-1]["final_top1"]


def test_a_stop_at_an_epoch_s_end_leaves_its_evaluation_to_the_resume(ours, folder, tmp_path, monkeypatch,
                                                                      capsys):
    """SIGTERM in the last step of epoch 1, then in the last step of the probe (3 steps an epoch):
    the checkpoint is saved at once, owing the epoch's evaluation; the same command makes it
    first. Each epoch's top-1 and the final line then equal an uninterrupted probe's."""
    args = PROBE + ["--data", folder, "--pretrained", str(ours / "backbone.pth"), "--arch", "resnet18",
                    "--batch-size", "16", "--epochs", "2"]
    lincls.main(args + ["--output-dir", str(tmp_path / "whole")])
    parts = tmp_path / "parts"
    for stop_in in (3, 6):
        sigterm_in_step(monkeypatch, lincls, stop_in)
        with pytest.raises(SystemExit) as stopped:
            lincls.main(args + ["--output-dir", str(parts)])
        monkeypatch.undo()
        ckpt = torch.load(parts / "checkpoint.pth", weights_only=True)
        assert stopped.value.code == 3 and ckpt["step"] == stop_in and not ckpt["evaluated"]
    lincls.main(args + ["--output-dir", str(parts)])
    assert capsys.readouterr().out.splitlines()[-1].startswith("finished at step 6: top-1 ")
    epoch_top1 = lambda out: [(r["epoch"], r["top1"]) for r in read_log(out) if "top1" in r]  # noqa: E731
    assert epoch_top1(parts) == epoch_top1(tmp_path / "whole") and len(epoch_top1(parts)) == 2
    assert read_log(tmp_path / "whole")[-1]["final_top1"] == read_log(parts)[-1]["final_top1"]
    lincls.main(args + ["--output-dir", str(parts)])
    assert capsys.readouterr().out.startswith("already finished at step 6: ")


def test_cached_features_equal_a_direct_probe_on_center_crops(ours, folder, tmp_path):
    args = PROBE + ["--data", folder, "--pretrained", str(ours / "backbone.pth"), "--arch", "resnet18",
                    "--batch-size", "16", "--epochs", "3", "--head-bn"]
    lincls.main(args + ["--no-aug", "--output-dir", str(tmp_path / "direct")])
    lincls.main(args + ["--cached-features", "--output-dir", str(tmp_path / "cached")])
    direct, cached = read_log(tmp_path / "direct"), read_log(tmp_path / "cached")
    assert cached[0]["features"] == "cached" and cached[0]["train"] == 48
    accuracies = lambda log: [(r["epoch"], r["top1"], r["top5"]) for r in log if "top1" in r]
    assert len(accuracies(direct)) == 3
    torch.testing.assert_close(accuracies(cached), accuracies(direct), rtol=1e-6, atol=0)
    assert_same_head(tmp_path / "direct", tmp_path / "cached", atol=1e-5)
