"""Attacks in a separate process (``[evaluate] isolate = true``, ``--isolate-attacks``).

In-process plugins are trusted code: they share the interpreter with the
engine. A submitted attack is not, so its cell's attacks can run in a
process of their own that receives only the serialized
:class:`~fedmedbench.AttackContext` — arrays in an ``.npz`` read with
``allow_pickle=False`` and values in a JSON file — and the attacks'
configurations; nothing of the run (no party, no mechanism, no secret)
exists in that process. It rebuilds the attack components from the plugin
registry (the same entry points and ``FEDMEDBENCH_PLUGINS``), the model from
its spec and the cell seed (the same seeded initialisation), and writes the
results as JSON. The results equal the in-process ones: every attack starts
from the same seeded generators (``fedmedbench.engine.evaluate_attack``).

Each cell's attacks run in a child forked from a fork server
(:class:`_ForkServer`, ``python -m fedmedbench.isolate --serve``): a fresh
interpreter started once per run that imports only libraries
(:data:`PRELOAD`) and never holds any of the run's objects, so a cell pays
a fork, not a ~3 s interpreter start. Without ``os.fork`` (or with
``FEDMEDBENCH_ISOLATE_FRESH=1``) each cell gets a fresh interpreter:
``python -m fedmedbench.isolate FOLDER``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["serialize", "deserialize", "run_isolated", "main", "DEFAULT_TIMEOUT"]

#: seconds an isolated attack process may run before its attacks are recorded failed
DEFAULT_TIMEOUT = 3600.0
_ARRAYS = "arrays.npz"
_META = "context.json"
_ATTACKS = "attacks.json"
_RESULTS = "results.json"
_LOG = "output.txt"


class _Arrays:
    """Numbered arrays for the ``.npz`` (keys ``a0``, ``a1``, ...)."""

    def __init__(self) -> None:
        self.items: dict[str, np.ndarray] = {}

    def put(self, v: Any) -> dict[str, Any] | None:
        import torch

        if v is None:
            return None
        if isinstance(v, torch.Tensor):
            arr, kind = v.detach().cpu().numpy(), "torch"
        else:
            arr, kind = np.asarray(v), "numpy"
        if arr.dtype == object:
            raise TypeError("an object array cannot be serialized without pickle")
        key = f"a{len(self.items)}"
        self.items[key] = arr
        return {"key": key, "kind": kind}


def _get(arrays: Any, ref: dict[str, Any] | None) -> Any:
    import torch

    if ref is None:
        return None
    arr = arrays[ref["key"]]
    return torch.from_numpy(np.array(arr)) if ref["kind"] == "torch" else np.array(arr)


def _pairs(d: dict[int, Any], put: Any) -> list[list[Any]]:
    return [[int(k), put(v)] for k, v in d.items()]


def serialize(actx: Any, folder: Path, *, shadow_spec: dict[str, Any]) -> None:
    """Write ``actx`` to ``folder`` (:data:`_META` and :data:`_ARRAYS`)."""
    import dataclasses

    from fedmedbench.context import BatchReplay

    folder = Path(folder)
    A = _Arrays()
    put = A.put
    d = actx.data

    def split(s: Any) -> dict[str, Any] | None:
        return None if s is None else {"X": put(s.X), "y": put(s.y)}

    def sites(ss: Any) -> list[dict[str, Any]] | None:
        if ss is None:
            return None
        return [{"name": s.name, "train": split(s.train), "test": split(s.test),
                 "quality": s.quality} for s in ss]

    views = []
    for rnd, v in actx.server_views.items():
        views.append({
            "round": int(rnd), "kind": v.kind, "clients": [int(c) for c in v.clients],
            "global_params": put(v.global_params),
            "updates": _pairs(v.updates, put),
            "num_examples": [[int(k), int(n)] for k, n in v.num_examples.items()],
            "aggregate": put(v.aggregate),
            "readable": _pairs(v.readable, put),
            "metrics": {k: [[int(c), float(x)] for c, x in m.items()]
                        for k, m in v.metrics.items()},
            "extra": {k: _pairs(m, put) for k, m in v.extra.items()},
            "sent": put(v.sent),
            "extra_sums": {k: put(t) for k, t in v.extra_sums.items()}})
    replay = actx.client_batches
    meta = {
        "cell": actx.cell, "privacy": actx.privacy, "rounds": int(actx.rounds),
        "seed": int(actx.seed), "protocol": actx.protocol, "mechanisms": list(actx.mechanisms),
        "artifacts_dir": actx.artifacts_dir, "chance_level": bool(actx.chance_level),
        "model_spec": actx.model_spec, "shadow_spec": shadow_spec,
        "settings": dataclasses.asdict(actx.settings),
        "task": {**dataclasses.asdict(d.task), "input_shape": list(d.task.input_shape)},
        "data": {"sites": sites(d.sites), "public": split(d.public), "natural": d.natural,
                 "pooled_sites": sites(d.pooled_sites)},
        "final_params": put(actx.final_params),
        "site_params": _pairs(actx.site_params, put),
        "initial_params": put(actx.initial_params),
        "final_buffers": put(actx.final_buffers),
        "site_buffers": _pairs(actx.site_buffers, put),
        "views": views,
        "canaries": _canaries_meta(actx.canaries, put),
        "canary_problem": actx.canary_problem,
        "replay": None if not isinstance(replay, BatchReplay) else {
            "rows": [[int(c), split(s)] for c, s in replay.rows.items()],
            "seeds": [[int(c), int(x)] for c, x in replay.seeds.items()],
            "batch_size": int(replay.batch_size)},
    }
    np.savez(folder / _ARRAYS, **A.items)  # type: ignore[arg-type]
    (folder / _META).write_text(json.dumps(meta))


def _canaries_meta(can: Any, put: Any) -> dict[str, Any] | None:
    from fedmedbench.context import ClientCanaries, GradientCanaries

    if can is None:
        return None
    if isinstance(can, ClientCanaries):
        return {"kind": "clients", "directions": put(can.directions),
                "included": put(can.included)}
    if isinstance(can, GradientCanaries):
        return {"kind": "gradients", "coords": put(can.coords), "site": put(can.site),
                "included": put(can.included)}
    return {"kind": "records", "X": put(can.X), "y": put(can.y), "site": put(can.site),
            "included": put(can.included)}


def deserialize(folder: Path, registry: Any) -> Any:
    """The :class:`~fedmedbench.AttackContext` :func:`serialize` wrote."""
    from fedmedbench.cell import model_factory
    from fedmedbench.components import FederatedData, Site, Split, Task
    from fedmedbench.context import (
        AttackContext,
        BatchReplay,
        Canaries,
        ClientCanaries,
        GradientCanaries,
        ShadowTrainer,
    )
    from fedmedbench.messages import ServerView
    from fedmedbench.training import RunSettings

    folder = Path(folder)
    meta = json.loads((folder / _META).read_text())
    with np.load(folder / _ARRAYS, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}

    def get(ref: Any) -> Any:
        return _get(arrays, ref)

    def split(s: Any) -> Split | None:
        return None if s is None else Split(get(s["X"]), get(s["y"]))

    def sites(ss: Any) -> list[Site] | None:
        if ss is None:
            return None
        return [Site(s["name"], split(s["train"]), split(s["test"]), s["quality"]) for s in ss]

    def pairs(p: list[list[Any]]) -> dict[int, Any]:
        return {int(k): get(v) for k, v in p}

    t = meta["task"]
    task = Task(kind=t["kind"], num_classes=int(t["num_classes"]),
                input_shape=tuple(t["input_shape"]), metric=t["metric"], model=t["model"],
                model_kwargs=t["model_kwargs"], feature_names=t["feature_names"])
    dd = meta["data"]
    data = FederatedData(task=task, sites=sites(dd["sites"]), public=split(dd["public"]),
                         natural=dd["natural"], pooled_sites=sites(dd["pooled_sites"]))
    seed = int(meta["seed"])
    shape, classes = tuple(task.input_shape), int(task.num_classes)
    factory = model_factory(registry.build("model", dict(meta["model_spec"])), shape, classes,
                            seed)
    shadow = model_factory(registry.build("model", dict(meta["shadow_spec"])), shape, classes,
                           seed)
    settings = RunSettings(**meta["settings"])
    views = {}
    for v in meta["views"]:
        views[int(v["round"])] = ServerView(
            round=int(v["round"]), kind=v["kind"], clients=list(v["clients"]),
            global_params=get(v["global_params"]), updates=pairs(v["updates"]),
            num_examples={int(k): int(n) for k, n in v["num_examples"]},
            aggregate=get(v["aggregate"]), readable=pairs(v["readable"]),
            metrics={k: {int(c): float(x) for c, x in m} for k, m in v["metrics"].items()},
            extra={k: pairs(m) for k, m in v["extra"].items()}, sent=get(v["sent"]),
            extra_sums={k: get(r) for k, r in v["extra_sums"].items()})
    can = meta["canaries"]
    canaries: Any = None
    if can is not None and can["kind"] == "clients":
        canaries = ClientCanaries(get(can["directions"]), get(can["included"]))
    elif can is not None and can["kind"] == "gradients":
        canaries = GradientCanaries(get(can["coords"]), get(can["site"]), get(can["included"]))
    elif can is not None:
        canaries = Canaries(get(can["X"]), get(can["y"]), get(can["site"]), get(can["included"]))
    rp = meta["replay"]
    replay = None if rp is None else BatchReplay(
        rows={int(c): split(s) for c, s in rp["rows"]},
        seeds={int(c): int(x) for c, x in rp["seeds"]}, batch_size=int(rp["batch_size"]))
    return AttackContext(
        cell=meta["cell"], data=data, model_factory=factory,
        final_params=get(meta["final_params"]), server_views=views, privacy=meta["privacy"],
        settings=settings, rounds=int(meta["rounds"]), seed=seed, protocol=meta["protocol"],
        train_shadow=ShadowTrainer(shadow(), settings, int(meta["rounds"])),
        mechanisms=list(meta["mechanisms"]), site_params=pairs(meta["site_params"]),
        artifacts_dir=meta["artifacts_dir"], client_batches=replay,
        chance_level=bool(meta["chance_level"]), canaries=canaries,
        initial_params=get(meta["initial_params"]), final_buffers=get(meta["final_buffers"]),
        site_buffers=pairs(meta["site_buffers"]), model_spec=meta["model_spec"],
        canary_problem=meta.get("canary_problem"))


def _failed(message: str, attacks: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    return {key: {"failed": {"type": "IsolatedAttackError", "message": message,
                             "plugin": None, "component": cfg.get("name"), "hook": "evaluate"}}
            for key, cfg in attacks}


def run_isolated(attacks: list[tuple[str, dict[str, Any]]], actx: Any, *,
                 shadow_spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``attacks`` (``(key, config)`` pairs) on ``actx`` in a separate
    process; their results by key (a process that fails or runs past
    ``timeout`` seconds fails every attack it held, with the reason)."""
    with tempfile.TemporaryDirectory(prefix="fedmedbench-attacks-") as tmp:
        folder = Path(tmp)
        serialize(actx, folder, shadow_spec=shadow_spec)
        (folder / _ATTACKS).write_text(json.dumps([[k, c] for k, c in attacks]))
        limit = timeout or DEFAULT_TIMEOUT
        code = _SERVER.run(folder, limit)
        if code is None:
            return _failed(f"the isolated attack process ran past {limit:g} s and was "
                           f"stopped", attacks)
        out = folder / _RESULTS
        if code != 0 or not out.is_file():
            log = folder / _LOG
            text = log.read_text(errors="replace") if log.is_file() else ""
            tail = text.strip().splitlines()[-3:]
            return _failed(f"the isolated attack process exited with status {code}"
                           f"{': ' + ' | '.join(tail) if tail else ''}", attacks)
        res = json.loads(out.read_text())
        if not isinstance(res, dict):
            return _failed("the isolated attack process wrote no results", attacks)
        return {k: res.get(k, {"failed": {"type": "IsolatedAttackError",
                                          "message": "no result for this attack",
                                          "plugin": None, "component": c.get("name"),
                                          "hook": "evaluate"}}) for k, c in attacks}


#: what the fork server imports before it forks attack processes: libraries only (the
#: attacks' own modules load in each child, from the run's environment); ~3 s of every
#: fresh interpreter's start here, paid once per run instead of once per cell
PRELOAD = ("torch", "sklearn.metrics", "scipy.stats", "fedmedbench.engine",
           "fedmedbench.isolate")


class _ForkServer:
    """Attack processes forked from a server process (``python -m
    fedmedbench.isolate --serve``): a fresh interpreter, started by this
    process and never a copy of it, that imports :data:`PRELOAD` and then
    forks one child per cell. A child holds what the server imported, the
    run's environment and import path (sent with each request, so it loads
    the plugins a fresh interpreter would) and the cell's folder: nothing of
    the run. Where ``os.fork`` is missing (or ``FEDMEDBENCH_ISOLATE_FRESH=1``)
    each cell gets a fresh interpreter instead.

    Protocol, a JSON line each way: the request ``{"folder", "environ",
    "path"}``; the replies ``{"pid"}`` when the child starts and ``{"exit"}``
    when it ends."""

    def __init__(self) -> None:
        import threading

        self.proc: subprocess.Popen[str] | None = None
        self.lock = threading.Lock()

    def run(self, folder: Path, limit: float) -> int | None:
        """:func:`main` on ``folder`` in a child: its exit status, or ``None``
        when it ran past ``limit`` seconds (it is then killed)."""
        if not hasattr(os, "fork") or os.environ.get("FEDMEDBENCH_ISOLATE_FRESH") == "1":
            return _run_fresh(folder, limit)
        with self.lock:  # one request at a time on the server's pipes
            try:
                return self._request(folder, limit)
            except (OSError, ValueError, EOFError) as exc:  # the server died: a fresh one next
                self.close()
                raise RuntimeError(f"the attack fork server failed: {exc}") from exc

    def _start(self) -> subprocess.Popen[str]:
        if self.proc is None or self.proc.poll() is not None:
            import atexit

            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedmedbench.isolate", "--serve"], env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            atexit.register(self.close)
        return self.proc

    def _reply(self, proc: subprocess.Popen[str], deadline: float | None) -> dict[str, Any]:
        import select
        import time

        assert proc.stdout is not None
        if deadline is not None:
            left = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if not ready:
                raise TimeoutError
        line = proc.stdout.readline()
        if not line:
            raise EOFError("the server closed its output")
        return dict(json.loads(line))

    def _request(self, folder: Path, limit: float) -> int | None:
        import signal
        import time

        proc = self._start()
        assert proc.stdin is not None
        proc.stdin.write(json.dumps({"folder": str(folder), "environ": dict(os.environ),
                                     "path": list(sys.path)}) + "\n")
        proc.stdin.flush()
        pid = int(self._reply(proc, time.monotonic() + 120)["pid"])
        try:
            return int(self._reply(proc, time.monotonic() + limit)["exit"])
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._reply(proc, time.monotonic() + 60)  # the server reports the kill
            return None

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_SERVER = _ForkServer()


def _run_fresh(folder: Path, limit: float) -> int | None:
    """:func:`main` on ``folder`` in a fresh interpreter: its exit status, or
    ``None`` past ``limit`` seconds."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
    try:
        with open(folder / _LOG, "wb") as log:
            proc = subprocess.run([sys.executable, "-m", "fedmedbench.isolate", str(folder)],
                                  env=env, stdout=log, stderr=log, timeout=limit)
    except subprocess.TimeoutExpired:
        return None
    return proc.returncode


def serve() -> int:
    """The fork server's loop (``python -m fedmedbench.isolate --serve``):
    import :data:`PRELOAD`, then for each request fork a child that runs
    :func:`main` on its folder; ends when its input closes."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: never returns
            _child(str(req["folder"]), dict(req["environ"]), list(req["path"]))
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.write(json.dumps({"exit": code}) + "\n")
        out.flush()
    return 0


def _child(folder: str, environ: dict[str, str], path: list[str]) -> None:
    """A forked child: the run's environment and path, its output to the
    folder's log, no input; :func:`main`, then exit with its status."""
    code = 1
    try:
        fd = os.open(os.path.join(folder, _LOG), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - fd 1 is the log
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        os.environ.clear()
        os.environ.update(environ)
        sys.path[:] = path
        code = main([folder])
    except BaseException:  # noqa: BLE001 - the status and the log say what happened
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """``python -m fedmedbench.isolate FOLDER``: evaluate the attacks of
    ``FOLDER/attacks.json`` on the context there; write ``results.json``."""
    import torch

    from fedmedbench.engine import evaluate_attack
    from fedmedbench.errors import ConfigError
    from fedmedbench.registry import get_registry

    args = sys.argv[1:] if argv is None else argv
    if args == ["--serve"]:
        return serve()
    if len(args) != 1:
        print("usage: python -m fedmedbench.isolate FOLDER", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    folder = Path(args[0])
    reg = get_registry()
    actx = deserialize(folder, reg)
    attacks = json.loads((folder / _ATTACKS).read_text())
    results: dict[str, Any] = {}
    for key, cfg in attacks:
        try:
            attack = reg.build("attack", dict(cfg))
        except ConfigError as exc:
            results[key] = {"failed": {"type": "ConfigError", "message": str(exc),
                                       "plugin": None, "component": cfg.get("name"),
                                       "hook": "evaluate"}}
            continue
        results[key] = evaluate_attack(attack, actx)
    (folder / _RESULTS).write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
