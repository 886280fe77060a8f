"""The experiment scripts, run for real on a tiny budget (1 worker, 2 rounds)."""

from __future__ import annotations

import json

import pytest

from experiments import codec_table


@pytest.mark.slow
def test_codec_table_runs_rows_writes_tables_and_reuses_runs(tmp_path, capsys):
    argv = ["--workers", "1", "--rounds", "2", "--seeds", "0", "--only", "fp16",
            "--row", "topk_sgd=topk:ratio=0.05|--momentum 0 --lr 0.5", "--out", str(tmp_path)]
    assert codec_table.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    by_label = {r["label"]: r for r in results}
    assert set(by_label) == {"dense", "fp16", "topk_sgd"} and all(r["status"] == "ok" for r in results)
    assert by_label["dense"]["uplink_bits_per_entry"] == 32.0 and by_label["fp16"]["uplink_bits_per_entry"] == 16.0
    assert by_label["fp16"]["delta_vs_dense"] == 0.0  # fp16 rounding does not move 2 rounds of digits
    assert by_label["topk_sgd"]["server_momentum"] == 0.0 and by_label["dense"]["server_momentum"] == 0.9
    table = (tmp_path / "table.md").read_text()
    assert "| `fp16` |" in table and "`--momentum 0 --lr 0.5`" in table
    header, rule = table.splitlines()[2:4]
    assert header.count("|") == rule.count("|")
    assert (tmp_path / "accuracy_vs_bits.png").stat().st_size > 1000
    capsys.readouterr()
    assert codec_table.main(argv) == 0  # the second time every run is reused
    assert capsys.readouterr().out.count("reusing") == 3


def test_codec_table_rejects_unknown_rows():
    with pytest.raises(SystemExit, match="unknown row"):
        codec_table.selected_rows(codec_table.parse_args(["--only", "nosuch"]))
    with pytest.raises(SystemExit):
        codec_table.parse_args(["--row", "justalabel"])
