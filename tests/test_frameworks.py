"""What every *_asym.py script shares, tested on each: every design under 2 processes (all together,
every placement, AsymBN alone; the variance monitor where designs are combined), resume ==
uninterrupted, the saved backbone, one error line for bad input, LARS, the target's update (EMA or
clone) and that the target gets no gradient."""
import importlib
import math
import re

import pytest
import torch
import torch.nn as nn
import torchvision

import augment
from conftest import COMMON, read_log, run_in_processes, step_losses

# per script: flags that make it small (tiny projector, tiny queue) for these tests
SMALL = {
    "mocov2_asym.py": ["--queue-size", "64"],
    "byol_asym.py": ["--dim", "32", "--mlp-dim", "64"],
    "mocov3_asym.py": ["--dim", "32", "--mlp-dim", "64"],
    "simsiam_asym.py": ["--dim", "32", "--proj-dim", "64", "--pred-dim", "16"],
    "simclr_asym.py": ["--dim", "16", "--mlp-dim", "32"],
    "barlow_asym.py": ["--projector", "32-32-32"],
}
SCRIPTS = list(SMALL)
# MultiCrop, ScaleMix, AsymAug, AsymBN and MeanEnc run together in "all", and on their other sides in
# "placements" (each alone is tested against its definition in tests/test_augment.py and the
# framework's tests); --sym changes the loss's structure, so it also runs alone
DESIGNS = {
    "sym": ["--sym"],
    "placements": ["--multicrop-on", "both", "--multicrop", "2", "--multicrop-per-crop", "--scalemix-on", "target",
                   "--syncbn-on", "both", "--source-aug", "weaker", "--target-aug", "stronger", "--mean-enc-source", "2"],
    "all": ["--multicrop", "2", "--scalemix", "--asym-aug", "--asym-bn", "--mean-enc", "2", "--bn-splits", "2"],
}
# --sym under 2 processes is already checked against 1 process there (tests/test_distributed.py,
# test_simclr.py, test_barlow.py)
SYM_TWO_PROCESSES = {"mocov2_asym.py", "simclr_asym.py", "barlow_asym.py"}
# the variance monitor at the end of these runs (designs combined, MultiCrop's crops on both sides): small probe
MONITORED = {"placements", "all", "gpu-aug", "vit"}
MONITOR = ["--variance-every", "0", "--variance-images", "16", "--variance-views", "2"]
EXTRA_DESIGNS = {  # what a script adds to the common designs
    "mocov2_asym.py": {"gpu-aug": ["--gpu-aug", "--multicrop", "2", "--scalemix", "--mean-enc", "2"]},
    "byol_asym.py": {"global-bn": ["--global-bn"]},
    "mocov3_asym.py": {"global-bn": ["--global-bn"],
                       "vit": ["--arch", "vit_small", "--patch-size", "8", "--multicrop", "2", "--mean-enc", "2"]},
    "simsiam_asym.py": {"global-bn": ["--global-bn"]},
    "simclr_asym.py": {"global-bn": ["--global-bn"]},
    "barlow_asym.py": {"global-bn": ["--global-bn"]},
}


def module(script):
    return importlib.import_module(script[:-3])


def small(script):
    return COMMON + SMALL[script]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_design_runs_under_two_processes(script, tmp_path):
    designs = dict(DESIGNS, **EXTRA_DESIGNS.get(script, {}))
    if script in SYM_TWO_PROCESSES:
        del designs["sym"]
    run_in_processes(script, [small(script) + flags + (MONITOR if name in MONITORED else []) + ["--max-steps", "2",
                              "--output-dir", str(tmp_path / name)] for name, flags in designs.items()])
    for name in designs:
        records = [r for r in read_log(tmp_path / name) if "loss" in r]
        assert [r["step"] for r in records] == [1, 2], name
        for r in records:
            assert math.isfinite(r["loss"]) and 0 < r["std_source"] < 2 and 0 < r["std_target"] < 2, (name, r)
        monitor = [r for r in read_log(tmp_path / name) if "v_source" in r]
        assert [r["step"] for r in monitor] == ([2] if name in MONITORED else []), name
        for r in monitor:  # each side above 0 (identical views) and at most 1/d = v_uniform / (1 - 1/K) <= 2 v_uniform
            assert 0 < r["v_source"] <= 2 * r["v_uniform_source"] and 0 < r["v_target"] <= 2 * r["v_uniform_target"], (name, r)
            assert r["v_ratio"] == pytest.approx(r["v_target"] / r["v_source"]) and 0 < r["v_std_target"] < 2, (name, r)
        ckpt = torch.load(tmp_path / name / "checkpoint.pth", weights_only=True)
        assert ckpt["step"] == 2 and ckpt["args"]["batch_size"] == 16
    args = torch.load(tmp_path / "all" / "checkpoint.pth", weights_only=True)["args"]
    assert (args["multicrop_on"], args["scalemix_on"], args["syncbn_on"]) == ("source", "source", "target")
    assert (args["source_aug"], args["target_aug"], args["mean_enc"]) == ("stronger", "weaker", 2)


# mocov2_asym.py: tests/test_e2e.py (with data workers and --gpu-aug) and tests/test_clusters.py
@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "mocov2_asym.py"])
def test_resume_equals_uninterrupted_and_backbone_loads_into_torchvision(script, folder, tmp_path):
    """3 steps an epoch; stop mid-epoch (2), resume and cross an epoch's end (5): the same losses
    and weights as one run. In this process: main() needs no torchrun on one process."""
    common = small(script) + ["--data", folder, "--epochs", "2", "--mean-enc", "2", "--scalemix", "--bn-splits", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    module(script).main(common + ["--max-steps", "5", "--output-dir", str(whole)])
    for stop in ("2", "5"):
        module(script).main(common + ["--max-steps", stop, "--output-dir", str(parts)])
    assert [r["resumed"] for r in read_log(parts) if "resumed" in r] == [str(parts / "checkpoint.pth")]
    a, b = step_losses(whole), step_losses(parts)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert all(a[s] == b[s] for s in a), (a, b)
    ca = torch.load(whole / "checkpoint.pth", weights_only=True)
    cb = torch.load(parts / "checkpoint.pth", weights_only=True)
    for key in ("source", "target"):
        assert all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key])
    net = torchvision.models.resnet18()
    result = net.load_state_dict(torch.load(whole / "backbone.pth", weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    assert torch.equal(net.layer4[1].conv2.weight, ca["source"]["backbone.layer4.1.conv2.weight"])


@pytest.mark.parametrize("script", ["mocov2_asym.py"])  # the same lines in every script; a minute each on CPU
def test_compiled_forward_gives_the_eager_losses(script, tmp_path):
    """--compile traces source and target (torch's aot_eager backend here: the graph capture of our
    modules without inductor's code generation, which takes minutes on a CPU) to the same losses."""
    common = small(script) + ["--max-steps", "2"]
    module(script).main(common + ["--output-dir", str(tmp_path / "eager")])
    module(script).main(common + ["--compile", "aot_eager", "--output-dir", str(tmp_path / "compiled")])
    eager, compiled = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert sorted(eager) == [1, 2] and compiled == pytest.approx(eager, rel=1e-5)


def error_line(script, argv, capsys):
    """main(argv) in this process -> its single stderr line; exit status 2 and no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        module(script).main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """A checkpoint of mocov2_asym.py that no other script can resume from."""
    out = tmp_path_factory.mktemp("mocov2")
    module("mocov2_asym.py").main(small("mocov2_asym.py") + ["--max-steps", "1", "--output-dir", str(out)])
    return out / "checkpoint.pth"


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_is_one_error_line_before_work(script, other_checkpoint, tmp_path, capsys):
    out = ["--output-dir", str(tmp_path)]
    assert "no such directory" in error_line(script, small(script) + ["--data", "/nonexistent/images"] + out, capsys)
    assert "larger than the 5000 training images" in error_line(script, small(script) + ["--batch-size", "6000"] + out, capsys)
    assert "--bn-splits 16" in error_line(script, small(script) + ["--bn-splits", "16"] + out, capsys)
    assert "--image-size 0 is too small" in error_line(script, small(script) + ["--image-size", "0"] + out, capsys)
    assert "--lr, --wd and --save-every must not be negative" in error_line(script, small(script) + ["--lr", "-1"] + out,
                                                                            capsys)
    assert "--epochs, --print-freq must be 1 or more" in error_line(script, small(script) + ["--epochs", "0"] + out, capsys)
    if hasattr(module(script).parse_args([]), "temperature"):
        assert "--temperature 0.0 must be positive" in error_line(script, small(script) + ["--temperature", "0"] + out, capsys)
    if script != "mocov2_asym.py":
        assert "it holds a mocov2 run; continue it with mocov2_asym.py" in error_line(
            script, small(script) + ["--resume", str(other_checkpoint)] + out, capsys)
    if script != "mocov3_asym.py":  # the ViTs are MoCo v3's
        assert "ViTs: mocov3_asym.py" in error_line(script, small(script) + ["--arch", "vit_small"] + out,
                                                    capsys)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    assert f"cannot read {tmp_path / 'junk.pth'}: UnpicklingError" in error_line(
        script, small(script) + ["--resume", str(tmp_path / "junk.pth")] + out, capsys)
    assert not (tmp_path / "checkpoint.pth").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_has_a_text_for_every_flag_and_each_default_once(script, capsys):
    with pytest.raises(SystemExit):
        module(script).parse_args(["--help"])
    text = capsys.readouterr().out
    flags = re.findall(r"^  (--[a-z0-9-]+)", text, flags=re.M)
    assert len(flags) > 40 and "--epochs" in flags and "--seed" in flags
    flag_lines = [line for line in text.split("Examples:")[0].splitlines() if line.startswith("  ")]
    blocks = re.split(r"\n  (?=-)", "\n".join(flag_lines))[1:]  # one per flag
    assert all(len(block.split(maxsplit=1)) == 2 for block in blocks)  # a flag and its text
    assert not [block for block in blocks if block.count("(default") > 1]  # not "(default x) (default: x)"
    assert "Examples:" in text and "torchrun --nproc_per_node=8" in text  # the epilog


LARS_SCRIPTS = [s for s in SCRIPTS if hasattr(module(s), "LARS")]


@pytest.mark.parametrize("script", LARS_SCRIPTS)
def test_lars_step_by_hand(script):
    """2-D weight: momentum buffer of trust * (g + wd w), trust = eta ||w|| / ||g + wd w||;
    1-D bias: plain momentum SGD, no decay and no trust ratio."""
    w = torch.tensor([[3.0, 4.0]], requires_grad=True)  # ||w|| = 5
    b = torch.tensor([1.0, -1.0], requires_grad=True)
    optimizer = module(script).LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    w.grad, b.grad = torch.tensor([[0.7, -2.4]]), torch.tensor([0.2, 0.4])
    optimizer.step()
    update = [0.7 + 0.1 * 3.0, -2.4 + 0.1 * 4.0]  # [1.0, -2.0], norm sqrt(5)
    trust = 0.01 * 5.0 / math.sqrt(5.0)
    assert w.detach().tolist()[0] == pytest.approx([3.0 - 0.5 * trust * update[0], 4.0 - 0.5 * trust * update[1]], rel=1e-6)
    assert b.detach().tolist() == pytest.approx([1.0 - 0.5 * 0.2, -1.0 - 0.5 * 0.4], rel=1e-6)
    w_before, b_before = w.detach().clone(), b.detach().clone()
    optimizer.step()  # same gradient again: the buffer is now 0.9 * old + new
    assert b.detach().tolist() == pytest.approx((b_before - 0.5 * 1.9 * torch.tensor([0.2, 0.4])).tolist(), rel=1e-6)
    update2 = torch.tensor([[0.7, -2.4]]) + 0.1 * w_before
    trust2 = 0.01 * w_before.norm() / update2.norm()
    expected = w_before - 0.5 * (0.9 * trust * torch.tensor([update]) + trust2 * update2)
    assert torch.allclose(w.detach(), expected, atol=1e-6)
    zero = torch.zeros(2, 2, requires_grad=True)  # ||w|| = 0: trust ratio 1, a plain momentum step
    optimizer = module(script).LARS([zero], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    zero.grad = torch.ones(2, 2)
    optimizer.step()
    assert torch.equal(zero.detach(), torch.full((2, 2), -0.5))


def small_batch(script, args):
    views = module(script).make_views(args)
    data = augment.dataset("synthetic", "train", views, seed=0)
    batch, _ = augment.collate_views([data[i] for i in range(8)])
    return batch


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "mocov2_asym.py"])
def test_target_gets_no_gradient_and_its_update_is_exact(script):
    mod = module(script)
    args = mod.parse_args(small(script) + ["--multicrop", "2", "--mean-enc", "2", "--amp", "off"])
    source, target = mod.build_encoders(args, torch.device("cpu"))
    loss, _, _ = mod.train_step(source, target, small_batch(script, args), args)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in target.parameters())
    assert all(p.grad is not None for p in source.backbone.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    # EMA frameworks at step 100 of 400; the others keep a clone: m = 0
    m = mod.target_momentum(100, 400, args.ema) if hasattr(mod, "target_momentum") else 0.0
    before = {n: p.clone() for n, p in target.named_parameters()}
    mod.momentum_update(target, source, m)
    for n, p in target.named_parameters():
        assert torch.allclose(p, m * before[n] + (1 - m) * source.get_parameter(n), atol=1e-6), n


@pytest.mark.parametrize("script", [s for s in SCRIPTS if hasattr(module(s), "target_momentum")])
def test_target_momentum_rises_from_base_to_one_by_a_cosine(script):
    tm = module(script).target_momentum
    assert tm(0, 100, 0.99) == pytest.approx(0.99)
    assert tm(50, 100, 0.99) == pytest.approx(0.995)
    assert tm(100, 100, 0.99) == pytest.approx(1.0)
    assert tm(25, 100, 0.99) == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 4)) / 2)


@pytest.mark.parametrize("script", SCRIPTS)
def test_fast_paths_give_the_plain_loss(script):
    """channels-last: the same loss up to float rounding; bf16 autocast (--amp bf16, also on CPU):
    within its tolerance; --gpu-aug (colour on the device, here the CPU): the same views up to the
    CPU path's uint8 rounding. One step from the same weights and views."""
    mod = module(script)

    def first_loss(*flags):
        args = mod.parse_args(small(script) + ["--multicrop", "2", "--mean-enc", "2"] + list(flags))
        source, target = mod.build_encoders(args, torch.device("cpu"))
        batch = augment.finish_views(small_batch(script, args))
        if args.channels_last:
            batch = {k: v.to(memory_format=torch.channels_last) for k, v in batch.items()}
        queue = [mod.Queue(args.queue_size, args.dim)] if hasattr(mod, "Queue") else []
        with augment.autocast(torch.device("cpu"), args.amp):
            return mod.train_step(source, target, *queue, batch, args)[0].item()

    plain = first_loss("--amp", "off")
    assert first_loss("--amp", "off", "--channels-last") == pytest.approx(plain, rel=1e-5)
    assert first_loss("--amp", "bf16") == pytest.approx(plain, rel=3e-2)
    # about one grey level apart per pixel: SimSiam's loss starts near 0 (absolute), Barlow's sums many terms
    assert first_loss("--amp", "off", "--gpu-aug") == pytest.approx(plain, rel=3e-2, abs=2e-2)
