"""The benchmark's report: made from the raw results alone, and its verdicts."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RAW = sorted(DOCS.glob("benchmark-*.jsonl"))


def report(rows_by_file, out):
    for name, rows in rows_by_file.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run(
        [sys.executable, ROOT / "scripts" / "benchmark.py", "--report-only", "--out", out],
        check=True, capture_output=True,
    )
    return (out / "benchmark.md").read_text()


def committed_rows():
    return {raw.name: [json.loads(line) for line in raw.read_text().splitlines()] for raw in RAW}


def test_committed_report_is_made_from_the_committed_raw_results(tmp_path):
    assert [raw.name for raw in RAW] == [f"benchmark-{part}.jsonl" for part in ("compiled", "flex", "sdpa", "varlen")]
    assert report(committed_rows(), tmp_path) == (DOCS / "benchmark.md").read_text()
    assert (tmp_path / "benchmark.png").stat().st_size > 0


def test_a_varlen_call_slower_than_the_floor_fails_its_target(tmp_path):
    rows = committed_rows()
    for row in rows["benchmark-varlen.jsonl"]:
        if (row["kind"], row["path"], row.get("variant"), row["heads"], row["seq_len"]) == (
            "attention", "series", "layer", "32/8", 8192
        ):
            row["ms"] *= 1.05
    text = report(rows, tmp_path)
    assert "- NOT met: varlen attention call within 2% of the kernel floor in time" in text
    assert "  - varlen 32/8 seq 8192: 1.05" in text
    assert "- met: varlen attention call memory within 1% of the kernel floor" in text
