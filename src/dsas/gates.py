"""Gates ("when"): the per-site, per-token factor g_l(z) in z' = z + lam * g_l(z) * Δ_l(z).

* const:   g = mult (1 for vanilla steering).
* sigmoid: g = mult * sigmoid(w . z + b)   -- the DSAS regulator, folded (PCA -> LR collapses to one vector);
           with a floor f, mult * max(0, (sigmoid - f) / (1 - f)) (`DSASConfig.floor`).
* relu:    g = mult * relu(w . z + b)      -- the E2E-DSAS ReLU gate.
* pooled:  g = mult * sigmoid(mean of the logits of the regulators at or below the site) -- a site without a
           regulator of its own under `DSASConfig.scope="below"` (or "below+prefix": that mean's running mean
           over the sequence).

The CAST-style threshold baseline decides once per prompt: it lives whole in `dsas.condition`.

The DSAS regulator (paper Eq. 5-6): on token-mean activations of the source set (label 1) and control set
(label 0), fit PCA(r) -> logistic regression; fold it into w = P^T w_lr, b = b_lr - w . mu, so the run-time
cost is one dot product per token and site. Sites whose cross-validated accuracy is below a threshold carry no
signal (g would hover near 0.5 everywhere) and are switched off.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, train_test_split
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits

from dsas import rule
from dsas.options import check_fields

GATE_KINDS = ("const", "sigmoid", "relu", "pooled")
GATE_SCOPES = ("token", "prefix", "below", "below+prefix")
POOLED_SCOPES, RUNNING_MEAN_SCOPES = rule.POOLED_SCOPES, rule.RUNNING_MEAN_SCOPES


@dataclass
class SiteGate:
    """g(z) = mult * phi(w . z + b), phi in {sigmoid, relu}; or g = mult for kind "const".

    scope "token" reads each token's z; "prefix" reads the mean of w . z over the sequence so far; "below" reads
    the mean logit of the regulators at or below the site, "below+prefix" that mean's running mean over the
    sequence (see `DSASConfig.scope`). A "pooled" gate has no w: it only reads the pool."""

    kind: str = "const"
    w: torch.Tensor | None = None
    b: float = 0.0
    mult: float = 1.0
    scope: str = "token"
    floor: float = 0.0
    """A sigmoid (or pooled) gate reads max(0, (sigmoid - floor) / (1 - floor))."""
    skip: int = 0
    """A running-mean scope leaves the first `skip` real tokens of a sequence out of its mean
    (`FitConfig.skip_tokens`); until there is a token to average, the mean logit is 0."""

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ValueError(f"gate kind {self.kind!r} is not one of {GATE_KINDS}.")
        if self.scope not in GATE_SCOPES:
            raise ValueError(f"gate scope {self.scope!r} is not one of {GATE_SCOPES}.")
        if self.kind == "pooled":
            if self.scope not in POOLED_SCOPES or self.w is not None:
                raise ValueError(
                    f"a pooled gate has a scope of {POOLED_SCOPES} and no weight vector of its own."
                )
        elif self.kind != "const" and self.w is None:
            raise ValueError(f"a {self.kind} gate needs a weight vector w.")
        if isinstance(self.skip, bool) or not isinstance(self.skip, int) or self.skip < 0:
            raise ValueError(f"gate skip {self.skip!r}: the tokens a running mean leaves out, an int >= 0.")
        if not 0 <= self.floor < 1 or (self.floor and self.kind not in ("sigmoid", "pooled")):
            raise ValueError(f"gate floor {self.floor!r}: a sigmoid or pooled gate's floor lies in [0, 1).")

    def value(self, z: torch.Tensor) -> torch.Tensor:
        """g(z) for z[..., d] -> [...] (fp32), by `dsas.rule.gate`; for scope "below" this site's own
        regulator (what it adds to the pool)."""
        if self.kind == "pooled":
            raise ValueError("a pooled gate reads the regulators below it in a forward pass, not z alone.")
        w = None if self.kind == "const" or self.w is None else self.w.to(z.device)
        return rule.gate(z.float(), w, self.b, self.mult, self.kind == "relu", floor=self.floor)


@dataclass
class DSASConfig:
    """Options of the DSAS regulator (defaults reproduce the paper where it is known; see docs/design.md)."""

    pca_dim: int = 5
    """r: principal components kept before the logistic regression (paper: 5)."""
    acc_threshold: float = 0.75
    """Sites whose regulator accuracy is below this are treated by `inactive` (paper: 0.75)."""
    acc_mode: Literal["cv", "train", "holdout"] = "cv"
    """How accuracy is measured: "cv" (stratified k-fold), "train", or "holdout" (25% stratified split)."""
    folds: int = 5
    """k for acc_mode="cv" (reduced to the smaller class size when the sets are tiny)."""
    C: float = 1.0
    """Inverse L2 strength of the logistic regression (sklearn's C); class_weight is balanced."""
    features: Literal["mean", "tokens"] = "mean"
    """"mean": one token-mean vector per prompt (paper); "tokens": every token labelled (reviewer 4's ask),
    weighted 1/K per prompt, cross-validated by prompt groups. For images, "tokens" labels every (image,
    timestep) pair, so the gate must separate the sets at every denoising step it runs at."""
    inactive: Literal["off", "vanilla", "keep"] = "off"
    """Policy for sites under the threshold: "off" (not steered), "vanilla" (g = 1), "keep" (use h anyway)."""
    soft: bool = False
    """Soft accuracy gate (reviewer 1): multiply g by clip((acc - 0.5) / (acc_threshold - 0.5), 0, 1)."""
    temperature: float = 1.0
    """g = sigmoid((w.z + b - offset) / temperature); 1 and 0 reproduce the paper."""
    offset: float = 0.0
    scope: Literal["auto", "token", "prefix", "below", "below+prefix"] = "auto"
    """What the gate reads at run time. "auto" (default): "below+prefix" for a language model, "token" for
    images or when `inactive` keeps sites under the threshold (which the pooled scopes steer anyway); `fit` saves
    the scope it chose. Fit with "below" to serve with vLLM or run under torch.compile (a running mean over the
    sequence is a per-sequence state those do not carry; eager generate() carries it, beams included). "token": each token's activation (the
    paper). "prefix": the mean of the
    gate logit over the sequence so far (the prompt's real tokens and every generated token), which is what the
    regulator was trained on (one token-mean per prompt): once the prompt shows the cue, the continuation keeps
    being steered, where a per-token gate closes on every token that does not itself carry the cue. Eager
    only (no torch.compile, no vLLM); beam search moves the running means with the beams. "below": every site from the first accurate regulator
    up is steered, each token gated by sigmoid of the mean logit of the accurate regulators at or below the site
    in the same forward pass (each reading its own site's output). Sites whose own regulator fails
    `acc_threshold` borrow that pooled gate instead of being switched off, and several regulators agreeing make
    a sharper decision than one; `inactive` does not apply. Token sequences only; torch.compile traces the pool
    within its graph, and vLLM serving keeps it in a per-token buffer (`torch.ops.dsas.steer_pooled`).
    "below+prefix": both poolings, i.e. each regulator read on the running token-mean of its site, exactly the
    kind of example it was fitted on (w . mean(z) + b is the mean of the logits), then averaged over the
    regulators at or below the site. The gate latches onto a prompt's topic instead of reading it token by token
    (concept induction: docs/concepts.md). Eager generation only, like "prefix"."""
    control_fpr: float | None = None
    """Calibrate the midpoint on the control set instead of the logistic regression's 0: shift the logit so that
    this fraction of control examples (weighted tokens with features="tokens") scores above it, i.e. gets
    g > 0.5 -- or, with a `floor`, g > 0 at all. None keeps the paper's midpoint; `offset` is added on top."""
    calibrate_on: Literal["examples", "tokens"] = "examples"
    """What `control_fpr` counts: the regulator's training examples, or the control prompts' tokens, each read
    as the gate reads it at run time (weighted 1/K per prompt): alone for scopes "token" / "below", as the mean
    of the prompt up to it for the running-mean scopes "prefix" / "below+prefix" (whose early tokens are means
    of a few tokens, noisier than a whole prompt's)."""
    negatives: Literal["control", "control+target"] = "control"
    """The regulator's negative class. "control" is the paper's. "control+target" adds the target prompts: where
    the target rewrites the source (a detox pair: same topic, same person, polite), the regulator then learns
    what is to be removed rather than what source and control happen to differ by besides it (on the toxicity
    sets, a per-token gate trained on control alone opens on every "you" and "I"). Not for concept induction,
    where the target is the source about the concept and must not be told apart from it."""
    floor: float = 0.0
    """Gate values under this are exactly 0: g = max(0, (sigmoid - floor) / (1 - floor)), so a fully open gate
    is still 1 but a barely open one leaves the activation bit for bit as it was. 0 is the paper's sigmoid."""
    split: float | None = None
    """Pooled scopes ("below", "below+prefix"): the regulators of the lowest `split` fraction of the sites decide
    the gate, and only the sites above them are steered, all with that one pooled gate per token. Nothing the
    gate reads has been steered (no site under the split is, in this token or any earlier one), so steering
    cannot close its own gate: the "read on the unsteered stream" without a second pass. With `control_fpr`,
    that one decision is calibrated (each regulator's bias moved by the same amount) on the control prompts
    alone, not each regulator: the mean of several logits spreads less than one, so per-regulator offsets
    would open the pool on far fewer examples than asked, and with `negatives="control+target"` the target
    prompts train the regulators but are not counted (a removal set's targets are the source made polite).
    None: every site from the first accurate regulator up is steered and reads the regulators at or below
    it."""

    @classmethod
    def removal(cls, **overrides: Any) -> DSASConfig:
        """Gates for removing a behaviour (detoxification) that leave neutral text untouched: the regulators of
        the lower half of the sites, fitted against control and target and read on the running means of their
        own (never steered) sites, make one pooled decision for every site of the upper half; it is exactly 0
        wherever the pool reads like all but 5% of the control prompts' running means
        (docs/concepts.md, "Split removal gates"). A caught prompt is steered at every upper site, and steering
        cannot close its own gate. Text only; not for concept induction. Eager generation (the running mean);
        `Steerer.with_scope("below")` serves the same regulators per token (vLLM, torch.compile)."""
        base: dict[str, Any] = dict(
            scope="below+prefix",
            split=0.5,
            floor=0.5,
            control_fpr=0.05,
            calibrate_on="tokens",
            negatives="control+target",
        )
        return cls(**(base | overrides))

    def __post_init__(self) -> None:
        check_fields(self)  # types, and the Literal choices of acc_mode, features, inactive, scope
        if self.pca_dim < 1:
            raise ValueError("DSASConfig.pca_dim must be >= 1.")
        if not 0.5 <= self.acc_threshold <= 1.0:
            raise ValueError("DSASConfig.acc_threshold must lie in [0.5, 1].")
        if self.temperature <= 0:
            raise ValueError("DSASConfig.temperature must be > 0.")
        if self.scope in POOLED_SCOPES and self.inactive != "off":
            raise ValueError(
                "DSASConfig.scope='below' steers sites under the threshold with the pooled gate already; "
                "leave inactive='off'."
            )
        if not 0 <= self.floor < 1:
            raise ValueError("DSASConfig.floor must lie in [0, 1).")
        if self.split is not None and (self.scope not in ("auto", *POOLED_SCOPES) or not 0 < self.split < 1):
            raise ValueError(
                "DSASConfig.split is a fraction of the sites in (0, 1) and needs the pooled gates of "
                f"scope='below' (got split={self.split!r}, scope={self.scope!r})."
            )
        if self.control_fpr is not None and not 0 < self.control_fpr < 1:
            raise ValueError(
                "DSASConfig.control_fpr must lie in (0, 1) (or None for the regression's midpoint)."
            )


def changed_fields(cfg: DSASConfig) -> dict[str, Any]:
    """The fields in which `cfg` differs from the default config: a preset as fit options
    (`dsas.fit(..., **changed_fields(DSASConfig.removal()))`, `dsas fit --removal`)."""
    base = DSASConfig()
    return {k: v for k, v in asdict(cfg).items() if v != getattr(base, k)}


def resolve_scope(cfg: DSASConfig, text: bool) -> DSASConfig:
    """`cfg` with scope "auto" made concrete: "below+prefix" for token sequences when `inactive` is "off"
    (docs/concepts.md: the most selective on concepts and toxicity alike), else "token"."""
    if cfg.scope != "auto":
        return cfg
    return replace(cfg, scope="below+prefix" if text and cfg.inactive == "off" else "token")


@dataclass
class RegulatorFit:
    """A fitted regulator of one site: the folded gate plus what is kept for analysis."""

    gate: SiteGate
    accuracy: float
    active: bool
    """The accuracy passed the threshold."""
    steered: bool
    """The site is hooked at run time (active, or the inactive policy / soft gate keeps it)."""
    stats: dict[str, Any] = field(default_factory=dict)


def _pipeline(n_components: int, C: float) -> Pipeline:
    return Pipeline(
        [
            ("pca", PCA(n_components=n_components, svd_solver="full")),
            ("lr", LogisticRegression(C=C, class_weight="balanced", solver="newton-cholesky", max_iter=1000)),
        ]
    )


def fit_pipeline(X: np.ndarray, y: np.ndarray, w: np.ndarray | None, r: int, C: float) -> Pipeline:
    """PCA(r, at most what the data allows) -> balanced logistic regression, fitted with sample weights `w`."""
    pipe = _pipeline(max(1, min(r, X.shape[0] - 1, X.shape[1])), C)
    pipe.fit(X, y, lr__sample_weight=w)
    return pipe


def _accuracy(pipe: Pipeline, X: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> float:
    return float(np.average(pipe.predict(X) == y, weights=w))


def regulator_accuracy(
    X: np.ndarray,
    y: np.ndarray,
    cfg: DSASConfig,
    groups: np.ndarray | None = None,
    w: np.ndarray | None = None,
    seed: int = 0,
) -> float:
    """Accuracy of the PCA -> LR pipeline as `cfg.acc_mode` says (PCA refitted inside every fold); `seed`
    shuffles the folds."""
    if cfg.acc_mode == "train":
        return _accuracy(fit_pipeline(X, y, w, cfg.pca_dim, cfg.C), X, y, w)
    g = groups if groups is not None else np.arange(len(y))
    # Class sizes in prompts (groups), which is what limits the number of folds.
    n_min = min(len(np.unique(g[y == c])) for c in (0, 1))
    if cfg.acc_mode == "holdout":
        ug = np.unique(g)
        gy = np.array([y[g == u][0] for u in ug])
        tr_g, _ = train_test_split(ug, test_size=0.25, stratify=gy, random_state=seed)
        tr = np.isin(g, tr_g)
        pipe = fit_pipeline(X[tr], y[tr], None if w is None else w[tr], cfg.pca_dim, cfg.C)
        return _accuracy(pipe, X[~tr], y[~tr], None if w is None else w[~tr])
    k = min(cfg.folds, n_min)
    splitter: Any = (
        StratifiedGroupKFold(k, shuffle=True, random_state=seed)
        if groups is not None
        else StratifiedKFold(k, shuffle=True, random_state=seed)
    )
    hits = weights = 0.0
    for tr, te in splitter.split(X, y, groups=groups):
        pipe = fit_pipeline(X[tr], y[tr], None if w is None else w[tr], cfg.pca_dim, cfg.C)
        wt = np.ones(len(te)) if w is None else w[te]
        hits += float(((pipe.predict(X[te]) == y[te]) * wt).sum())
        weights += float(wt.sum())
    return hits / weights


def upper_quantile(s: np.ndarray, w: np.ndarray | None, frac: float) -> float:
    """The score that a weighted fraction `frac` of the scores `s` lie above."""
    order = np.argsort(s)
    ws = np.ones(len(s)) if w is None else w[order]
    cum = np.cumsum(ws) / ws.sum()
    return float(s[order][np.searchsorted(cum, 1 - frac)])


def opening_logit(cfg: DSASConfig) -> float:
    """The logit at which the gate opens, where `control_fpr` puts its quantile: g = 0.5 (no floor) or g = 0
    (the floor), before `offset` and `temperature`."""
    return float(np.log(cfg.floor / (1 - cfg.floor))) if cfg.floor else 0.0


def per_prompt_tokens(prompts: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Every prompt's tokens [K_i, d] stacked (float64), each weighted 1 / K_i so every prompt counts once."""
    w = np.concatenate([np.full(len(t), 1.0 / len(t)) for t in prompts])
    return torch.cat(prompts).double().numpy(), w


def fold_pipeline(pipe: Pipeline) -> tuple[np.ndarray, float]:
    """Collapse PCA -> LR into (w, b) with LR(PCA(z)) logit = w . z + b (paper Eq. 6)."""
    pca, lr = pipe.named_steps["pca"], pipe.named_steps["lr"]
    w = pca.components_.T @ lr.coef_[0]
    b = float(lr.intercept_[0] - w @ pca.mean_)
    return w, b


def fit_regulator(
    source: torch.Tensor | list[torch.Tensor],
    control: torch.Tensor | list[torch.Tensor],
    cfg: DSASConfig,
    seed: int = 0,
    control_tokens: list[torch.Tensor] | None = None,
) -> RegulatorFit:
    """Fit the DSAS regulator of one site.

    source/control: token-mean activations [n, d] (features="mean"), or lists of per-prompt token activations
    [K_i, d] (features="tokens"). control_tokens: the control prompts' token activations, for
    `cfg.calibrate_on="tokens"` with features="mean".
    """
    groups = w = None
    if isinstance(source, list) or isinstance(control, list):
        src, ctl = list(source), list(control)
        X, w = per_prompt_tokens(src + ctl)
        y = np.concatenate([np.ones(sum(len(t) for t in src)), np.zeros(sum(len(t) for t in ctl))])
        groups = np.concatenate([np.full(len(t), i) for i, t in enumerate(src + ctl)])
    else:
        X = torch.cat([source, control]).double().numpy()
        y = np.concatenate([np.ones(len(source)), np.zeros(len(control))])
    # One BLAS thread: these problems are small, and on a busy machine a thread pool's spin-waits made one
    # regulator fit many times slower.
    with threadpool_limits(limits=1):
        acc = regulator_accuracy(X, y, cfg, groups, w, seed)
        pipe = fit_pipeline(X, y, w, cfg.pca_dim, cfg.C)
    wv, b = fold_pipeline(pipe)
    if cfg.control_fpr is not None:
        Xc, wc = X[y == 0], None if w is None else w[y == 0]
        if cfg.calibrate_on == "tokens" and w is None:
            if control_tokens is None:
                raise ValueError("calibrate_on='tokens' needs the control prompts' token activations.")
            Xc, wc = per_prompt_tokens(control_tokens)
        b -= upper_quantile(Xc @ wv + b, wc, cfg.control_fpr) - opening_logit(cfg)
    wv, b = wv / cfg.temperature, (b - cfg.offset) / cfg.temperature
    active = acc >= cfg.acc_threshold
    mult = 1.0
    if cfg.soft:
        mult = float(np.clip((acc - 0.5) / max(cfg.acc_threshold - 0.5, 1e-9), 0.0, 1.0))
    scope = "token" if cfg.scope == "auto" else cfg.scope  # a lone regulator; `fit` resolves "auto"
    gate = SiteGate("sigmoid", torch.from_numpy(wv).float(), b, mult, scope, cfg.floor)
    if not active and cfg.inactive == "vanilla":
        gate = SiteGate("const", None, 0.0, 1.0)
    pca = pipe.named_steps["pca"]
    stats = {
        "accuracy": acc,
        "train_accuracy": _accuracy(pipe, X, y, w),
        "pca_components": int(pca.n_components_),
        "pca_explained": float(np.sum(pca.explained_variance_ratio_)),
        "w_norm": float(np.linalg.norm(wv)),
    }
    steered = active or cfg.inactive in ("vanilla", "keep") or (cfg.soft and mult > 0)
    return RegulatorFit(gate, acc, bool(active), bool(steered), stats)
