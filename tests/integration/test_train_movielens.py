"""Real data end to end: `data prepare movielens`, then a job that includes its schema trains on 2 ranks."""

from __future__ import annotations

from pathlib import Path

import yaml

from shardrec.cli import main as cli_main


def test_prepared_movielens_trains_with_shuffle_and_beats_chance(sample_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ml"
    assert cli_main(["data", "prepare", "movielens", "--input", str(sample_data / "movielens100k"), "--output", str(out)]) == 0
    job = {
        "include": [str(out / "schema.yaml")],
        "model": {"name": "dlrm", "dense_arch_layer_sizes": [32, 16], "over_arch_layer_sizes": [64, 32, 1]},
        "data": {"batch_size": 256, "shuffle_buffer": 20_000},
        "train": {"steps": 120, "progress_bar": False},
        "checkpoint": {"enabled": False},
        "run": {"root": str(tmp_path / "runs")},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    capsys.readouterr()
    assert cli_main(["train", str(tmp_path / "job.yaml"), "--nproc", "2"]) == 0
    printed = capsys.readouterr().out
    auc = float(printed.split("eval auc:")[1].split()[0])
    assert auc > 0.7, printed[-2000:]
