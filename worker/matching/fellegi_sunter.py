"""Fellegi–Sunter weights, learned from the practice's own contacts without labels.

For each field and level, m = P(level | same person) and u = P(level | two different
people); a pair's match weight is the sum of log2(m/u) over its non-missing fields plus
the prior log-odds, and its match probability is 1 / (1 + 2^-weight).

How the parameters are learned (the way Splink does it, no labelled pairs needed):

- u: the exact-agreement level from value frequencies (the chance that two random
  contacts share a value is Σ p_v²); the other levels from comparing random pairs.
- m: expectation-maximisation on the candidate pairs, in two sessions (`SESSIONS`) so
  that a field never trains on pairs that were chosen for agreeing on it: pairs found
  through both names' Soundex train DOB, email, phone, address and city; then pairs
  found through one DOB train the names (with the identifiers' m just learned taking
  part, so the two latent classes are well defined). Pairs a household rule vetoes never train. Each
  session starts from `DEFAULT_M`, so a small practice (too few pairs to learn from)
  keeps sensible weights.
- prior: the chance that two random contacts are one person: the share of candidate
  pairs that match (EM with m and u held fixed) times candidates / all pairs. A larger
  practice so needs more evidence per pair, as coincidences grow with its size.
- term frequency: agreeing on a name adds log2(u_exact / p_name), so two "Smith"s count
  for less than two "Quartermaine"s (bounded to `TF_FLOOR`..`TF_CAP` bits).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from worker.matching.blocking import BIT
from worker.matching.columns import Columns
from worker.matching.compare import F_CITY, F_FIRST, F_LAST, FIELDS, LEVELS, compare

MAX_LEVELS = max(LEVELS.values())
# EM sessions: (blocking passes whose pairs train, fields trained). A field never trains
# on pairs chosen for agreeing on it, and no field trains on pairs chosen for sharing
# what a household shares (address, phone, email, or a last name with a postcode): there
# the larger cluster is "same household", not "same person" - the failure the issue
# describes in Splink's default set-up.
SESSIONS = (  # (passes, fields used, fields whose m is learned)
    (BIT["names"], [2, 3, 4, 5, F_CITY], [2, 3, 4, 5, F_CITY]),
    (BIT["dob_name"] | BIT["dob"], [F_FIRST, F_LAST, 3, 4, 5, F_CITY], [F_FIRST, F_LAST]),
)
EM_ITERATIONS = 25
MIN_TRAINING_PAIRS = 100
MIN_TF_CONTACTS = 500
TF_CAP = 4.0  # bits a rare name may add
TF_FLOOR = -10.0  # bits a very common name may take away
RANDOM_PAIRS = 100_000
EM_SAMPLE = 400_000
_FLOOR = 1e-7

# Starting points (and the weights of a practice too small to learn from): what EM
# learned on 100,000 contacts of the household benchmark (bench/households.py, seed 3),
# rounded. Rows: fields; columns: level 0, 1, 2...
DEFAULT_M = np.array([
    [0.02, 0.051, 0.126, 0.094, 0.709],  # first
    [0.034, 0.022, 0.073, 0.056, 0.815],  # last
    [0.003, 0.001, 0.25, 0.746, 0.0],     # dob
    [0.198, 0.031, 0.214, 0.557, 0.0],    # email
    [0.284, 0.001, 0.104, 0.611, 0.0],    # phone
    [0.205, 0.009, 0.003, 0.783, 0.0],    # address
    [0.197, 0.001, 0.802, 0.0, 0.0],      # city
])
DEFAULT_U = np.array([
    [0.98937, 0.00569, 0.00109, 0.00074, 0.00319],
    [0.99363, 0.00349, 0.00048, 0.00001, 0.00231],
    [0.97773, 0.02028, 0.00199, 0.00008, 0.0],
    [0.99997, 0.00001, 0.00001, 0.00001, 0.0],
    [0.99997, 0.00001, 0.00001, 0.00001, 0.0],
    [0.99904, 0.00096, 0.00001, 0.00002, 0.0],
    [0.99337, 0.00323, 0.00341, 0.0, 0.0],
])
DEFAULT_PRIOR = 1e-6  # as learned on 100,000 household contacts


@dataclass(slots=True)
class Model:
    """m and u per field and level, and the prior share of matching candidate pairs."""

    m: np.ndarray = field(default_factory=lambda: DEFAULT_M.copy())
    u: np.ndarray = field(default_factory=lambda: DEFAULT_U.copy())
    prior: float = DEFAULT_PRIOR
    trained: bool = False

    def bayes(self) -> np.ndarray:
        """log2(m/u) per field and level (fields x levels); 0 for impossible levels."""
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.log2(np.maximum(self.m, _FLOOR) / np.maximum(self.u, _FLOOR))
        for f, name in enumerate(FIELDS):
            w[f, LEVELS[name]:] = 0.0
        return w


def _patterns(gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct γ rows and how many pairs have each: EM works on these, not on pairs.

    Each row is packed into one integer (levels -1..4 in base 6), which np.unique sorts
    far more cheaply than rows."""
    if not len(gamma):
        return gamma, np.empty(0, dtype=np.int64)
    width = gamma.shape[1]
    code = np.zeros(len(gamma), dtype=np.int64)
    for f in range(width):
        code = code * 6 + (gamma[:, f].astype(np.int64) + 1)
    uniq, counts = np.unique(code, return_counts=True)
    rows = np.empty((len(uniq), width), dtype=np.int8)
    for f in range(width - 1, -1, -1):
        rows[:, f] = uniq % 6 - 1
        uniq //= 6
    return rows, counts


def _em(gamma: np.ndarray, fields: list[int], model: Model, learn: list[int]) -> float:
    """EM over `fields`; re-estimates m of the fields in `learn` (the others' m and every
    u stay fixed); returns the share of matching pairs."""
    pats, counts = _patterns(gamma[:, fields])
    if not len(pats):
        return model.prior
    m, u = model.m[fields], model.u[fields]
    lam = min(max(model.prior, 1e-4), 0.5)
    cols = np.arange(len(fields))
    for _ in range(EM_ITERATIONS):
        present = pats >= 0
        idx = np.where(present, pats, 0)
        lm = np.where(present, np.log(np.maximum(m[cols, idx], _FLOOR)), 0.0).sum(axis=1)
        lu = np.where(present, np.log(np.maximum(u[cols, idx], _FLOOR)), 0.0).sum(axis=1)
        logit = np.log(lam) - np.log1p(-lam) + lm - lu
        post = 1.0 / (1.0 + np.exp(-np.clip(logit, -50, 50)))
        wsum = post * counts
        new_lam = float(wsum.sum() / counts.sum())
        for k, f in enumerate(fields):
            if f in learn:
                ok = present[:, k]
                total = wsum[ok].sum()
                if total <= 0:
                    continue
                levels = np.bincount(pats[ok, k], weights=wsum[ok], minlength=m.shape[1])
                m[k] = (levels + 1e-3) / (total + 1e-3 * m.shape[1])
        lam = min(max(new_lam, 1e-6), 1 - 1e-6)
    model.m[fields] = m
    return lam


def _exact_u(codes: np.ndarray) -> float:
    """Chance that two random contacts with a value share it: Σ p_v²."""
    present = codes[codes >= 0]
    if len(present) < 2:
        return 0.0
    p = np.unique(present, return_counts=True)[1] / len(present)  # DOBs are yyyymmdd
    return float((p * p).sum())


def estimate_u(cols: Columns, rng: np.random.Generator) -> np.ndarray:
    """u from random pairs, with the exact levels from value frequencies."""
    u = DEFAULT_U.copy()
    n = cols.n
    if n < 50:
        return u
    k = min(RANDOM_PAIRS, n * (n - 1) // 2)
    i = rng.integers(0, n, size=k)
    j = rng.integers(0, n, size=k)
    keep = i != j
    cmp = compare(cols, i[keep], j[keep])
    for f, name in enumerate(FIELDS):
        col = cmp.gamma[:, f]
        col = col[col >= 0]
        if len(col) < 100:
            continue
        levels = LEVELS[name]
        freq = np.bincount(col, minlength=levels)[:levels] / len(col)
        u[f, :levels] = np.maximum(freq, 0.5 / len(col))
    exact = {
        F_FIRST: _exact_u(cols.first), F_LAST: _exact_u(cols.last),
        2: _exact_u(cols.dob), 3: _exact_u(cols.email), 4: _exact_u(cols.phone),
        5: _exact_u(cols.addr), F_CITY: _exact_u(cols.city),
    }
    for f, value in exact.items():
        top = LEVELS[FIELDS[f]] - 1
        if value > 0:
            u[f, top] = max(value, _FLOOR)
            if f in (3, 4):  # a family's shared value: as likely as any shared value
                u[f, 2] = max(value, _FLOOR)
    return u


def train(cols: Columns, gamma: np.ndarray, passes: np.ndarray, usable: np.ndarray,
          seed: int = 0) -> Model:
    """Learn m, u and the prior from the candidate pairs (see the module docstring).

    `usable` marks the pairs EM may learn from: not vetoed by a household rule (those are
    known to be two people, and a family outnumbers its re-registrations).
    """
    model = Model()
    rng = np.random.default_rng(seed)
    model.u = estimate_u(cols, rng)
    for bits, fields, learn in SESSIONS:
        rows = np.flatnonzero(((passes & bits) != 0) & usable)
        if len(rows) < MIN_TRAINING_PAIRS:
            continue
        if len(rows) > EM_SAMPLE:
            rows = rng.choice(rows, EM_SAMPLE, replace=False)
        _em(gamma[rows], fields, model, learn)
        model.trained = True
    rows = np.flatnonzero(usable)
    if len(rows) >= MIN_TRAINING_PAIRS:
        if len(rows) > EM_SAMPLE:
            rows = rng.choice(rows, EM_SAMPLE, replace=False)
        share = _em(gamma[rows], list(range(len(FIELDS))), model, [])
        # From "share of candidate pairs" to "chance two random contacts match".
        all_pairs = cols.n * (cols.n - 1) / 2
        model.prior = min(max(share * int(usable.sum()) / all_pairs, 1e-12), 0.5)
    return model


def tf_bonus(cols: Columns, codes: np.ndarray, u_exact: float) -> np.ndarray:
    """Per-contact term-frequency adjustment (bits) for agreeing on this name."""
    out = np.zeros(len(codes), dtype=np.float64)
    present = codes >= 0
    if cols.n < MIN_TF_CONTACTS or not present.any() or u_exact <= 0:
        return out
    counts = np.bincount(codes[present])
    p = counts[codes[present]] / present.sum()
    out[present] = np.clip(np.log2(u_exact / p), TF_FLOOR, TF_CAP)
    return out


def weights(model: Model, gamma: np.ndarray, tf_first: np.ndarray,
            tf_last: np.ndarray) -> np.ndarray:
    """Match weight (bits, prior included) of each pair."""
    # Per field, a lookup table indexed by level + 1: a missing field (-1) adds 0.
    table = np.zeros((len(FIELDS), MAX_LEVELS + 1))
    table[:, 1:] = model.bayes()
    total = np.full(len(gamma), np.log2(model.prior / (1 - model.prior)))
    for f in range(len(FIELDS)):
        total += table[f][gamma[:, f] + 1]
    exact_first = gamma[:, F_FIRST] == LEVELS["first"] - 1
    exact_last = gamma[:, F_LAST] == LEVELS["last"] - 1
    total[exact_first] += tf_first[exact_first]
    total[exact_last] += tf_last[exact_last]
    return total


def probability(weight: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp2(-np.clip(weight, -60, 60)))
