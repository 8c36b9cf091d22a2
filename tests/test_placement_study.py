"""benchmarks/placement_study.py's bookkeeping on a tiny budget (2-step runs): the rows and their
flags, the statistics by hand (the Spearman correlation too), the tables (means, spreads, the
midpoint and the gain over the random start, the paper's figures, the ordering's verdict, the
correlation in words), the picture and the resume of an interrupted study. Not its accuracy:
that is what it measures."""
import itertools
import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import placement_study as study  # noqa: E402  (after the path)


def test_rows_flags_and_the_paper_s_figures():
    args = study.parse_args(["--sides", "source", "target", "both"])
    table = {name: (flags, paper) for name, _, _, flags, paper in study.rows(args)}
    assert list(table)[0] == "baseline" and table["baseline"] == ([], 65.8)
    assert table["MultiCrop target"] == (["--multicrop-on", "target"], 57.1)
    assert table["WeakerAug both"] == (["--source-aug", "weaker", "--target-aug", "weaker"], 46.8)
    assert table["StrongerAug source"] == (["--source-aug", "stronger"], 66.7)
    assert table["SyncBN target"] == (["--syncbn-on", "target"], 66.5)
    assert table["MeanEnc (1,3)"] == (["--mean-enc-source", "1", "--mean-enc", "3"], 67.9)
    assert len(table) == 1 + 5 * 3 + 4
    quick = [name for name, *_ in study.rows(study.parse_args(["--quick"]))]
    assert quick == ["baseline", "ScaleMix source", "ScaleMix target", "WeakerAug source", "WeakerAug target"]
    assert study.cpu_example("mocov2_asym.py")[:4] == ["--data", "synthetic", "--arch", "resnet18"]
    assert "--queue-size" in study.cpu_example("mocov2_asym.py")
    assert "--projector" in study.cpu_example("barlow_asym.py")


def test_statistics_by_hand():
    assert study.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0) and study.mean_sd([4.0]) == (4.0, None)
    # a = 10, 11, 12 (sd 1), b = 4, 5, 6 (sd 1): the difference 6, its standard error sqrt(2/3)
    diff, se, word = study.verdict([10, 11, 12], [4, 5, 6], paper_sign=+14.5)
    assert diff == 6 and se == pytest.approx((2 / 3) ** 0.5) and word == "holds"
    assert study.verdict([10, 11, 12], [4, 5, 6], paper_sign=-1)[2] == "contradicts"
    assert study.verdict([5, 7, 9], [4, 6, 8], paper_sign=1)[2] == "agrees within noise"  # 1 < 2 x 1.63
    assert study.verdict([5, 7, 9], [4, 6, 8], paper_sign=-1)[2] == "opposite within noise"
    assert study.verdict([5], [4], paper_sign=1) == (1, None, "agrees (1 seed)")


def test_spearman_by_hand_with_ties():
    x, y = [1, 2, 2, 3, 5], [2, 1, 4, 4, 4]
    assert list(study.ranks(x)) == [1, 2.5, 2.5, 4, 5]  # the two 2s share ranks 2 and 3
    assert list(study.ranks(y)) == [2, 1, 4, 4, 4]  # the three 4s share ranks 3, 4 and 5
    # ranks less their mean 3: x -2 -0.5 -0.5 1 2, y -1 -2 1 1 1; products 2 + 1 - 0.5 + 1 + 2
    # = 5.5, squares 9.5 and 8: rho = 5.5 / sqrt(76) = 0.6309
    assert study.spearman(x, y) == pytest.approx(5.5 / 76 ** 0.5) == pytest.approx(0.6309, abs=1e-4)
    assert study.spearman(y, x) == study.spearman(x, y) and study.spearman(x, x) == 1


def claim_runs(top1):
    """Runs with v_target / v_source 1/8, 1/4, ... 16 (rising) and the given top-1s; the random
    start 10 each."""
    return [{"row": "r", "seed": i, "top1": t, "knn": {"0": 10.0}, "v_source": 1e-3,
             "v_target": 1e-3 * 2.0 ** (i - 3)} for i, t in enumerate(top1)]


def test_the_correlation_s_sign_and_its_p_value():
    """Runs whose target varies less than their source learning better: rho -1, the paper's claim,
    beyond chance; the reverse: +1, against it; an unordered set: not beyond chance."""
    runs, rho, interval, p = study.correlation(claim_runs([70 - i for i in range(8)]), "top1")
    assert (runs, rho, interval) == (8, -1, (-1, -1)) and p < 0.05  # 2 of 8! shuffles: 1e-4
    line = study.format_correlation("top1", runs, rho, interval, p)
    assert line == ("Spearman rho(log v_target/v_source, kNN top-1) = -1.00 over 8 runs (95% "
                    f"bootstrap interval -1.00 to -1.00; permutation p = {p:.3g}, two-sided): "
                    "negative, as the paper's claim predicts, beyond chance at 5%")
    rising = study.correlation(claim_runs([60 + i for i in range(8)]), "gain")
    assert rising[1] == 1 and rising[3] < 0.05
    assert study.format_correlation("gain", *rising).endswith(
        "positive, against the paper's claim, beyond chance at 5%")
    assert ", kNN gain over random start) = 1.00 over 8" in study.format_correlation("gain", *rising)
    unordered = study.correlation(claim_runs([63, 66, 60, 65, 67, 61, 62, 64]), "top1")
    assert abs(unordered[1]) < 0.1 and unordered[3] > 0.5
    assert study.format_correlation("top1", *unordered).endswith(", not beyond chance at 5%")
    # the p-value repeats (seeded) and matches the exact one of all 6! shuffles (ties in x)
    x, y = [2, 1, 2, 1, 2, 1], [60, 61, 66, 67, 56, 57]
    rho = study.spearman(x, y)
    exact = sum(abs(study.spearman(x, [y[i] for i in order])) >= abs(rho) - 1e-12
                for order in itertools.permutations(range(6))) / 720
    assert study.permutation_p(x, y) == study.permutation_p(x, y) == pytest.approx(exact, abs=0.03)


def test_the_correlation_undefined():
    """Under 3 runs, or a variable the same in every run: undefined, in words, no crash."""
    assert study.spearman([1, 2], [2, 1]) is None and study.spearman([1, 2, 3], [5, 5, 5]) is None
    assert study.correlation(claim_runs([60, 61]), "top1") == (2, None, None, None)
    assert study.format_correlation("top1", 2, None, None, None) == \
        "Spearman rho(log v_target/v_source, kNN top-1) undefined over 2 runs: it needs 3 or more"
    same = study.correlation(claim_runs([60, 60, 60, 60]), "top1")
    assert same == (4, None, None, None)
    assert study.format_correlation("top1", *same).endswith(
        "undefined over 4 runs: one of the two is the same in every run")
    flat = [{**run, "v_target": 1e-3} for run in claim_runs([60, 61, 62, 63])]
    assert study.correlation(flat, "top1")[1] is None
    assert study.correlation([], "gain") == (0, None, None, None)
    no_start = claim_runs([60, 61, 62, 63])
    del no_start[0]["knn"]  # an older record: counted for the top-1, not for the gain
    assert study.correlation(no_start, "top1")[0] == 4 and study.correlation(no_start, "gain")[0] == 3


def test_the_side_a_design_acts_on():
    assert study.acts_on("target", "target") and study.acts_on("target", "both")
    assert not study.acts_on("source", "target") and not study.acts_on("target", None)  # the baseline
    assert study.acts_on("target", (1, 3)) and study.acts_on("source", (3, 1))  # MeanEnc: more views
    assert not study.acts_on("target", (2, 2)) and not study.acts_on("source", (2, 2))


def test_the_placements_means():
    """A row's point: the mean top-1 and the geometric mean of its ratios (2 and 8 -> 4); a row
    without runs is left out. Rows A, B, C: ratios 4, 1, 16, top-1 51, 60, 40: rho -1."""
    run = lambda row, v_t, top1: {"row": row, "top1": top1, "v_source": 1e-3, "v_target": v_t * 1e-3}  # noqa: E731
    runs = [run("A", 2, 50.0), run("A", 8, 52.0), run("B", 1, 60.0), run("C", 16, 40.0)]
    points = study.placement_means(runs, ["A", "B", "C", "D"])
    assert [(p["row"], p["top1"]) for p in points] == [("A", 51.0), ("B", 60.0), ("C", 40.0)]
    assert [p["v_target"] / p["v_source"] for p in points] == pytest.approx([4.0, 1.0, 16.0])
    assert study.correlation(points, "top1")[:2] == (3, pytest.approx(-1.0))


def test_a_row_without_the_midpoint_or_the_start():
    row = study.format_row("x", None, [{"top1": 50.0, "v_source": 1e-3, "v_target": 2e-3}], 40.0, "3")
    assert row == "| x | 50.0 | - | - | +10.0 | - |  | 10.00 | 20.00 |"


def fake_train(calls):
    """study.train's stand-in: a run's figures from its row and seed (ScaleMix source 10 above its
    target, spread 1 over the seeds; 3 lower at the midpoint, epoch 3 of 6; the random start
    10 + 2 x seed), counted."""
    def train(args, name, flags, seed):
        calls.append((name, seed))
        top1 = {"baseline": 60.0, "ScaleMix source": 66.0, "ScaleMix target": 56.0}[name] + seed
        return {"row": name, "seed": seed, "flags": flags, "seconds": 1.0,
                "knn": {"0": 10.0 + 2 * seed, "3": top1 - 3, "6": top1},
                "top1": top1, "v_source": 1e-3 * (1 + seed), "v_target": 2e-3}
    return train


def test_the_study_s_tables_and_its_resume(tmp_path, monkeypatch, capsys):
    """The baseline and ScaleMix on source and target, 2 seeds (the runs stood in for): rows with
    means and spreads, the paper's figures, the ordering's verdict; an interrupted study (two
    results lost) runs just those two again."""
    calls = []
    monkeypatch.setattr(study, "train", fake_train(calls))
    argv = ["--designs", "ScaleMix", "--meanenc", "--seeds", "0", "1", "--jobs", "2", "--output-dir", str(tmp_path)]
    study.main(argv)
    assert "3 rows x 2 seeds, 6 epochs each; 0 runs done before, 6 to run" in capsys.readouterr().out
    assert sorted(calls) == sorted((row, seed) for row in ("baseline", "ScaleMix source", "ScaleMix target")
                                   for seed in (0, 1))
    table = (tmp_path / "table.md").read_text()
    assert "| kNN top-1 (seeds) | kNN at epoch 3 (seeds) | gain over random start | vs baseline |" in table
    # means 66.5 and 56.5 (sd 0.71), baseline 60.5; at epoch 3 each 3 lower; the gain top-1 - (10 + 2 x seed):
    # 56 and 55 (ScaleMix source), 46 and 45, 50 and 49; v_source (1e-3 + 2e-3) / 2 = 15.00e-4, v_target 20.00e-4
    assert "| ScaleMix source | 66.5 +- 0.7 | 63.5 +- 0.7 | +55.5 +- 0.7 | +6.0 | 67.3 | +1.5 | 15.00 | 20.00 |" in table
    assert "| ScaleMix target | 56.5 +- 0.7 | 53.5 +- 0.7 | +45.5 +- 0.7 | -4.0 | 52.8 | -13.0 | 15.00 | 20.00 |" in table
    assert "| baseline | 60.5 +- 0.7 | 57.5 +- 0.7 | +49.5 +- 0.7 |  | 65.8 |  | 15.00 | 20.00 |" in table
    assert "| ScaleMix | +10.0 +- 0.7 | +14.5 | holds |" in table  # 10 > 2 x sqrt(0.5/2 + 0.5/2)
    # v_target / v_source 2 (seed 0) and 1 (seed 1): ranks 5 5 5 and 2 2 2 (ties), rank less the mean 3.5
    # +-1.5; top-1 60 61 66 67 56 57 (baseline, source, target by seed) ranks 3 4 5 6 1 2, less 3.5:
    # -0.5 0.5 1.5 2.5 -2.5 -1.5; products 1.5 x (-0.5 - 0.5 + 1.5 - 2.5 - 2.5 + 1.5) = -4.5, squares 13.5
    # and 17.5: rho = -4.5 / sqrt(236.25) = -0.29; the gains 50 49 56 55 46 45 rank 4 3 6 5 2 1: +0.29
    top1_line, gain_line, target_line, source_line = table.splitlines()[-4:]
    assert top1_line.startswith("Spearman rho(log v_target/v_source, kNN top-1) = -0.29 over 6 runs "
                                "(95% bootstrap interval ")
    assert top1_line.endswith("two-sided): negative, as the paper's claim predicts, not beyond chance at 5%")
    assert gain_line.startswith("Spearman rho(log v_target/v_source, kNN gain over random start) = 0.29 over 6")
    assert gain_line.endswith("two-sided): positive, against the paper's claim, not beyond chance at 5%")
    assert table.index("| ScaleMix | +10.0") < table.index("Spearman rho")  # after the tables
    # per side, the placements: the baseline and ScaleMix there, two points, too few
    assert target_line == ("Spearman rho(log v_target/v_source, kNN top-1) of the row means, the designs on "
                           "the target and the baseline undefined over 2 placements: it needs 3 or more")
    assert source_line.startswith("Spearman rho(log v_target/v_source, kNN top-1) of the row means, the "
                                  "designs on the source and the baseline undefined over 2 placements")
    lines = open(tmp_path / "results.jsonl").read().splitlines()
    open(tmp_path / "results.jsonl", "w").write("\n".join(lines[:-2]) + "\n")  # interrupted
    lost = {(r["row"], r["seed"]) for r in map(json.loads, lines[-2:])}
    calls.clear()
    study.main(argv)
    assert "4 runs done before, 2 to run" in capsys.readouterr().out and set(calls) == lost
    assert (tmp_path / "table.md").read_text() == table  # the runs in another order: the same figures
    calls.clear()
    study.main(argv)  # all done: read back, nothing trained, the tables and the correlation printed
    out = capsys.readouterr().out
    assert "6 runs done before, 0 to run" in out and not calls and top1_line in out and gain_line in out


def test_a_report_reads_a_finished_study_back_and_trains_nothing(tmp_path, monkeypatch, capsys):
    """--report: the rows, seeds and epochs of a results.jsonl (a 12-epoch study: midpoint 6), its
    tables and correlation, no run started; a failed record left out."""
    monkeypatch.setattr(study, "train", lambda *a: pytest.fail("--report trained"))
    made = fake_train([])
    results = [{**made(None, name, [], seed), "knn": {"0": 10.0, "6": 40.0 + seed, "12": 50.0}}
               for name in ("baseline", "ScaleMix target") for seed in (0, 3)]
    results.append({**results[0], "row": "MeanEnc (1,3)", "top1": 70.0, "seconds": 2.0,
                    "seconds_partial": True})
    results.append({"row": "WeakerAug source", "seed": 0, "flags": [], "seconds": 1.0, "error": "x"})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in results))
    study.main(["--report", str(path), "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "12 epochs, seeds 0 3: 5 runs; 4 timed whole took 0 CPU-thread minutes (1 more timed in part: " \
           "resumed); read back from " in out and "| kNN at epoch 6 (seeds) |" in out
    names = [line.split(" | ")[0][2:] for line in (tmp_path / "out" / "table.md").read_text().splitlines()[2:5]]
    assert names == ["baseline", "ScaleMix target", "MeanEnc (1,3)"]
    assert "| baseline | 61.5 +- 2.1 | 41.5 +- 2.1 |" in out
    assert "over 5 runs" in out and "WeakerAug" not in out
    # the target side: the baseline, ScaleMix target, MeanEnc (1,3): ratios (geometric means of 2 and
    # 0.5) 1, 1, 2 and top-1 61.5, 57.5, 70 -> ranks less 2: -0.5 -0.5 1 and 0 -1 1, rho 1.5 / sqrt(3);
    # no design on the source: no source line
    assert "of the row means, the designs on the target and the baseline = 0.87 over 3 placements" in out
    assert "designs on the source" not in out


def test_the_picture_s_third_panel(tmp_path, monkeypatch):
    """placement.png: three panels, the third each run's top-1 against v_target / v_source on a log
    scale, the correlation in its title."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed: the study draws no picture")
    import matplotlib.figure
    figures, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: (figures.append(fig), save(fig, *a, **k))[1])
    args = study.parse_args(["--designs", "ScaleMix", "--meanenc", "--seeds", "0", "1"])
    table = study.rows(args)
    train = fake_train([])
    results = [train(args, name, flags, seed) for name, _, _, flags, _ in table for seed in (0, 1)]
    study.plot(args, table, results, str(tmp_path / "placement.png"))
    assert (tmp_path / "placement.png").stat().st_size > 0 and len(figures) == 1
    axes = figures[0].axes
    assert len(axes) == 3 and [ax.get_xscale() for ax in axes] == ["linear", "linear", "log"]
    title = axes[2].get_title()
    assert "rho = -0.29" in title and "6 runs" in title
    assert len(axes[2].collections) == 3  # one colour per row, 2 runs each
    assert sorted(tuple(p) for c in axes[2].collections for p in c.get_offsets()) == sorted(
        (r["v_target"] / r["v_source"], r["top1"]) for r in results)


def test_a_real_run(folder, tmp_path):
    """One run of the script (2 steps on a small folder): its kNN, v_source and v_target read from
    its log."""
    args = study.parse_args(["--epochs", "1", "--knn-every", "1", "--output-dir", str(tmp_path), "--", "--data", folder,
                             "--batch-size", "16", "--max-steps", "2", "--queue-size", "64", "--variance-images", "16",
                             "--variance-views", "2"])
    result = study.train(args, "ScaleMix source", ["--scalemix-on", "source"], 1)
    assert "error" not in result, result
    assert list(result["knn"]) == ["0", "0.666667"] and 0 <= result["top1"] <= 100  # 48 images, batch 16: 3 steps an epoch
    assert 0 < result["v_source"] < 1 and 0 < result["v_target"] < 1 and result["flags"] == ["--scalemix-on", "source"]
    log = [json.loads(line) for line in open(study.run_dir(args, "ScaleMix source", 1) + "/log.jsonl")]
    assert max(r["step"] for r in log if "loss" in r) == 2  # --max-steps 2: the end, logged


def test_a_run_whose_log_lacks_its_end_is_that_run_s_error(tmp_path, monkeypatch):
    """A run that exits 0 without the kNN and variances of its last epoch (a run stopped while
    evaluating, resumed by an older script) gives that run's error line, not the study's crash."""
    args = study.parse_args(["--epochs", "2", "--output-dir", str(tmp_path)])
    out = study.run_dir(args, "baseline", 0)
    os.makedirs(out)
    records = [{"epoch": 0.0, "step": 0, "knn_top1": 60.0}, {"epoch": 1.0, "step": 3, "knn_top1": 61.0},
               {"epoch": 2.0, "step": 6, "loss": 6.0}]
    with open(os.path.join(out, "log.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(study.subprocess, "run", lambda *a, **k: study.subprocess.CompletedProcess(a, 0, "", ""))
    result = study.train(args, "baseline", [], 0)
    assert result["error"] == f"{out}/log.jsonl: no kNN or variances at the end"
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps({"epoch": 2.0, "step": 6, "knn_top1": 62.0}) + "\n")
        f.write(json.dumps({"epoch": 2.0, "step": 6, "v_source": 1e-3, "v_target": 2e-3}) + "\n")
    result = study.train(args, "baseline", [], 0)
    assert "error" not in result and result["knn"] == {"0": 60.0, "1": 61.0, "2": 62.0}
    assert (result["top1"], result["v_source"], result["v_target"]) == (62.0, 1e-3, 2e-3)
    assert "seconds_partial" not in result  # a run made whole in this call: its seconds are its own
    monkeypatch.setattr(study.subprocess, "run", lambda *a, **k: study.subprocess.CompletedProcess(
        a, 0, "already finished at step 6: ...; nothing to do", ""))
    assert study.train(args, "baseline", [], 0)["seconds_partial"]  # finished before this call
