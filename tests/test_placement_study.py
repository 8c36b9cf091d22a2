"""benchmarks/placement_study.py's bookkeeping on a tiny budget (2-step runs): the rows and their
flags, the statistics by hand, the tables (means, spreads, the paper's figures, the ordering's
verdict) and the resume of an interrupted study. Not its accuracy: that is what it measures."""
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


def fake_train(calls):
    """study.train's stand-in: a run's figures from its row and seed (ScaleMix source 10 above its
    target, spread 1 over the seeds), counted."""
    def train(args, name, flags, seed):
        calls.append((name, seed))
        top1 = {"baseline": 60.0, "ScaleMix source": 66.0, "ScaleMix target": 56.0}[name] + seed
        return {"row": name, "seed": seed, "flags": flags, "seconds": 1.0, "knn": {"1": top1},
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
    # means 66.5 and 56.5 (sd 0.71), baseline 60.5; v_source (1e-3 + 2e-3) / 2 = 15.00e-4, v_target 20.00e-4
    assert "| ScaleMix source | 66.5 +- 0.7 | +6.0 | 67.3 | +1.5 | 15.00 | 20.00 |" in table
    assert "| ScaleMix target | 56.5 +- 0.7 | -4.0 | 52.8 | -13.0 | 15.00 | 20.00 |" in table
    assert "| baseline | 60.5 +- 0.7 |  | 65.8 |  | 15.00 | 20.00 |" in table
    assert "| ScaleMix | +10.0 +- 0.7 | +14.5 | holds |" in table  # 10 > 2 x sqrt(0.5/2 + 0.5/2)
    lines = open(tmp_path / "results.jsonl").read().splitlines()
    open(tmp_path / "results.jsonl", "w").write("\n".join(lines[:-2]) + "\n")  # interrupted
    lost = {(r["row"], r["seed"]) for r in map(json.loads, lines[-2:])}
    calls.clear()
    study.main(argv)
    assert "4 runs done before, 2 to run" in capsys.readouterr().out and set(calls) == lost
    assert (tmp_path / "table.md").read_text() == table


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
