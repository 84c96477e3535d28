"""`fastclass audit`: label issues, outliers and near-copies from stored embeddings, before a human looks.

- Label issues: out-of-fold predicted probabilities from k-fold cross-validation of a logistic regression
  on the L2-normalised embeddings, then confident learning (cleanlab's `find_label_issues`, ranked by
  self-confidence: the probability the classifier gives the image's own label, which no model trained on
  that image has seen). Measured on sklearn's digits with 10% of labels flipped (bench/audit.py), C=200 and
  `low_self_confidence` gave the best precision and recall together of the choices tried.
- Outliers: cleanlab's k-NN outlier score, exp(-mean neighbour distance / its median), over each image's
  k nearest neighbours by cosine similarity (faiss; low = far from everything); an image is flagged when
  its mean neighbour distance is beyond Tukey's far fence (Q3 + 3 x IQR) of all of them, e.g. off-topic
  crawl results.
- Near-copies: neighbour pairs with cosine similarity over `--copy-threshold` that no duplicate group joins
  (crops, rotations, recolours that perceptual hashes miss); `dedup --embeddings` groups them.

Above PROJECT_ABOVE images, the classifier and the neighbour search work on a TruncatedSVD projection, so a
100,000-image audit takes well under a minute on two cores (bench/audit.py).

Every image's scores are stored with the audit (which embeddings, folds, seed), so an audit is
reproducible and two audits are comparable.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from db.models import Audit, AuditPair, AuditScore, EmbeddingModel, Image, ImageStatus, Label
from fastclass.catalog import find_audit
from fastclass.errors import FastclassError
from trainer.vectors import default_model, load_embeddings

LOGISTIC_C = 200.0
NEIGHBOURS = 10
PROJECT_ABOVE = 20_000
"""Above this many images, the classifier and the neighbour search work on a PROJECTED_DIMS TruncatedSVD
projection of the vectors (similarities are still computed on the full vectors). On the full 1,280 dimensions
both are too slow for 100,000 images on two cores (the folds alone take over 100 s; exact k-NN is
quadratic in n times the dimension); below it, the full vectors are measurably better (bench/audit.py)."""
PROJECTED_DIMS = 128
EXACT_NEIGHBOURS_UP_TO = 200_000
"""Above this many images the neighbour search is approximate (a faiss HNSW graph); up to it, exact."""
COPY_THRESHOLD = 0.95
INSERT_CHUNK = 1000


def project(features: np.ndarray, seed: int) -> np.ndarray:
    """The L2-normalised TruncatedSVD projection of the vectors to PROJECTED_DIMS dimensions."""
    from sklearn.decomposition import TruncatedSVD

    if features.shape[1] <= PROJECTED_DIMS:
        return features
    projected = TruncatedSVD(PROJECTED_DIMS, random_state=seed).fit_transform(features).astype(np.float32)
    return projected / np.maximum(np.linalg.norm(projected, axis=1, keepdims=True), 1e-12)


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, classes: int, folds: int,
                              seed: int) -> np.ndarray:
    """Each image's class probabilities from a logistic regression that was not trained on it.

    The folds are fitted in parallel, one thread each with single-threaded BLAS: on these small dense
    problems BLAS's own threads cost more than they give (a 480-image fold: 0.28 s against 1.8 s)."""
    from joblib import Parallel, delayed
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    def fit(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with threadpool_limits(1):
            model = LogisticRegression(C=LOGISTIC_C, max_iter=5000).fit(features[train], labels[train])
            return test, model.classes_, model.predict_proba(features[test])

    splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels)
    probs = np.zeros((len(labels), classes))
    for test, fitted, predicted in Parallel(n_jobs=min(folds, os.cpu_count() or 1), prefer="threads")(
            delayed(fit)(train, test) for train, test in splits):
        probs[np.ix_(test, fitted)] = predicted
    return probs


def find_label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is_issue, quality) per image: cleanlab's confident learning on out-of-fold probabilities."""
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from cleanlab.rank import get_label_quality_scores

    issues = cleanlab_issues(labels, probs, filter_by="low_self_confidence")
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    return issues, quality


def nearest_neighbours(searched: np.ndarray, k: int) -> np.ndarray:
    """Each row's k nearest neighbours by inner product (itself excluded), with faiss: exact up to
    EXACT_NEIGHBOURS_UP_TO rows, an HNSW graph above."""
    import faiss

    k = min(k, len(searched) - 1)
    searched = np.ascontiguousarray(searched, dtype=np.float32)
    if len(searched) <= EXACT_NEIGHBOURS_UP_TO:
        index = faiss.IndexFlatIP(searched.shape[1])
    else:
        index = faiss.IndexHNSWFlat(searched.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction, index.hnsw.efSearch = 64, 64
    index.add(searched)
    _, found = index.search(searched, k + 1)
    positions = np.empty((len(searched), k), dtype=np.int64)
    for row, hits in enumerate(found):
        others = hits[(hits != row) & (hits >= 0)]
        positions[row] = others[:k] if len(others) >= k else np.resize(others, k)
    return positions


def outliers_and_neighbours(features: np.ndarray, searched: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                 np.ndarray]:
    """(outlier scores, neighbour similarities, neighbour positions): neighbours found in `searched` (the
    vectors or their projection), similarities on the full vectors. The score is cleanlab's k-NN outlier
    score, exp(-mean neighbour distance / its median): 1 in the crowd, towards 0 far from everything."""
    positions = nearest_neighbours(searched, NEIGHBOURS)
    similarity = np.empty(positions.shape, dtype=np.float32)
    for start in range(0, len(features), 4096):
        rows = slice(start, start + 4096)
        similarity[rows] = np.einsum("nd,nkd->nk", features[rows], features[positions[rows]])
    distance = 1 - similarity.mean(axis=1)
    scores = np.exp(-distance / max(float(np.median(distance)), 1e-12))
    return scores, similarity, positions


@dataclass
class AuditResult:
    audit_id: int
    model_id: int
    folds: int
    seed: int
    images: int
    without_embedding: int
    """`ok` images the audit could not score: they have no vector under the model (run `embed`)."""
    skipped_labels: dict[str, int] = field(default_factory=dict)
    """Labels with fewer images than folds: scored as outliers and copies, not for label issues."""
    label_issues: list[dict] = field(default_factory=list)
    outliers: list[dict] = field(default_factory=list)
    near_copies: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    """Wall seconds per part: load, projection (above PROJECT_ABOVE images), label issues, neighbours, store."""

    def as_dict(self) -> dict:
        return asdict(self)


def run_audit(session: Session, model_id: int | None = None, folds: int = 5, seed: int = 0,
              copy_threshold: float = COPY_THRESHOLD) -> AuditResult:
    """Score every `ok` image that has an embedding under the model; store and return the audit."""
    if folds < 2:
        raise FastclassError("--folds must be at least 2")
    if not 0 < copy_threshold <= 1:
        raise FastclassError("--copy-threshold is a cosine similarity: above 0, at most 1")
    started = clock = time.monotonic()
    timings: dict[str, float] = {}

    def lap(part: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[part] = round(now - clock, 2)
        clock = now

    model_id = model_id if model_id is not None else default_model(session)
    if session.get(EmbeddingModel, model_id) is None:
        raise FastclassError(f"no embedding model {model_id} (see `fastclass embed --list`)")
    ids, vectors = load_embeddings(session, model_id)
    rows = session.execute(select(Image.id, Label.name, Image.dup_group_id).join(Label, Label.id == Image.label_id)
                           .where(Image.status == ImageStatus.OK.value).order_by(Image.id)).all()
    position = {image_id: n for n, image_id in enumerate(ids)}
    scored = [r for r in rows if r.id in position]
    if len(scored) < 3:
        raise FastclassError(f"{len(scored)} ok image(s) have an embedding under model {model_id}; an audit needs "
                             "at least 3 (run `fastclass embed`)")
    features = vectors[[position[r.id] for r in scored]]
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    names = np.array([r.name for r in scored])
    result = AuditResult(0, model_id, folds, seed, len(scored), len(rows) - len(scored))
    lap("load")
    projected = len(scored) > PROJECT_ABOVE and features.shape[1] > PROJECTED_DIMS
    searched = project(features, seed) if projected else features
    if projected:
        lap("projection")

    counts = Counter(names.tolist())
    result.skipped_labels = {name: n for name, n in sorted(counts.items()) if n < folds}
    vocab = sorted(name for name in counts if name not in result.skipped_labels)
    quality = np.ones(len(scored))
    issue = np.zeros(len(scored), dtype=bool)
    suggested = names.copy()
    if len(vocab) >= 2:
        keep = np.isin(names, vocab)
        labels = np.searchsorted(vocab, names[keep])
        probs = out_of_fold_probabilities(searched[keep], labels, len(vocab), folds, seed)
        issue[keep], quality[keep] = find_label_issues(labels, probs)
        suggested[keep] = np.array(vocab)[probs.argmax(axis=1)]
    lap("label issues")

    outlier_score, similarity, positions = outliers_and_neighbours(features, searched)
    mean_distance = 1 - similarity.mean(axis=1)
    q1, q3 = np.percentile(mean_distance, [25, 75])
    outlier = mean_distance > q3 + 3 * (q3 - q1)

    groups = np.array([r.dup_group_id or -1 for r in scored])
    pairs = {}
    for a, b in zip(*np.nonzero(similarity >= copy_threshold)):
        i, j = sorted((int(a), int(positions[a, b])))
        if groups[i] == -1 or groups[i] != groups[j]:
            pairs[(i, j)] = float(similarity[a, b])
    lap("neighbours")

    audit = Audit(model_id=model_id, folds=folds, seed=seed, images=len(scored), label_issues=int(issue.sum()),
                  outliers=int(outlier.sum()), near_copies=len(pairs),
                  params=json.dumps({"classifier": f"LogisticRegression(C={LOGISTIC_C})",
                                     "features": f"TruncatedSVD({PROJECTED_DIMS})" if projected else "full",
                                     "filter_by": "low_self_confidence", "neighbours": NEIGHBOURS,
                                     "outlier_fence": "Q3 + 3 IQR of mean neighbour distance",
                                     "copy_threshold": copy_threshold, "skipped_labels": result.skipped_labels}))
    session.add(audit)
    session.flush()
    result.audit_id = audit.id
    score_rows = [{"audit_id": audit.id, "image_id": r.id, "label": r.name, "suggested": str(suggested[n]),
                   "label_quality": float(quality[n]), "label_issue": bool(issue[n]),
                   "outlier_score": float(outlier_score[n]), "outlier": bool(outlier[n])}
                  for n, r in enumerate(scored)]
    pair_rows = [{"audit_id": audit.id, "image_a": scored[i].id, "image_b": scored[j].id, "similarity": sim}
                 for (i, j), sim in sorted(pairs.items())]
    for table, batch in ((AuditScore, score_rows), (AuditPair, pair_rows)):
        for start in range(0, len(batch), INSERT_CHUNK):
            session.execute(insert(table), batch[start:start + INSERT_CHUNK])
    session.commit()
    lap("store")
    _fill_lists(result, score_rows, pair_rows)
    result.seconds = round(time.monotonic() - started, 2)
    result.timings = timings
    return result


def _fill_lists(result: AuditResult, score_rows: list[dict], pair_rows: list[dict]) -> None:
    issues = sorted((r for r in score_rows if r["label_issue"]), key=lambda r: (r["label_quality"], r["image_id"]))
    result.label_issues = [{"image": r["image_id"], "label": r["label"], "suggested": r["suggested"],
                            "score": round(r["label_quality"], 6)} for r in issues]
    outliers = sorted((r for r in score_rows if r["outlier"]), key=lambda r: (r["outlier_score"], r["image_id"]))
    result.outliers = [{"image": r["image_id"], "label": r["label"], "score": round(r["outlier_score"], 6)}
                       for r in outliers]
    result.near_copies = [{"images": [r["image_a"], r["image_b"]], "similarity": round(r["similarity"], 6)}
                          for r in sorted(pair_rows, key=lambda r: (-r["similarity"], r["image_a"], r["image_b"]))]


def show_audit(session: Session, audit_id: int | None = None) -> AuditResult:
    """A stored audit (the latest by default) as `audit` printed it."""
    audit = find_audit(session, audit_id, "audit show")
    scores = [dict(r._mapping) for r in session.execute(
        select(AuditScore.image_id, AuditScore.label, AuditScore.suggested, AuditScore.label_quality,
               AuditScore.label_issue, AuditScore.outlier_score, AuditScore.outlier)
        .where(AuditScore.audit_id == audit.id))]
    pairs = [dict(r._mapping) for r in session.execute(
        select(AuditPair.image_a, AuditPair.image_b, AuditPair.similarity).where(AuditPair.audit_id == audit.id))]
    params = json.loads(audit.params or "{}")
    result = AuditResult(audit.id, audit.model_id, audit.folds, audit.seed, audit.images, 0,
                         params.get("skipped_labels", {}))
    _fill_lists(result, scores, pairs)
    return result
