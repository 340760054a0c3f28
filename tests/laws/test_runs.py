"""lightning_scaling.laws.runs: reading runs from CSV files (Chinchilla's and Sardana's columns) and from
Lightning CSVLogger folders, and the errors that name the column."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from lightning_scaling.laws.runs import read_csv, read_csv_logger, read_points


def test_read_csv_chinchilla_and_sardana_columns(tmp_path):
    chin = tmp_path / "chin.csv"
    chin.write_text("x,Model Size,Training FLOP,loss\n1,1e8,6e18,3.0\n2,2e8,6e18,2.9\n")
    pts = read_csv(chin)
    np.testing.assert_allclose(pts.tokens, [1e10, 5e9])  # D = C / (6N)
    from importlib.resources import files

    sardana = read_csv(files("lightning_scaling.data") / "sardana2023_trainingresults.csv")
    assert len(sardana) == 47 and sardana.params.min() == pytest.approx(1.51e8)
    assert sardana.loss.max() < 4


def test_read_csv_errors_name_the_column(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("params,loss\n1e8,3.0\n")
    with pytest.raises(ValueError, match="tokens or a flops column"):
        read_csv(bad)
    bad.write_text("params,tokens,loss\n1e8,abc,3.0\n")
    with pytest.raises(ValueError, match="line 2: column 'tokens'"):
        read_csv(bad)
    with pytest.raises(ValueError, match="no column 'nope'"):
        read_csv(bad, loss_column="nope")


def _metrics(path, rows):
    path.mkdir(parents=True)
    with (path / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["epoch", "step", "scaling/params", "scaling/tokens", "train/loss", "val/loss"])
        writer.writeheader()
        for row in rows:
            writer.writerow(row)


def test_read_csv_logger_final_and_all_points(tmp_path):
    for k, size in enumerate((1e6, 2e6)):
        _metrics(
            tmp_path / "logs" / f"version_{k}",
            [
                {"step": 0, "scaling/params": size, "scaling/tokens": 1000},
                {"step": 0, "train/loss": 5.0 - k},
                {"step": 1, "scaling/tokens": 2000, "train/loss": 4.0 - k},
                {"step": 1, "val/loss": 4.5 - k},
            ],
        )
    final = read_csv_logger(tmp_path / "logs")
    assert sorted(final.loss.tolist()) == [3.5, 4.5]  # val/loss preferred
    curves = read_csv_logger(tmp_path / "logs", loss_column="train/loss", points="all")
    assert len(curves) == 4 and np.unique(curves.runs).size == 2
    assert sorted(curves.tokens.tolist()) == [1000, 1000, 2000, 2000]  # tokens carried forward
    both = read_points([tmp_path / "logs" / "version_0", tmp_path / "logs" / "version_1"])
    assert len(both) == 2


def test_read_csv_logger_without_token_budget_columns(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.csv").write_text("epoch,step,train/loss\n0,1,3.0\n")
    with pytest.raises(ValueError, match=r"scaling/params.*TokenBudget"):
        read_csv_logger(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no metrics.csv"):
        read_csv_logger(tmp_path / "empty")
