"""bench/bench_defaults.py on a tiny budget: every lever/benchmark cell is run, compared to its baseline, tabled."""

from __future__ import annotations

import json

import pytest

from tests.bench_scripts import load_bench

pytest.importorskip("torch")


def _bench():
    return load_bench("bench_defaults")


def test_smoke_runs_levers_on_both_benchmarks(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "out"
    argv = ["--task", "classification", "--smoke", "--levers", "ema,mixup_cutmix", "--out", str(out)]
    assert bench.main([*argv, "--data-root", str(tmp_path / "data"), "--threads", "1"]) == 0
    res = json.loads((out / "bench_defaults.json").read_text())
    cells = {(r["lever"], r["benchmark"]) for r in res["rows"]}
    assert cells == {(lv, b) for lv in ("baseline", "ema", "mixup_cutmix") for b in ("elpv", "surfaces")}
    assert all(r["score"] is not None and r["delta"] is not None for r in res["rows"])
    assert set(res["helps_both"]) == {"baseline", "ema", "mixup_cutmix"} and res["helps_both"]["baseline"] is False
    table = capsys.readouterr().out
    assert "helps both" in table and "mixup_cutmix" in table
    with pytest.raises(SystemExit, match="unknown"):
        bench.main(["--task", "classification", "--smoke", "--levers", "magic", "--out", str(out)])
