"""Membership inference: was a patient's record in the training data?

- ``mia-loss``: the loss-threshold attack of Yeom, Giacomelli, Fredrikson,
  Jha, "Privacy Risk in Machine Learning: Analyzing the Connection to
  Overfitting", IEEE CSF 2018 (score = −loss).
- ``mia-shadow``: shadow models and a learned attack classifier, Shokri,
  Stronati, Song, Shmatikov, "Membership Inference Attacks Against Machine
  Learning Models", IEEE S&P 2017.
- ``mia-lira``: the likelihood-ratio attack of Carlini, Chien, Nasr, Song,
  Terzis, Tramèr, "Membership Inference Attacks From First Principles",
  IEEE S&P 2022, online (IN and OUT shadow models) and offline (OUT only),
  with Gaussian fits of the logit-scaled confidence and, by default, a
  global variance (their recommendation for few shadow models).

Every attack reports the metrics of :func:`fedmedbench.plugins.attacks._metrics.roc_summary`
and an empirical leakage estimate (``epsilon_estimate``,
:func:`~fedmedbench.plugins.attacks._metrics.estimate_epsilon`) beside the
cell's claimed ε and δ: an estimate, not a lower bound (the members are a
fixed split of one run); the valid one-run lower bound is ``audit-canary``.

Threat models. ``target = "global"``: an outside party with the final global
model (members: every site's training rows, non-members: the test rows; for
the pooled protocol on a dataset with :attr:`FederatedData.pooled_sites`,
the pooled party's rows). ``target = "client"``: the honest-but-curious
server, attacking what it read of one client in the last round
(:func:`client_model`): that client's local model (global + its update) in
plaintext; under partial encryption (``ServerView.readable``: he-ckks with
``layers`` and ``rest = "plaintext"``, or a personalized algorithm that sends
part of the model) the **partially known** local model — the coordinates it
read in the clear from the client's update, the others from the securely
aggregated update where the server holds one, else at the global model's
values; the aggregated model under secure aggregation, and under HE, whose
decrypted sum the server applies (members: still that client's rows).
Shadow-model attacks assume the attacker holds the population (the members
and non-members being scored, not which is which) and trains k shadow models
on random halves of it with the cell's own recipe (``train_shadow``).
"""

from __future__ import annotations

import math
import typing
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np

from fedmedbench import Attack, AttackContext, Range, ServerView, Split

from ._metrics import estimate_epsilon, roc_summary

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: the attacked model (``target``; threat models in the module docstring)
Target = Literal["global", "client"]
TARGETS: tuple[str, ...] = typing.get_args(Target)


# --------------------------------------------------------------------------
# per-example statistics
# --------------------------------------------------------------------------


def logits_of(model: torch.nn.Module, X: np.ndarray, *, batch_size: int = 1024) -> np.ndarray:
    """The model's logits on ``X`` (float64)."""
    import torch

    with torch.no_grad():
        return _logits_of(model, X, batch_size=batch_size)


def _logits_of(model: torch.nn.Module, X: np.ndarray, *, batch_size: int) -> np.ndarray:
    import torch

    model.eval()
    out = [model(torch.as_tensor(X[i:i + batch_size], dtype=torch.float32)).double().numpy()
           for i in range(0, len(X), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0))


def loss_scores(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """−cross-entropy per example (higher: more likely a member; Yeom et al.)."""
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return logp[np.arange(len(y)), y]


def logit_confidence(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``log p_y − log(1 − p_y)`` computed stably as ``z_y − logsumexp(z_{≠y})``
    (the statistic LiRA fits Gaussians to)."""
    zy = logits[np.arange(len(y)), y]
    other = logits.copy()
    other[np.arange(len(y)), y] = -np.inf
    m = other.max(1)
    return zy - (m + np.log(np.exp(other - m[:, None]).sum(1)))


def lira_scores(target_conf: np.ndarray, shadow_conf: np.ndarray, in_mask: np.ndarray, *,
                online: bool = True, fixed_variance: bool = True) -> np.ndarray:
    """LiRA membership scores (Carlini et al. 2022).

    Parameters
    ----------
    target_conf : (n,)
        The target model's logit confidence on each example.
    shadow_conf : (k, n)
        Each shadow model's logit confidence on each example.
    in_mask : (k, n) bool
        Whether each example was in each shadow model's training set.
    online : bool
        Likelihood ratio of the IN and OUT Gaussians; otherwise the one-sided
        OUT z-score (offline LiRA).
    fixed_variance : bool
        One variance per side across all examples (for few shadow models).
    """
    sc = np.asarray(shadow_conf, dtype=np.float64)
    mask = np.asarray(in_mask, dtype=bool)

    def fit(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cnt = sel.sum(0)
        mu = np.where(cnt > 0, (sc * sel).sum(0) / np.maximum(cnt, 1), np.nan)
        dev = np.where(sel, sc - np.nan_to_num(mu), 0.0)
        if fixed_variance:
            pooled = (dev ** 2).sum() / max(1, cnt.sum() - (cnt > 0).sum())
            sd = np.full(sc.shape[1], math.sqrt(pooled))
        else:
            sd = np.sqrt((dev ** 2).sum(0) / np.maximum(cnt - 1, 1))
        return mu, np.maximum(sd, 1e-3), cnt

    mu_out, sd_out, c_out = fit(~mask)
    # examples without OUT shadows borrow the mean over the others
    mu_out = np.where(c_out > 0, mu_out, np.nanmean(mu_out))
    if not online:
        return (target_conf - mu_out) / sd_out
    mu_in, sd_in, c_in = fit(mask)
    shift = np.nanmean(mu_in - mu_out)
    mu_in = np.where(c_in > 0, mu_in, mu_out + shift)
    x = target_conf
    return (-0.5 * ((x - mu_in) / sd_in) ** 2 - np.log(sd_in)) - (
        -0.5 * ((x - mu_out) / sd_out) ** 2 - np.log(sd_out))


def shadow_features(logits: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """Shokri-style attack features: the sorted probability vector (top 10),
    the logit confidence and the one-hot label."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    top = -np.sort(-p, axis=1)[:, :min(num_classes, 10)]
    onehot = np.eye(num_classes)[y]
    return np.column_stack([top, logit_confidence(logits, y), onehot])


# --------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------


def _subsample(split: Split, k: int, rng: np.random.Generator) -> Split:
    if k <= 0 or len(split) <= k:
        return split
    return split.subset(np.sort(rng.choice(len(split), size=k, replace=False)))


def client_model(view: ServerView, c: int) -> tuple[torch.Tensor, str] | None:
    """The server's best reconstruction of client ``c``'s local model from one
    round's view, and how it was made (``"round-..."`` when it is the
    aggregated model, not the client's own); ``None`` when the view holds
    nothing of that client (ciphertexts only).

    Readable coordinates (``view.readable[c]``, any mask) come from the
    client's own update; the others from the aggregate when the view has one
    (the server's best estimate of any one client's update), else they stay
    at the global model's values. A client without a mask whose update is in
    ``view.updates`` was read in full."""
    import torch

    w = view.global_params
    agg = view.aggregate
    if c in view.readable and c in view.updates:
        mask = torch.as_tensor(np.asarray(view.readable[c], dtype=bool))
        fill = agg if agg is not None else torch.zeros_like(w)
        est = torch.where(mask, view.updates[c].to(w.dtype), fill.to(w.dtype))
        k, d = int(mask.sum()), int(mask.numel())
        rest = ("the securely aggregated update of "
                f"{len(view.clients)} clients" if agg is not None else "the global model")
        return w + est, (f"partially known local model of round {view.round}: "
                         f"{k} of {d} coordinates read in the clear from its update, the "
                         f"other {d - k} from {rest}")
    if c in view.updates:
        return w + view.updates[c], (f"local model of round {view.round} (global + its "
                                     f"plaintext update)")
    if view.kind == "aggregate" and agg is not None:
        return w + agg, (f"round-{view.round} global model plus the securely aggregated "
                         f"update of {len(view.clients)} clients (the server sees only "
                         f"their sum)")
    return None


def resolve_target(ctx: AttackContext, target: str, client: int
                   ) -> tuple[torch.Tensor, Split, Split, dict[str, Any]] | dict[str, str]:
    """(params, members, non-members, description) of the model attacked, or
    ``{"not_applicable": reason}``."""
    data = ctx.data
    if target == "global":
        if ctx.protocol in ("isolated", "personalized"):
            site = data.sites[0]
            return ctx.site_params.get(0, ctx.final_params), site.train, site.test, {
                "model": f"site {site.name}'s own final model ({ctx.protocol} protocol: no "
                         f"global model exists)", "attacker": "outside party with the model"}
        if ctx.protocol == "pooled" and data.pooled_sites is not None:
            members = Split.concat([s.train for s in data.pooled_sites])
            nonmembers = Split.concat([s.test for s in data.pooled_sites])
            return ctx.final_params, members, nonmembers, {
                "model": "final pooled model", "attacker": "outside party with the final model",
                "members": "the pooled party's training rows (pooled preprocessing)",
                "nonmembers": "every site's test rows (pooled preprocessing)"}
        return ctx.final_params, data.pooled_train(), data.pooled_test(), {
            "model": "final global model", "attacker": "outside party with the final model",
            "members": "every site's training rows", "nonmembers": "every site's test rows"}
    if not ctx.server_views:
        return {"not_applicable": f"{ctx.protocol} protocol: no server receives client updates"}
    rnd = max(ctx.server_views)
    view = ctx.server_views[rnd]
    c = client if client in view.clients else (view.clients[0] if view.clients else None)
    if c is None:
        return {"not_applicable": f"no client took part in round {rnd}"}
    members, nonmembers, name = data.sites[c].train, data.sites[c].test, data.sites[c].name
    got = client_model(view, c)
    if got is None and view.kind == "ciphertext":
        return {"not_applicable": f"under {'+'.join(ctx.mechanisms) or 'HE'} the server reads "
                                  f"only ciphertexts (the key holder is a separate party)"}
    if got is None:
        return {"not_applicable": f"the round-{rnd} view holds nothing readable of client "
                                  f"{name}"}
    params, how = got
    desc = {"model": how if how.startswith("round-") else f"client {name}'s {how}",
            "attacker": "honest-but-curious server", "client": name}
    if c in view.readable:
        desc["readable_coordinates"] = int(np.asarray(view.readable[c]).sum())
    return params, members, nonmembers, {**desc, **_partial(view)}


def _partial(view: Any) -> dict[str, str]:
    """Under a partial send (FedBN, FedRep, FedPer) the server's picture of a
    client's model holds its own copy of the parameters never sent."""
    if view.sent is None:
        return {}
    sent = int(np.sum(view.sent))
    return {"view_part": f"the {sent} of {len(view.sent)} parameters the clients send; the "
                        f"{len(view.sent) - sent} they keep are the server's copy, never "
                        f"updated by them"}


def _claim(ctx: AttackContext, audit_delta: float) -> tuple[float | None, float]:
    eps = ctx.privacy.get("epsilon")
    delta = ctx.privacy.get("delta")
    return (float(eps) if eps is not None else None,
            float(delta) if delta is not None else audit_delta)


def _finish(ctx: AttackContext, scores_in: np.ndarray, scores_out: np.ndarray,
            audit_delta: float, extra: dict[str, Any]) -> dict[str, Any]:
    eps, delta = _claim(ctx, audit_delta)
    res = roc_summary(scores_in, scores_out)
    est = estimate_epsilon(scores_in, scores_out, delta=delta, claimed_epsilon=eps,
                           seed=ctx.seed)
    est["accountant"] = ctx.privacy.get("accountant")
    est["note"] = ("an estimate of leakage, not a lower bound: the members are the fixed "
                   "training rows of one run, not randomised, so the examples are not "
                   "independent trials; the valid one-run bound is the audit-canary attack "
                   "(Steinke, Nasr, Jagielski 2023)")
    res["leakage_estimate"] = est
    res["epsilon_estimate"] = est["epsilon_estimate"]
    res.update(extra)
    return res


# --------------------------------------------------------------------------
# attacks
# --------------------------------------------------------------------------


class MiaLoss(Attack):
    """Loss-threshold membership inference (Yeom et al. 2018).

    Parameters
    ----------
    target : {"global", "client"}, default "global"
        The final global model (an outside party) or what the server read of
        one client in the last round (module docstring).
    client : int, default 0
        ``target = "client"``: index of the attacked client (>= 0).
    max_examples : int, default 5000
        Members and non-members scored at most, each (>= 0; 0: all).
    audit_delta : float, default 1e-5
        δ of the leakage estimate when the cell has no DP claim, in [0, 1).
    """

    name = "mia-loss"

    def __init__(self, *, target: Target = "global", client: Annotated[int, Range(ge=0)] = 0,
                 max_examples: Annotated[int, Range(ge=0)] = 5000,
                 audit_delta: Annotated[float, Range(ge=0, lt=1)] = 1e-5) -> None:
        self.target, self.client = target, client
        self.max_examples, self.audit_delta = max_examples, audit_delta

    def evaluate(self, ctx: AttackContext) -> dict[str, Any]:
        t = resolve_target(ctx, self.target, self.client)
        if isinstance(t, dict):
            return t
        params, members, nonmembers, desc = t
        rng = np.random.default_rng([ctx.seed, 11])
        members = _subsample(members, self.max_examples, rng)
        nonmembers = _subsample(nonmembers, self.max_examples, rng)
        model = ctx.model(params)
        s_in = loss_scores(logits_of(model, members.X), members.y)
        s_out = loss_scores(logits_of(model, nonmembers.X), nonmembers.y)
        return _finish(ctx, s_in, s_out, self.audit_delta, {
            "target": self.target,
            "assumptions": {**desc, "knowledge": "the example and its label; the model's loss",
                            "shadow_models": 0}})


class _ShadowAttack(Attack):
    """Shared machinery: k shadow models on random halves of the population.

    Parameters
    ----------
    n_shadows : int, default 8
        Shadow models k (>= 2).
    max_examples : int, default 1000
        Members and non-members scored at most, each (>= 0; 0: all).
    audit_delta : float, default 1e-5
        δ of the leakage estimate when the cell has no DP claim, in [0, 1).
    """

    def __init__(self, *, n_shadows: Annotated[int, Range(ge=2)] = 8,
                 max_examples: Annotated[int, Range(ge=0)] = 1000,
                 audit_delta: Annotated[float, Range(ge=0, lt=1)] = 1e-5) -> None:
        self.n_shadows, self.max_examples, self.audit_delta = n_shadows, max_examples, audit_delta

    def population(self, ctx: AttackContext) -> tuple[torch.Tensor, Split, np.ndarray,
                                                        dict[str, Any]] | dict[str, str]:
        t = resolve_target(ctx, "global", 0)
        if isinstance(t, dict):
            return t
        params, members, nonmembers, desc = t
        rng = np.random.default_rng([ctx.seed, 12])
        members = _subsample(members, self.max_examples, rng)
        nonmembers = _subsample(nonmembers, self.max_examples, rng)
        pop = Split.concat([members, nonmembers])
        is_member = np.r_[np.ones(len(members), bool), np.zeros(len(nonmembers), bool)]
        return params, pop, is_member, desc

    def shadows(self, ctx: AttackContext, pop: Split) -> tuple[np.ndarray, np.ndarray]:
        """(k, n, C) shadow logits and the (k, n) IN mask; cached per context
        so that mia-shadow and mia-lira of one cell share their shadows."""
        cache = ctx.__dict__.setdefault("_fedmedbench_shadow_cache", {})
        key = (self.n_shadows, self.max_examples, len(pop))
        if key in cache:
            return cache[key]
        rng = np.random.default_rng([ctx.seed, 13])
        n = len(pop)
        masks = np.zeros((self.n_shadows, n), dtype=bool)
        logits = []
        for j in range(self.n_shadows):
            masks[j, rng.permutation(n)[: n // 2]] = True
            p = ctx.train_shadow(pop.subset(np.flatnonzero(masks[j])), ctx.seed * 1000 + 17 + j)
            logits.append(logits_of(ctx.model(p), pop.X))
        cache[key] = (np.stack(logits), masks)
        return cache[key]

    def _assumptions(self, desc: dict[str, Any], ctx: AttackContext) -> dict[str, Any]:
        return {**desc, "knowledge": "the population (members and non-members, not which is "
                                     "which), the architecture and training recipe",
                "shadow_models": self.n_shadows,
                "shadow_training": f"{ctx.settings.optimizer} lr={ctx.settings.lr} "
                                   f"batch={ctx.settings.batch_size}, centralized on a random "
                                   f"half of the population, {ctx.rounds} rounds' worth of steps"}


class MiaLira(_ShadowAttack):
    """Likelihood-ratio membership inference with shadow models (Carlini et al. 2022).

    Parameters
    ----------
    n_shadows, max_examples, audit_delta
        As mia-shadow's: shadow models (>= 2), members and non-members
        scored at most (>= 0; 0: all), δ when the cell has no DP claim.
    mode : {"online", "offline"}, default "online"
        Online: the likelihood ratio of Gaussians fitted to IN and OUT
        shadow models; offline: the one-sided OUT z-score.
    fixed_variance : bool, default True
        One variance per side across all examples (the paper's advice for
        few shadow models); false: one per example.
    """

    name = "mia-lira"

    def __init__(self, *, n_shadows: Annotated[int, Range(ge=2)] = 8,
                 mode: Literal["online", "offline"] = "online",
                 fixed_variance: bool = True, max_examples: Annotated[int, Range(ge=0)] = 1000,
                 audit_delta: Annotated[float, Range(ge=0, lt=1)] = 1e-5) -> None:
        super().__init__(n_shadows=n_shadows, max_examples=max_examples, audit_delta=audit_delta)
        self.mode, self.fixed_variance = mode, fixed_variance

    def evaluate(self, ctx: AttackContext) -> dict[str, Any]:
        t = self.population(ctx)
        if isinstance(t, dict):
            return t
        params, pop, is_member, desc = t
        sh_logits, masks = self.shadows(ctx, pop)
        conf_t = logit_confidence(logits_of(ctx.model(params), pop.X), pop.y)
        conf_s = np.stack([logit_confidence(lg, pop.y) for lg in sh_logits])
        scores = {m: lira_scores(conf_t, conf_s, masks, online=m == "online",
                                 fixed_variance=self.fixed_variance)
                  for m in ("online", "offline")}
        s = scores[self.mode]
        other = "offline" if self.mode == "online" else "online"
        o = roc_summary(scores[other][is_member], scores[other][~is_member])
        o.pop("roc")
        return _finish(ctx, s[is_member], s[~is_member], self.audit_delta, {
            "target": "global", "mode": self.mode, other: o,
            "assumptions": {**self._assumptions(desc, ctx),
                            "variance": "global" if self.fixed_variance else "per-example"}})


class MiaShadow(_ShadowAttack):
    """Shadow-model membership inference with a learned attack model (Shokri et al. 2017)."""

    name = "mia-shadow"

    def evaluate(self, ctx: AttackContext) -> dict[str, Any]:
        from sklearn.ensemble import HistGradientBoostingClassifier

        t = self.population(ctx)
        if isinstance(t, dict):
            return t
        params, pop, is_member, desc = t
        C = ctx.data.task.num_classes
        sh_logits, masks = self.shadows(ctx, pop)
        Xa = np.concatenate([shadow_features(lg, pop.y, C) for lg in sh_logits])
        ya = masks.reshape(-1).astype(int)
        clf = HistGradientBoostingClassifier(max_iter=100, random_state=ctx.seed % 2**32)
        clf.fit(Xa, ya)
        s = clf.predict_proba(shadow_features(logits_of(ctx.model(params), pop.X), pop.y, C))[:, 1]
        return _finish(ctx, s[is_member], s[~is_member], self.audit_delta, {
            "target": "global",
            "assumptions": {**self._assumptions(desc, ctx),
                            "attack_model": "gradient-boosted trees on sorted probabilities, "
                                            "logit confidence and label"}})


COMPONENTS = (MiaLoss, MiaShadow, MiaLira)
