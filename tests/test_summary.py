"""`python -m wcord_jax.tools.summary`: the table of runs a person reads."""
import json

from wcord_jax.tools import summary


def _run(path, config, events):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_summary_rows_and_table(tmp_path, capsys):
    _run(tmp_path / "t", {"task": "teacher", "model": "resnet14", "dataset": {"name": "fashion_mnist"}},
         [{"step": 10, "epoch": 1, "eval/top1": 0.8}, {"step": 20, "epoch": 2, "eval/top1": 0.85},
          {"step": 30, "epoch": 3, "eval/top1": 0.84}])
    _run(tmp_path / "s", {"task": "distill", "method": "wcord", "model": "resnet8", "teacher": {"model": "resnet14"},
                          "dataset": {"name": "fashion_mnist"}},
         [{"step": 0, "teacher/top1": 0.84}, {"step": 5, "epoch": 1, "train/loss": 2.0},
          {"step": 10, "epoch": 1, "eval/top1": 0.7}])
    row = summary.summarise(str(tmp_path / "t"))
    assert (row["epochs"], row["final_top1"], row["best_top1"], row["teacher_top1"]) == (3, 0.84, 0.85, None)
    assert summary.main([str(tmp_path / "t"), str(tmp_path / "s")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:7] == ["teacher:", "resnet14", "fashion_mnist", "3", "84.00", "85.00", "-"]
    assert lines[2].split()[:9] == ["wcord:", "resnet14", "->", "resnet8", "fashion_mnist", "1", "70.00", "70.00",
                                    "84.00"]
    assert summary.main([str(tmp_path / "nothing")]) == 2
    assert "holds no run" in capsys.readouterr().err
