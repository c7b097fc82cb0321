import csv
import json
import sys

import pytest
import torch

from layerwise.bench.plots import pareto_front
from layerwise.cli import main


@pytest.mark.slow
def test_bench_quick_writes_table_csv_json_and_png(tiny_dirs, calib_text_file, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\nkept text\n")
    code = main(["-q", "bench", str(tiny_dirs["llama"]), "--quick", "--calib", str(calib_text_file),
                 "--eval", str(calib_text_file), "--nsamples", "4", "--seqlen", "64", "--results", str(results)])
    assert code == 0
    text = results.read_text()
    assert "kept text" in text and "<!-- grid:quick -->" in text and "Reproduce: `" in text
    header = ("| method | settings | ppl | Δppl vs fp16 | bits/weight | checkpoint MB | compress s | × forward | "
              "compress CPU s | CPU × forward | peak RSS MB |")
    assert header in text
    rows = json.loads((tmp_path / "bench-quick.json").read_text())
    assert [r["method"] for r in rows] == ["float16", "rtn", "gptq"]
    for r in rows[1:]:
        assert r["bits_per_weight"] == 4.625 and r["compress_cpu_s"] > 0 and r["peak_rss_mb"] > 0
        assert r["ppl"] > 1 and "error" not in r
    rtn, gptq = rows[1:]
    assert "time_vs_forward" not in rtn  # data-free: no calibration windows to time a forward over
    assert gptq["time_vs_forward"] > 0 and gptq["cpu_vs_forward"] > 0
    with open(tmp_path / "bench-quick.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and set(table[0]) >= {"method", "ppl", "bits_per_weight", "peak_rss_mb"}
    png = (tmp_path / "bench-quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_pareto_front():
    rows = [{"bits_per_weight": b, "ppl": p} for b, p in [(3, 120), (3.5, 110), (4, 115), (4.5, 95), (16, 90)]]
    assert [(r["bits_per_weight"], r["ppl"]) for r in pareto_front(rows)] == [(3, 120), (3.5, 110), (4.5, 95), (16, 90)]


def test_repeated_runs_report_median_times_and_largest_memory():
    from layerwise.bench.rows import median_of_runs

    runs = [{"method": "gptq", "ppl": 9.0, "compress_s": s, "forward_s": 2.0, "time_vs_forward": s / 2.0,
             "peak_rss_mb": m} for s, m in [(5.0, 100.0), (1.0, 300.0), (3.0, 200.0)]]
    row = median_of_runs(runs)
    assert row["compress_s"] == 3.0 and row["time_vs_forward"] == 1.5 and row["peak_rss_mb"] == 300.0
    assert row["runs"] == 3 and row["ppl"] == 9.0
    assert median_of_runs(runs[:1])["compress_s"] == 5.0


def test_bench_repeat_must_be_positive(tiny_dirs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's positive-integer type refuses it before any work
        main(["-q", "bench", str(tiny_dirs["llama"]), "--quick", "--repeat", "0", "--results", str(tmp_path / "R.md")])
    assert exit_.value.code == 2 and "--repeat: 0 must be at least 1" in capsys.readouterr().err


def test_peer_ratios_compare_each_peer_with_the_row_before_it():
    from layerwise.bench.results import peer_ratios

    rows = [{"method": "gptq", "settings": "bits=3", "compress_s": 6.0, "delta_ppl": 1.0},
            {"method": "ct-gptq", "settings": "peer", "peer": True, "compress_s": 10.0, "delta_ppl": 4.0},
            {"method": "rtn", "settings": "bits=3", "compress_s": 1.0, "delta_ppl": 5.0}]
    (line,) = peer_ratios(rows)
    assert "(0.60 ×)" in line and "(0.25 ×)" in line


def test_evaluation_ids_cap():
    from layerwise.bench.measure import evaluation_ids
    from layerwise.calib_data import BUNDLED_EVALUATION
    from layerwise.loading import load_tokenizer

    tokenizer = load_tokenizer(str(__import__("pathlib").Path(__file__).parents[1] / "models" / "wt2-llama-4l"))
    full = evaluation_ids(tokenizer, BUNDLED_EVALUATION)
    assert torch.equal(evaluation_ids(tokenizer, BUNDLED_EVALUATION, 1000), full[:1000])


def test_bench_without_matplotlib_says_how_to_get_it(tiny_dirs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    results = tmp_path / "R.md"
    code = main(["-q", "bench", str(tiny_dirs["llama"]), "--quick", "--results", str(results)])
    assert code == 2 and "pip install 'layerwise[bench]'" in capsys.readouterr().err
    assert not results.exists()  # refused before the first row


def test_bench_results_default_to_the_working_directory():
    from layerwise.cli import build_parser

    assert build_parser().parse_args(["bench", "MODEL"]).results == "RESULTS.md"


def test_bench_resume_keeps_rows_measured_with_the_same_arguments(tiny_dirs, tmp_path, monkeypatch, capsys):
    """A long grid (Gemma 3's whole-test-set rows) runs across sittings: --resume takes every row
    the grid's JSON holds for the same recipe and arguments and runs only the rest; a failed row or
    other arguments run again."""
    import layerwise.bench.rows as rows_module

    calls = []

    def fake_row(cfg, model, calib, eval_text, nsamples, seqlen, seed, device, eval_tokens=None, threads=None):
        calls.append((cfg or {}).get("method", "float16"))
        if cfg is not None and cfg["method"] == "gptq" and len(calls) <= 3:
            return {"method": "gptq", "settings": "s", "peer": False, "error": "RuntimeError: killed"}
        return {"method": "float16" if cfg is None else cfg["method"], "settings": "s", "peer": False,
                "ppl": 10.0 + len(calls), "bits_per_weight": 16.0 if cfg is None else 4.625}

    monkeypatch.setattr(rows_module, "run_row", fake_row)
    results = tmp_path / "R.md"
    argv = ["-q", "bench", str(tiny_dirs["llama"]), "--quick", "--nsamples", "4", "--results", str(results)]
    assert main(argv) == 1  # the gptq row failed
    assert calls == ["float16", "rtn", "gptq"]
    first = json.loads((tmp_path / "bench-quick.json").read_text())
    assert main([*argv, "--resume"]) == 0
    assert calls[3:] == ["gptq"]  # only the failed row again
    second = json.loads((tmp_path / "bench-quick.json").read_text())
    assert second[:2] == first[:2] and second[2]["ppl"] == 14.0 and second[2]["delta_ppl"] == 14.0 - 11.0
    assert main([*argv, "--resume"]) == 0 and len(calls) == 4  # nothing left to run
    assert main([*argv[:-4], "--nsamples", "8", "--results", str(results), "--resume"]) == 0
    assert calls[4:] == ["float16", "rtn", "gptq"]  # other arguments: other measurements
    (tmp_path / "bench-quick.json").write_text("{not json")
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    assert "--resume cannot read" in capsys.readouterr().err
