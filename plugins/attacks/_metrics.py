"""Metrics shared by the attack family: membership-inference ROC summaries,
an empirical leakage estimate, and image-reconstruction scores.

Membership inference (members are the positive class; a higher score means
"more likely a member"): AUC, best balanced accuracy, advantage
max|TPR − FPR| (Yeom et al. 2018), and TPR at a fixed FPR read as the largest
TPR over thresholds whose FPR is ``<=`` the target (Carlini et al. 2022,
"Membership Inference Attacks From First Principles", IEEE S&P).

Leakage estimate: an (ε, δ)-DP mechanism bounds every membership test by
``TPR <= e^ε·FPR + δ`` and ``1 − FPR <= e^ε·(1 − TPR) + δ`` (Kairouz et al.
2015). With Clopper–Pearson intervals on the measured rates this gives the
ε-form of the Jagielski, Ullman, Oprea ("Auditing Differentially Private
Machine Learning: How Private is Private SGD?", NeurIPS 2020) and Nasr,
Song, Thakurta, Papernot, Carlini ("Adversary Instantiation", IEEE S&P 2021)
audits, whose confidence holds over many training runs. Here the threshold
is chosen on one half of the scores and the number computed on the other,
all from **one** run whose members are a fixed train/test split, not
randomised: the examples are not independent trials, so the number is an
**estimate** of leakage (:func:`estimate_epsilon`), not a lower bound. The
valid one-run lower bound needs canaries included at random (Steinke, Nasr,
Jagielski 2023): the ``audit-canary`` attack (:mod:`.audit`).

Images: MSE, PSNR and SSIM on images in [0, 1] from scikit-image
(``skimage.metrics``), after matching reconstructions to ground truth with
the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    pass

__all__ = [
    "roc_summary",
    "clopper_pearson",
    "estimate_epsilon",
    "dp_bound_check",
    "match_images",
    "label_accuracy",
    "save_image_grid",
]

#: FPR grid (log-spaced low end plus a linear part) the ROC points are read at
_ROC_GRID = np.unique(np.concatenate([[0.0], np.logspace(-4, 0, 41), np.linspace(0, 1, 21)]))


def _rates(member_scores: np.ndarray, nonmember_scores: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FPR, TPR and thresholds of "member iff score >= threshold", every threshold."""
    from sklearn.metrics import roc_curve

    y = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    s = np.concatenate([member_scores, nonmember_scores]).astype(np.float64)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thr


def _check_scores(member_scores: Any, nonmember_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if len(m) == 0 or len(n) == 0:
        raise ValueError(f"membership scores need members and non-members; got {len(m)} "
                         f"members and {len(n)} non-members")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("membership scores contain NaN or infinity")
    return m, n


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """The largest TPR over thresholds whose FPR is ``<= target``."""
    ok = fpr <= target + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def roc_summary(member_scores: Any, nonmember_scores: Any) -> dict[str, Any]:
    """Membership-inference metrics of one attack's scores.

    Parameters
    ----------
    member_scores, nonmember_scores : array-like
        Attack scores, higher meaning "member".

    Returns
    -------
    dict
        ``auc``, ``balanced_accuracy`` (best over thresholds), ``advantage``
        (max |TPR − FPR|), ``tpr_at_1pct_fpr``, ``tpr_at_0.1pct_fpr``,
        ``fpr_resolution`` (1 / non-members: a TPR at an FPR below it can only
        be read at FPR 0), ``n_members``, ``n_nonmembers`` and ``roc`` (points
        ``{"fpr": [...], "tpr": [...]}`` on a fixed grid, for plots).
    """
    from sklearn.metrics import roc_auc_score

    m, n = _check_scores(member_scores, nonmember_scores)
    fpr, tpr, _ = _rates(m, n)
    y = np.concatenate([np.ones(len(m)), np.zeros(len(n))])
    auc = float(roc_auc_score(y, np.concatenate([m, n])))
    grid_tpr = [tpr_at_fpr(fpr, tpr, f) for f in _ROC_GRID]
    return {
        "auc": auc,
        "balanced_accuracy": float(np.max((tpr + 1.0 - fpr) / 2.0)),
        "advantage": float(np.max(np.abs(tpr - fpr))),
        "tpr_at_1pct_fpr": tpr_at_fpr(fpr, tpr, 0.01),
        "tpr_at_0.1pct_fpr": tpr_at_fpr(fpr, tpr, 0.001),
        "fpr_resolution": 1.0 / len(n),
        "n_members": int(len(m)),
        "n_nonmembers": int(len(n)),
        "roc": {"fpr": [round(float(f), 6) for f in _ROC_GRID],
                "tpr": [round(float(t), 6) for t in grid_tpr]},
    }


# --------------------------------------------------------------------------
# leakage estimate
# --------------------------------------------------------------------------


def clopper_pearson(k: Any, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact two-sided ``1 − alpha`` binomial interval for ``k`` successes of ``n``
    (each side has ``alpha / 2``)."""
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    lo = np.where(k > 0, beta.ppf(alpha / 2, k, n - k + 1), 0.0)
    hi = np.where(k < n, beta.ppf(1 - alpha / 2, k + 1, n - k), 1.0)
    return np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=1.0)


def _eps_lower(tpr_lo: np.ndarray, fpr_hi: np.ndarray, delta: float) -> np.ndarray:
    """ε implied by conservative rates, from both DP inequalities (0 if none)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log(np.maximum(tpr_lo - delta, 0.0) / fpr_hi)
        b = np.log(np.maximum(1.0 - fpr_hi - delta, 0.0) / (1.0 - tpr_lo))
    a = np.where(np.isfinite(a), a, np.where(tpr_lo - delta > 0, np.inf, 0.0))
    b = np.where(np.isfinite(b), b, np.where(1.0 - fpr_hi - delta > 0, np.inf, 0.0))
    return np.maximum(np.maximum(a, b), 0.0)


def _counts(member_scores: np.ndarray, nonmember_scores: np.ndarray, thresholds: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Members / non-members with score >= each threshold."""
    ms, ns = np.sort(member_scores), np.sort(nonmember_scores)
    tp = len(ms) - np.searchsorted(ms, thresholds, side="left")
    fp = len(ns) - np.searchsorted(ns, thresholds, side="left")
    return tp, fp


def estimate_epsilon(member_scores: Any, nonmember_scores: Any, *, delta: float,
                     alpha: float = 0.05, claimed_epsilon: float | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Empirical estimate of ε from one attack's scores (not a lower bound: the
    module docstring says why; ``audit-canary`` gives the valid one).

    The scores are split in two halves at random: the threshold maximising the
    conservative ε on the first half is fixed, then Clopper–Pearson intervals
    (level ``1 − alpha``) on the second half's rates give the estimate.

    Parameters
    ----------
    member_scores, nonmember_scores : array-like
        Attack scores, higher meaning "member".
    delta : float
        The δ of the claim being audited (0 for a pure-ε audit).
    alpha : float
        1 − confidence of the bound.
    claimed_epsilon : float or None
        Recorded beside the bound, with ``within_claim`` = bound <= claim.
    seed : int
        The split's seed.
    """
    if not 0 < alpha < 1:
        raise ValueError(f"alpha = {alpha!r}; it must be in (0, 1)")
    if not 0 <= delta < 1:
        raise ValueError(f"delta = {delta!r}; it must be in [0, 1)")
    m, n = _check_scores(member_scores, nonmember_scores)
    rng = np.random.default_rng(seed)
    pm, pn = rng.permutation(len(m)), rng.permutation(len(n))
    m1, m2 = m[pm[: len(m) // 2]], m[pm[len(m) // 2:]]
    n1, n2 = n[pn[: len(n) // 2]], n[pn[len(n) // 2:]]
    out: dict[str, Any] = {
        "method": "Clopper-Pearson intervals on TPR/FPR at a threshold chosen on a held-out "
                  "half (the form of Jagielski et al. 2020; Nasr et al. 2021), from one run "
                  "with a fixed member/non-member split: an estimate, not a lower bound",
        "interval_level": 1 - alpha, "delta": delta,
        "claimed_epsilon": claimed_epsilon,
    }
    if len(m1) == 0 or len(n1) == 0:
        out.update(epsilon_estimate=0.0, note="too few scores to split for an estimate")
        return out
    thr = np.unique(np.concatenate([m1, n1]))
    tp, fp = _counts(m1, n1, thr)
    t_lo, _ = clopper_pearson(tp, len(m1), alpha)
    _, f_hi = clopper_pearson(fp, len(n1), alpha)
    best = thr[int(np.argmax(_eps_lower(t_lo, f_hi, delta)))]
    tp2, fp2 = _counts(m2, n2, np.array([best]))
    t_lo2, _ = clopper_pearson(tp2, len(m2), alpha)
    _, f_hi2 = clopper_pearson(fp2, len(n2), alpha)
    eps = float(_eps_lower(t_lo2, f_hi2, delta)[0])
    out.update(epsilon_estimate=eps, threshold=float(best),
               tpr=float(tp2[0] / len(m2)), fpr=float(fp2[0] / len(n2)),
               n_members=int(len(m2)), n_nonmembers=int(len(n2)))
    if claimed_epsilon is not None:
        out["below_claim"] = bool(eps <= claimed_epsilon + 1e-12)
    return out


def dp_bound_check(member_scores: Any, nonmember_scores: Any, *, epsilon: float,
                   delta: float, alpha: float = 0.05) -> dict[str, Any]:
    """Test ``TPR <= e^ε·FPR + δ`` (and the complementary inequality) at **every**
    threshold, within sampling error.

    A threshold violates the bound only when the Clopper–Pearson interval of
    its rates cannot be reconciled with it, with a Bonferroni correction over
    the thresholds (family-wise confidence ``1 − alpha``).

    Returns
    -------
    dict
        ``violations`` (thresholds where even the conservative rates break
        the bound), ``worst_margin`` (max of the conservative TPR minus the
        bound; <= 0 means no violation), ``max_raw_excess`` (the same with the
        point estimates), ``thresholds`` checked.
    """
    m, n = _check_scores(member_scores, nonmember_scores)
    thr = np.unique(np.concatenate([m, n]))
    tp, fp = _counts(m, n, thr)
    a = alpha / max(1, len(thr))
    t_lo, t_hi = clopper_pearson(tp, len(m), a)
    f_lo, f_hi = clopper_pearson(fp, len(n), a)
    e = math.exp(epsilon)
    margin1 = t_lo - (e * f_hi + delta)
    margin2 = (1 - f_hi) - (e * (1 - t_lo) + delta)
    margin = np.maximum(margin1, margin2)
    tpr, fpr = tp / len(m), fp / len(n)
    raw = np.maximum(tpr - (e * fpr + delta), (1 - fpr) - (e * (1 - tpr) + delta))
    return {"violations": int((margin > 0).sum()), "worst_margin": float(margin.max()),
            "max_raw_excess": float(raw.max()), "thresholds": int(len(thr)),
            "epsilon": epsilon, "delta": delta, "confidence": 1 - alpha}


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------


def _hw_c(img: np.ndarray) -> np.ndarray:
    """(C, H, W) → (H, W) for one channel, (H, W, C) otherwise."""
    return img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)


def match_images(recon: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Match reconstructions to ground-truth images and score each pair.

    Parameters
    ----------
    recon : array (B, C, H, W)
        Reconstructions, clipped to [0, 1] here.
    truth : array (N, C, H, W), N >= B
        Candidate ground truth in [0, 1].

    Returns
    -------
    dict
        ``assignment`` (truth index per reconstruction, Hungarian on pixel MSE),
        per-image ``mse``/``psnr``/``ssim`` lists, and their means
        ``mse``, ``psnr``, ``ssim`` (PSNR capped at 100 dB for an exact match).
    """
    from scipy.optimize import linear_sum_assignment
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    recon = np.clip(np.asarray(recon, dtype=np.float64), 0.0, 1.0)
    truth = np.asarray(truth, dtype=np.float64)
    if recon.ndim != 4 or truth.ndim != 4 or recon.shape[1:] != truth.shape[1:]:
        raise ValueError(f"images must be (N, C, H, W) of equal shape; got {recon.shape} "
                         f"and {truth.shape}")
    if len(truth) < len(recon):
        raise ValueError(f"{len(recon)} reconstructions but only {len(truth)} ground-truth images")
    cost = ((recon[:, None] - truth[None]) ** 2).reshape(len(recon), len(truth), -1).mean(-1)
    rows, cols = linear_sum_assignment(cost)
    assign = np.empty(len(recon), dtype=int)
    assign[rows] = cols
    mse, psnr, ssim = [], [], []
    side = min(recon.shape[-2:])
    win = min(7, side if side % 2 else side - 1)
    for r, t in zip(recon, truth[assign]):
        e = float(((r - t) ** 2).mean())
        mse.append(e)
        psnr.append(100.0 if e == 0 else min(100.0, float(
            peak_signal_noise_ratio(t, r, data_range=1.0))))
        ssim.append(float(structural_similarity(
            _hw_c(t), _hw_c(r), data_range=1.0, win_size=win,
            channel_axis=None if r.shape[0] == 1 else -1)))
    return {"assignment": assign.tolist(), "mse": float(np.mean(mse)),
            "psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim)),
            "per_image": {"mse": mse, "psnr": psnr, "ssim": ssim}}


def label_accuracy(recovered: Any, truth: Any) -> float:
    """Fraction of labels recovered, compared as multisets (order-free), over
    the smaller of the two (the truth may hold more images than were
    reconstructed, e.g. every client's batch under secure aggregation)."""
    rec, tru = Counter(int(x) for x in recovered), Counter(int(x) for x in truth)
    if not tru or not rec:
        return float("nan")
    return sum((rec & tru).values()) / min(sum(tru.values()), sum(rec.values()))


def save_image_grid(truth: np.ndarray, recon: np.ndarray, path: Path) -> Path:
    """Save a PNG with ground truth (top row) over reconstructions (bottom row)."""
    from PIL import Image

    truth = np.clip(np.asarray(truth, dtype=np.float64), 0, 1)
    recon = np.clip(np.asarray(recon, dtype=np.float64), 0, 1)
    b, c, h, w = recon.shape
    pad = 2
    grid = np.ones((2 * h + 3 * pad, b * (w + pad) + pad, c))
    for i in range(b):
        x0 = pad + i * (w + pad)
        grid[pad:pad + h, x0:x0 + w] = np.moveaxis(truth[i], 0, -1)
        grid[2 * pad + h:2 * pad + 2 * h, x0:x0 + w] = np.moveaxis(recon[i], 0, -1)
    arr = (grid * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    scale = max(1, 96 // h)
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
