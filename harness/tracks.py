"""Tracks: versioned, fixed benchmark definitions (``fedmedbench tracks``).

A track fixes everything an entry of the leaderboard may not choose: the
data and its split, the model family, the rounds and local-step budget,
clients per round, the seeds, the privacy tiers (and against whom their ε
is counted), the attacks run on every entry, the audits run on every DP
entry, the tuning rule, and the metric with its confidence interval. An
entry chooses only its method (an algorithm, an aggregator, a privacy
mechanism of its own) and, under the tuning rule, its hyperparameters.

The built-ins are each track's baseline entries (:attr:`Track.baselines`):
``fedmedbench submit TRACK`` runs them, ``fedmedbench submit TRACK
PACKAGE`` runs a plugin package on the same cells
(:mod:`fedmedbench.submit`), and ``fedmedbench leaderboard`` verifies and
merges submissions (:mod:`fedmedbench.leaderboard`).

A track's definition is data (:meth:`Track.definition`); its
:attr:`~Track.digest` (SHA-256 of that data as canonical JSON) goes into
every submission, and the leaderboard refuses a submission made for another
version or digest. Changing anything of a track that changes its numbers
means a new :attr:`~Track.version`.

Provenance of the definitions: each track's :attr:`~Track.provenance` says
where its dataset, split and settings come from (FLamby's Fed-Heart-Disease
split for ``heart-disease``; the dataset plugins' own defaults, which their
cards document, for the run settings; the privacy tiers and attacks of
issue 20 of this project). The tuning grids are small on purpose: they say
how much search a baseline had, not what is optimal.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from fedmedbench.errors import ConfigError

__all__ = ["Tier", "Protection", "TuningRule", "Track", "TRACKS", "get_track", "track_ids",
           "TRACK_SCHEMA"]

#: the schema of :meth:`Track.definition` (part of every digest)
TRACK_SCHEMA = "fedmedbench.track/1"


@dataclass(frozen=True)
class Tier:
    """A privacy tier: the entries whose ε against ``adversary`` (largest
    over seeds, each at its own δ) is at most ``max_epsilon``; ``None``
    admits every entry, with or without a guarantee. Tiers are nested."""

    id: str
    name: str
    max_epsilon: float | None
    adversary: str = "server"


#: the three tiers every track uses (issue 20: no DP, ε ≤ 8, ε ≤ 1 against the server)
TIERS: tuple[Tier, ...] = (
    Tier("all", "every entry (with or without a DP guarantee)", None),
    Tier("eps8", "ε ≤ 8 against the server", 8.0),
    Tier("eps1", "ε ≤ 1 against the server", 1.0),
)


@dataclass(frozen=True)
class Protection:
    """A privacy stack the track runs entries under: ``stack`` is the
    privacy axis value (``"none"``, a table, or a list of tables), ``tier``
    the tier its target ε aims at (the leaderboard places an entry by the ε
    its records hold, not by this)."""

    id: str
    stack: Any
    tier: str


@dataclass(frozen=True)
class TuningRule:
    """How an entry may choose hyperparameters (AlgoPerf's "external tuning"
    in fedmedbench's ``separate-rows`` form, :mod:`fedmedbench.tuning`).

    ``fraction`` of each site's training rows (drawn with the fixed tuning
    seed) are tuning rows for **every** entry, tuned or not, so all entries
    train their published cells on the same other rows. An entry may try at
    most ``max_trials`` grid points, each on every tuning seed, trained and
    validated on the tuning rows only; the tuned cells' records carry the
    protocol and the ε covering selection. Baselines are tuned over
    ``baseline_grid``."""

    max_trials: int
    baseline_grid: dict[str, list[Any]]
    seeds: tuple[int, ...] = (1001, 1002)
    fraction: float = 0.2
    validation: float = 0.25
    rule: str = "separate-rows"

    def text(self) -> str:
        grid = ", ".join(f"{k} ∈ {{{', '.join(map(str, v))}}}"
                         for k, v in self.baseline_grid.items()) or "none (fixed settings)"
        return (f"{self.rule}: {self.fraction:g} of each site's training rows are tuning rows "
                f"for every entry; at most {self.max_trials} grid points × "
                f"{len(self.seeds)} tuning seeds, validated on {self.validation:g} of the "
                f"tuning rows; baselines tuned over {grid}")


@dataclass(frozen=True)
class Track:
    """One benchmark definition. Every field is fixed for a version."""

    id: str
    version: int
    title: str
    summary: str
    provenance: str
    dataset: dict[str, Any]
    rounds: int
    seeds: tuple[int, ...]
    run: dict[str, Any]
    protections: tuple[Protection, ...]
    #: ``(algorithm, protection ids)``: the built-in entries ``submit TRACK`` runs
    baselines: tuple[tuple[Any, tuple[str, ...]], ...]
    attacks: tuple[Any, ...]
    tuning: TuningRule
    partitioner: Any = "default"
    model: Any = "default"
    aggregator: Any = "weighted-mean"
    #: run settings per component, as a matrix's ``[run.<component>]`` tables
    run_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per unit of a DP claim (``record``, ``client``): the audit attack and the model
    #: its cells train (Dirac canaries need at least ``m`` coordinates)
    audits: dict[str, dict[str, Any]] = field(default_factory=dict)
    tiers: tuple[Tier, ...] = TIERS
    #: the dataset reads files the user supplies (``fedmedbench datasets`` says which)
    needs_user_files: bool = False
    metric_ci: str = ("95% interval of the mean over seeds: the seeds' spread (t) plus the "
                      "test set's sampling error (each record's standard error)")

    # -- the definition as data ---------------------------------------------------

    def definition(self) -> dict[str, Any]:
        """Everything that fixes the track's numbers, as JSON-ready data."""
        return {
            "schema": TRACK_SCHEMA, "id": self.id, "version": self.version,
            "dataset": self.dataset, "partitioner": self.partitioner, "model": self.model,
            "aggregator": self.aggregator, "rounds": self.rounds, "seeds": list(self.seeds),
            "run": self.run, "run_overrides": self.run_overrides,
            "protections": [{"id": p.id, "stack": p.stack, "tier": p.tier}
                            for p in self.protections],
            "baselines": [{"algorithm": a, "protections": list(ps)} for a, ps in self.baselines],
            "attacks": list(self.attacks), "audits": self.audits,
            "tiers": [{"id": t.id, "name": t.name, "max_epsilon": t.max_epsilon,
                       "adversary": t.adversary} for t in self.tiers],
            "tuning": {"rule": self.tuning.rule, "max_trials": self.tuning.max_trials,
                       "baseline_grid": self.tuning.baseline_grid,
                       "seeds": list(self.tuning.seeds), "fraction": self.tuning.fraction,
                       "validation": self.tuning.validation},
        }

    @property
    def digest(self) -> str:
        """SHA-256 of :meth:`definition` as canonical JSON."""
        blob = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True)
        return hashlib.sha256(blob.encode("ascii")).hexdigest()

    @property
    def ref(self) -> str:
        """``heart-disease@1``: the id and version, as submissions name them."""
        return f"{self.id}@{self.version}"

    def protection(self, pid: str) -> Protection:
        for p in self.protections:
            if p.id == pid:
                return p
        raise ConfigError(f"track {self.id}: no protection {pid!r}; it has "
                          f"{', '.join(p.id for p in self.protections)}")

    def tier(self, tid: str) -> Tier:
        for t in self.tiers:
            if t.id == tid:
                return t
        raise ConfigError(f"track {self.id}: no tier {tid!r}; tiers are "
                          f"{', '.join(t.id for t in self.tiers)}")

    # -- matrices ------------------------------------------------------------------

    def matrix(self, *, algorithm: Any, protection: Protection, aggregator: Any = None,
               attacks: list[Any] | None = None, isolate: bool = False) -> dict[str, Any]:
        """The matrix (a dict in the matrix file's shape) of one entry under
        one protection: the track's data, model, rounds, seeds and run
        settings, the track's attacks (plus ``attacks``)."""
        stack = protection.stack
        used = {spec["name"] for v in (self.dataset, self.partitioner, self.model, algorithm,
                                       aggregator or self.aggregator,
                                       *(stack if isinstance(stack, list) else [stack]))
                for spec in [v] if isinstance(spec, dict)}
        used |= {v for v in (algorithm, *(stack if isinstance(stack, list) else [stack]))
                 if isinstance(v, str)}
        axes = {"dataset": [copy.deepcopy(self.dataset)],
                "partitioner": [copy.deepcopy(self.partitioner)],
                "model": [copy.deepcopy(self.model)],
                "algorithm": [copy.deepcopy(algorithm)],
                "aggregator": [copy.deepcopy(aggregator or self.aggregator)],
                "privacy": [copy.deepcopy(stack)]}
        # an axis at its default is left out (the matrix's default, as a file would)
        axes = {k: v for k, v in axes.items() if v != ["default"]}
        return {
            "name": f"track {self.ref}",
            "rounds": self.rounds, "seeds": list(self.seeds),
            "axes": axes,
            "run": {**copy.deepcopy(self.run),
                    **{k: copy.deepcopy(v) for k, v in self.run_overrides.items() if k in used}},
            "evaluate": {"attacks": [*copy.deepcopy(list(self.attacks)), *(attacks or [])],
                         "isolate": bool(isolate)},
        }

    def audit_matrix(self, raw: dict[str, Any], unit: str) -> dict[str, Any] | None:
        """The audit cells of an entry's matrix ``raw`` for a DP claim of
        ``unit``: the same entry, seeds and settings with the audit's model
        and the audit attack alone (its canaries change training, so its
        cells are apart from the entry's measured cells)."""
        spec = self.audits.get(unit)
        if not spec:
            return None
        out = copy.deepcopy(raw)
        out["name"] = f"track {self.ref} audit"
        if spec.get("model"):
            out["axes"]["model"] = [copy.deepcopy(spec["model"])]
        out["evaluate"] = {"attacks": [copy.deepcopy(spec["attack"])],
                           "isolate": raw["evaluate"].get("isolate", False)}
        return out


def _dp_sgd(eps: float) -> dict[str, Any]:
    return {"name": "dp-sgd", "epsilon": eps, "delta": 1e-5}


def _sample_level(extra: tuple[Protection, ...] = ()) -> tuple[Protection, ...]:
    return (Protection("none", "none", "all"), Protection("secagg", "secagg", "all"), *extra,
            Protection("dp-sgd-8", _dp_sgd(8.0), "eps8"),
            Protection("dp-sgd-1", _dp_sgd(1.0), "eps1"))


def _baselines(fl: tuple[Any, ...] = ("fedavg", {"name": "fedprox", "mu": 0.01}),
               dp_protections: tuple[str, ...] = ("secagg", "dp-sgd-8", "dp-sgd-1"),
               ) -> tuple[tuple[Any, tuple[str, ...]], ...]:
    return (("centralized", ("none",)), ("local", ("none",)), (fl[0], ("none", *dp_protections)),
            *((a, ("none",)) for a in fl[1:]))


#: the record-level audit: white-box Dirac canaries in DP-SGD's steps (1,000 canaries
#: can certify at most ε ≈ 5.4); the instrumented model has enough coordinates for them
RECORD_AUDIT = {"attack": {"name": "audit-dirac", "m": 1000},
                "model": {"name": "mlp", "hidden": [128]}}
#: the client-level audit: canary clients (Andrew et al. 2024)
CLIENT_AUDIT = {"attack": {"name": "audit-clients", "m": 200}}

MIA = {"name": "mia-loss"}
INVERSION = {"name": "gradinv-idlg", "iterations": 100}

TRACKS: tuple[Track, ...] = (
    Track(
        id="heart-disease", version=1,
        title="Heart disease across 4 real hospitals (FLamby Fed-Heart-Disease)",
        summary="UCI Heart Disease, Cleveland / Hungary / Switzerland / VA Long Beach as the "
                "4 sites (natural split), logistic regression, 20 rounds of 10 local steps, "
                "every hospital every round; sample-level DP.",
        provenance="Sites, split and model follow FLamby's Fed-Heart-Disease (du Terrail et "
                   "al. 2022): the 4 hospitals of the UCI data and its train/test split; "
                   "fedmedbench's default preprocessing (per-site scaling, one copy of the "
                   "duplicated VA Long Beach patient). Run settings are the dataset plugin's "
                   "defaults (batch 16, lr 0.05, 10 local steps, 4 clients a round), the "
                   "quickstart's. Rounds and seeds as the quickstart.",
        dataset={"name": "heart-disease"}, rounds=20, seeds=(0, 1, 2),
        run={"batch_size": 16, "lr": 0.05, "local_steps": 10, "clients_per_round": 4},
        protections=_sample_level(), baselines=_baselines(),
        attacks=(MIA,), audits={"record": RECORD_AUDIT},
        tuning=TuningRule(max_trials=4, baseline_grid={"lr": [0.05, 0.2]}),
    ),
    Track(
        id="icu-support2", version=1,
        title="ICU in-hospital mortality, SUPPORT2 (disease-class sites)",
        summary="SUPPORT2's 9,105 ICU patients, its disease classes as pseudo-sites, the "
                "dataset's default model, 10 rounds; sample-level DP.",
        provenance="SUPPORT2 (Knaus et al. 1995, the Vanderbilt release) with the plugin's "
                   "pseudo-sites and split (its card); run settings are the plugin's defaults "
                   "(batch 64, lr 0.1, 20 local steps).",
        dataset={"name": "support2"}, rounds=10, seeds=(0, 1, 2),
        run={"batch_size": 64, "lr": 0.1, "local_steps": 20},
        protections=_sample_level(), baselines=_baselines(),
        attacks=(MIA,), audits={"record": RECORD_AUDIT},
        tuning=TuningRule(max_trials=4, baseline_grid={"lr": [0.1, 0.3]}),
    ),
    Track(
        id="icu-synthetic-ehr", version=1,
        title="ICU mortality across 200 synthetic hospitals (client-level DP)",
        summary="synthetic-ehr with 200 hospitals of uneven size and shift, half of them "
                "sampled each round, 10 rounds; client-level DP-FedAvg with distributed "
                "noise under SecAgg+ (the server sees only sums).",
        provenance="The synthetic-ehr generator at 200 hospitals (its card: sizes, shifts, "
                   "the label model); 100 hospitals a round and an unweighted mean, as the "
                   "client-level accountant is calibrated for (matrices/privacy.toml's "
                   "settings at 200 instead of 50 hospitals); lr 10 for DP-FedAvg from that "
                   "matrix's validation grid.",
        dataset={"name": "synthetic-ehr", "n_hospitals": 200}, rounds=10, seeds=(0, 1, 2),
        run={"batch_size": 64, "lr": 0.1, "local_steps": 10, "clients_per_round": 100},
        aggregator={"name": "weighted-mean", "by": "uniform"},
        run_overrides={"dp-fedavg": {"lr": 10.0}},
        protections=(
            Protection("none", "none", "all"), Protection("secagg-plus", "secagg-plus", "all"),
            Protection("dp-fedavg-8", [{"name": "dp-fedavg", "epsilon": 8.0, "clip": 1.0,
                                        "delta": 1e-5, "noise": "distributed"}, "secagg-plus"],
                       "eps8"),
            Protection("dp-fedavg-1", [{"name": "dp-fedavg", "epsilon": 1.0, "clip": 1.0,
                                        "delta": 1e-5, "noise": "distributed"}, "secagg-plus"],
                       "eps1")),
        baselines=_baselines(fl=("fedavg",), dp_protections=("secagg-plus", "dp-fedavg-8",
                                                             "dp-fedavg-1")),
        attacks=(MIA,), audits={"client": CLIENT_AUDIT},
        tuning=TuningRule(max_trials=4, baseline_grid={}),
    ),
    Track(
        id="genomics-gse7390", version=1,
        title="Breast-cancer metastasis from expression, GSE7390 (3 sites)",
        summary="GSE7390 (TRANSBIG): distant metastasis from 76 probes and clinical "
                "covariates, 3 IID sites, 20 rounds; sample-level DP.",
        provenance="GSE7390 (Desmedt et al. 2007) as the plugin loads it (its card: probes, "
                   "covariates, split); the plugin's default partitioner (3 IID sites) and "
                   "run settings (batch 16, lr 0.02, 5 local steps, weight decay 0.01).",
        dataset={"name": "gse7390"}, rounds=20, seeds=(0, 1, 2),
        run={"batch_size": 16, "lr": 0.02, "local_steps": 5, "weight_decay": 0.01},
        protections=_sample_level(), baselines=_baselines(),
        attacks=(MIA,), audits={"record": RECORD_AUDIT},
        tuning=TuningRule(max_trials=4, baseline_grid={"lr": [0.02, 0.1]}),
    ),
    Track(
        id="genomics-bladderbatch", version=1,
        title="Bladder cancer from expression, 5 processing batches as sites",
        summary="bladderbatch: 57 samples in 5 processing batches (the sites), cancer vs "
                "non-cancer, 20 rounds; sample-level DP.",
        provenance="bladderbatch (Dyrskjøt et al. 2004, the Bioconductor package) with its "
                   "batches as natural sites (its card); the plugin's run settings (batch 8, "
                   "lr 0.05, 5 local steps).",
        dataset={"name": "bladderbatch"}, rounds=20, seeds=(0, 1, 2),
        run={"batch_size": 8, "lr": 0.05, "local_steps": 5},
        protections=_sample_level(), baselines=_baselines(),
        attacks=(MIA,), audits={"record": RECORD_AUDIT},
        tuning=TuningRule(max_trials=4, baseline_grid={"lr": [0.05, 0.2]}),
    ),
    Track(
        id="imaging-synthetic", version=1,
        title="Lesion images across 4 acquisition sites (synthetic)",
        summary="synthetic-imaging: 28×28 lesions, class from morphology, per-site "
                "acquisition shifts, the default CNN, 10 rounds; sample-level DP, full and "
                "partial CKKS; gradient inversion on every entry.",
        provenance="The synthetic-imaging generator (its card) with its default sites and "
                   "CNN; the optimiser settings matrices/privacy.toml chose on a validation "
                   "split for this dataset (Adam at lr 0.01; DP-SGD: SGD at lr 0.5 for "
                   "per-example gradients clipped to norm 1), batch 32, 10 local steps; the "
                   "partial-HE stack encrypts the convolutional features and sends the head "
                   "in the clear (the inversion study's setting, matrices/inversion.toml).",
        dataset={"name": "synthetic-imaging"}, rounds=10, seeds=(0, 1, 2),
        run={"batch_size": 32, "lr": 0.01, "local_steps": 10, "optimizer": "adam"},
        run_overrides={"dp-sgd": {"optimizer": "sgd", "lr": 0.5}},
        protections=_sample_level((Protection("he-ckks", "he-ckks", "all"),
                                   Protection("he-ckks-partial",
                                              {"name": "he-ckks", "layers": ["features"],
                                               "rest": "plaintext"}, "all"))),
        baselines=_baselines(dp_protections=("secagg", "he-ckks", "he-ckks-partial",
                                             "dp-sgd-8", "dp-sgd-1")),
        attacks=(MIA, INVERSION), audits={"record": {"attack": {"name": "audit-dirac",
                                                                "m": 1000}}},
        tuning=TuningRule(max_trials=4, baseline_grid={}),
    ),
    Track(
        id="imaging-medmnist", version=1,
        title="MedMNIST images from the file you supply (PneumoniaMNIST by default)",
        summary="A MedMNIST 2D subset from its official .npz file (not shipped: its licence "
                "and size), Dirichlet(1) label skew over 4 sites, the default CNN, 10 "
                "rounds; sample-level DP; gradient inversion on every entry.",
        provenance="MedMNIST v2 (Yang et al. 2023), the plugin's defaults (its card): "
                   "pneumoniamnist, 4 Dirichlet(α=1) sites, batch 32, lr 0.05, 10 local "
                   "steps. Point FEDMEDBENCH_MEDMNIST_DIR at the folder holding the file.",
        dataset={"name": "medmnist"}, rounds=10, seeds=(0, 1, 2),
        run={"batch_size": 32, "lr": 0.05, "local_steps": 10},
        protections=_sample_level(), baselines=_baselines(fl=("fedavg",)),
        attacks=(MIA, INVERSION), audits={"record": {"attack": {"name": "audit-dirac",
                                                                "m": 1000}}},
        tuning=TuningRule(max_trials=4, baseline_grid={}), needs_user_files=True,
    ),
)


def track_ids() -> list[str]:
    return [t.id for t in TRACKS]


def get_track(ref: str) -> Track:
    """A track by id (``heart-disease``) or id and version (``heart-disease@1``).

    Raises
    ------
    fedmedbench.ConfigError
        No such track (with a did-you-mean), or a version this fedmedbench
        does not have.
    """
    import difflib

    tid, _, ver = str(ref).partition("@")
    for t in TRACKS:
        if t.id == tid:
            if ver and ver != str(t.version):
                raise ConfigError(f"track {tid!r} is at version {t.version} in this fedmedbench, "
                                  f"not {ver}; install the fedmedbench release that defined "
                                  f"{tid}@{ver}")
            return t
    close = difflib.get_close_matches(tid, track_ids(), n=1, cutoff=0.5)
    hint = f" did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"no track {tid!r};{hint} `fedmedbench tracks` lists them "
                      f"({', '.join(track_ids())})")
