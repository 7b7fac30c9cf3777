"""Labels are checked, never assumed: data meets a teacher only when its labels are the teacher's, or the
project file maps them (``[task.label_map] fresh = "pos"``). Unlabelled rows pass through."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from kdops.errors import LabelMismatch


def data_labels(rows: pd.DataFrame) -> list[str]:
    """The distinct labels present in ``rows``, sorted (missing labels ignored)."""
    if "label" not in rows.columns:
        return []
    return sorted({str(v) for v in rows["label"] if v is not None and not (isinstance(v, float) and pd.isna(v))})


def align_labels(rows: pd.DataFrame, teacher_labels: Sequence[str], label_map: Mapping[str, str] | None = None,
                 source: str = "the data") -> pd.DataFrame:
    """``rows`` with their labels mapped onto the teacher's; LabelMismatch naming both sets when any label is
    neither the teacher's nor mapped onto one."""
    label_map = dict(label_map or {})
    teacher = list(teacher_labels)
    bad_targets = sorted(set(label_map.values()) - set(teacher))
    if bad_targets:
        raise LabelMismatch(f"the label map sends labels to {bad_targets}, which the teacher does not have "
                            f"(its labels: {teacher}); fix [task.label_map] in kdops.toml.")
    present = data_labels(rows)
    unknown = [lab for lab in present if lab not in label_map and lab not in teacher]
    if unknown:
        hint = " ".join(f'{lab} = "..."' for lab in unknown[:3])
        raise LabelMismatch(
            f"{source} has labels {present} but the teacher knows {teacher} (unknown: {unknown}). Map them in "
            f"kdops.toml under [task.label_map] ({hint}) or train a teacher on these labels with `kdops teacher train`.")
    if not label_map or not present:
        return rows
    out = rows.copy()
    out["label"] = pd.Series([label_map.get(v, v) if isinstance(v, str) else v for v in out["label"]],
                             index=out.index, dtype=object)
    return out
