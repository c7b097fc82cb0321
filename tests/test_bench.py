import csv
import json

from layerwise.bench import pareto_front
from layerwise.cli import main


def test_bench_quick_writes_table_csv_json_and_png(tiny_dirs, calib_text_file, tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmarks\n\nkept text\n")
    code = main(["-q", "bench", str(tiny_dirs["llama"]), "--quick", "--calib", str(calib_text_file),
                 "--eval", str(calib_text_file), "--nsamples", "4", "--seqlen", "64", "--results", str(results)])
    assert code == 0
    text = results.read_text()
    assert "kept text" in text and "<!-- grid:quick -->" in text and "Reproduce: `" in text
    header = "| method | settings | ppl | Δppl vs fp16 | bits/weight | checkpoint MB | compress s | × forward | peak RSS MB |"
    assert header in text
    rows = json.loads((tmp_path / "bench-quick.json").read_text())
    assert [r["method"] for r in rows] == ["float16", "rtn", "gptq"]
    for r in rows[1:]:
        assert r["bits_per_weight"] == 4.625 and r["time_vs_forward"] > 0 and r["peak_rss_mb"] > 0
        assert r["ppl"] > 1 and "error" not in r
    with open(tmp_path / "bench-quick.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and set(table[0]) >= {"method", "ppl", "bits_per_weight", "peak_rss_mb"}
    png = (tmp_path / "bench-quick.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_pareto_front():
    rows = [{"bits_per_weight": b, "ppl": p} for b, p in [(3, 120), (3.5, 110), (4, 115), (4.5, 95), (16, 90)]]
    assert [(r["bits_per_weight"], r["ppl"]) for r in pareto_front(rows)] == [(3, 120), (3.5, 110), (4.5, 95), (16, 90)]
