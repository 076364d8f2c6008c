"""``fedmedbench leaderboard DIR... --out SITE``: verified submissions merged
into one static site.

Each folder is checked by :func:`fedmedbench.submit.verify` first (manifest
digest, track id/version/digest, the SHA-256 of every listed file, no
unlisted record, the wheel, each record made for the track by fedmedbench
and its package alone); the first problem refuses the whole leaderboard
with the file named, so a tampered record never reaches a page. The
records are then annotated with their track (``_track``) and submission
(``_submission``) and handed to the ``site`` reporter
(:mod:`fedmedbench.plugins.reporters.site`), through the registry like any
reporter.

Two submissions that enter the same method under the same privacy setting
on one track would be one row: the later one's method is labelled with its
package (``fedavg ⟨my-package⟩``). The same submission given twice (equal
manifest digests) is an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fedmedbench.errors import ConfigError, printable
from fedmedbench.submit import RECORDS, Submission, verify

__all__ = ["build_site", "annotate"]


def annotate(subs: list[Submission]) -> list[dict[str, Any]]:
    """The records of ``subs``, each with ``_track``, ``_submission`` and
    ``_dirs`` (the folder images may be read from)."""
    from fedmedbench.report import AXES, _label

    out: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], int] = {}
    for k, sub in enumerate(subs, 1):
        t = sub.track
        track = {"id": t.id, "version": t.version, "title": t.title, "summary": t.summary,
                 "provenance": t.provenance, "definition": t.definition(),
                 "digest": t.digest, "tuning_text": t.tuning.text(), "metric_ci": t.metric_ci}
        m = sub.manifest
        pk = m.get("package")
        info = {"index": k, "label": sub.label, "package": pk,
                "short": f"{pk['name']} {pk['version']}" if pk else "built-ins",
                "environment": m.get("environment"), "seeds": m.get("seeds"),
                "tuning_trials": (m.get("tuning") or {}).get("trials", 0),
                "records": len(sub.records), "attacks_isolated": m.get("attacks_isolated"),
                "signed_off_by": m.get("signed_off_by"), "digest": m.get("digest"),
                "path": str(sub.path)}
        pkg = (pk or {}).get("name")
        for r in sub.records:
            r = dict(r)
            key = (t.id, *(_label(r, a) for a in AXES if a != "model"))
            owner = seen.setdefault(key, k)
            if owner != k and pkg:
                r["labels"] = {**(r.get("labels") or {}),
                               "algorithm": f"{_label(r, 'algorithm')} ⟨{pkg}⟩"}
            r["_track"], r["_submission"] = track, info
            r["_dirs"] = [str(sub.path / RECORDS)]
            out.append(r)
    return out


def build_site(dirs: Iterable[str | Path], out: str | Path) -> list[Path]:
    """Verify every submission folder, then write the site into ``out``.

    Raises
    ------
    fedmedbench.submit.SubmissionError
        A folder that does not verify, naming the file.
    fedmedbench.ConfigError
        No folder, or one submission given twice.
    """
    from fedmedbench.fileio import probe_writable
    from fedmedbench.registry import get_registry

    dirs = [Path(d) for d in dirs]
    if not dirs:
        raise ConfigError("leaderboard: give at least one submission folder")
    subs = [verify(d) for d in dirs]
    digests: dict[str, Path] = {}
    for s in subs:
        d = str(s.manifest.get("digest"))
        if d in digests:
            raise ConfigError(printable(f"{s.path} and {digests[d]} are the same submission "
                                        f"(manifest digest {d[:16]}); give it once"))
        digests[d] = s.path
    records = annotate(subs)
    probe_writable(Path(out))
    site = get_registry().build("reporter", {"name": "site"}, key="leaderboard")
    return site.write(records, Path(out))
