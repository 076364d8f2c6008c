"""A full report (markdown, csv, json, figures, html) over 1,000 records,
against the same report over 100 records in the same run.

Records are copies of a real run's records (with DP and attack results)
spread over 5 datasets, 15 methods and 4 privacy settings, so both reports
draw the same 20 figures and the ratio shows what the tables cost as records
grow. Run with
``pytest tests/benchmarks/test_bench_report.py --benchmark-enable -s``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from report_fixtures import run, scaled, with_privacy_and_attacks  # noqa: E402

from fedmedbench.registry import get_registry  # noqa: E402
from fedmedbench.results import load_records  # noqa: E402

REPORTERS = ("markdown", "csv", "json", "figures", "html")


def _records(base: Path) -> list[dict]:
    assert run(base / "whole") == 0
    recs, _ = load_records([base / "whole"])
    return scaled(with_privacy_and_attacks(recs), 1000)


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _records(tmp_path_factory.mktemp("bench-report"))


def _report(records: list[dict], out: Path) -> int:
    reg = get_registry()
    recs = list(records)  # a new list: nothing is reused from an earlier report
    out.mkdir(parents=True, exist_ok=True)
    return sum(len(reg.build("reporter", {"name": n}).write(recs, out)) for n in REPORTERS)


#: every reporter's files: 12 tables, 25 figures as PNG and SVG, html/json/md
FILES = 12 + 5 * 5 * 2 + 3


@pytest.mark.slow
@pytest.mark.parametrize("n", [100, 1000])
def test_bench_report(benchmark, records: list[dict], tmp_path: Path, n: int) -> None:
    if not benchmark.enabled:
        pytest.skip("runs with --benchmark-enable (by default a 100-record report is checked "
                    "in the background: test_a_report_over_100_records_writes_every_file)")
    sub = records[:n]
    t0 = time.perf_counter()
    files = benchmark.pedantic(_report, args=(sub, tmp_path / "out"), rounds=1, iterations=1)
    seconds = time.perf_counter() - t0
    benchmark.extra_info.update(records=n, files=files, seconds=round(seconds, 2))
    print(f"\nreport over {n} records: {files} files in {seconds:.2f} s")
    assert files == FILES
    # the target: a report over 1,000 records within a minute
    assert seconds < 60, f"a report over {n} records took {seconds:.1f} s"
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert page.count("<tr>") > 100


def _report_job(tmp: Path, spawn) -> dict:
    """This file as a script: the 100-record report in a process of its own
    (a background job, tests/conftest.py)."""
    import subprocess

    p = spawn([sys.executable, __file__, str(tmp), "100"], stdout=subprocess.PIPE,
              stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=900)
    return {"code": p.returncode, "out": out.decode(), "err": err.decode()[-3000:], "tmp": tmp}


@pytest.mark.slow
@pytest.mark.background(job=_report_job)
def test_a_report_over_100_records_writes_every_file(background) -> None:
    """What the benchmark checks, without its timing, by default."""
    assert background["code"] == 0, background["err"]
    assert background["out"].split() == [str(FILES)]
    page = (background["tmp"] / "out" / "index.html").read_text(encoding="utf-8")
    assert page.count("<tr>") > 100


if __name__ == "__main__":  # python test_bench_report.py OUT N: N records' report into OUT/out
    base, n = Path(sys.argv[1]), int(sys.argv[2])
    print(_report(_records(base)[:n], base / "out"))
