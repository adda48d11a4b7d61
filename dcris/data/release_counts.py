"""The published size of each REFER release (SPEC 4), and the comparison the packer prints after packing.

Objects (refs) per split are those of the released code's data preparation; sentences per split are the
expression counts published with RefCOCO and RefCOCO+ (G-Ref's per-split sentence counts are not in SPEC 4,
so only its objects are checked).

RefCOCO+ train: the paper's table repeats RefCOCO's 120,624 expressions. REFER publishes 141,564 expressions
for RefCOCO+ in all, over the same objects per split as listed here (42,278 + 3,805 + 1,975 + 1,798 = 49,856,
REFER's object total); with val, testA and testB as published that leaves 120,191 for train. The check uses
120,191: against the paper's figure it would flag a release that agrees with REFER's own totals.

gRefCOCO: only the total is published for the released JSON, 259,859 expressions over train, val, testA and
testB (the paper's 278,232 includes about 6% withheld for a challenge), so the check compares that total.
"""

from __future__ import annotations

# (dataset, split_by) -> split -> (objects, sentences or None when not published)
PUBLISHED: dict[tuple[str, str], dict[str, tuple[int, int | None]]] = {
    ("refcoco", "unc"): {"train": (42404, 120624), "val": (3811, 10834), "testA": (1975, 5657), "testB": (1810, 5095)},
    ("refcoco+", "unc"): {"train": (42278, 120191), "val": (3805, 10758), "testA": (1975, 5726), "testB": (1798, 4889)},
    ("refcocog", "umd"): {"train": (42226, None), "val": (2573, None), "test": (5023, None)},
    ("refcocog", "google"): {"train": (44822, None), "val": (5000, None)},
}

# (dataset, split_by) -> sentences over every split, where only the total is published
PUBLISHED_TOTALS: dict[tuple[str, str], int] = {("grefcoco", "unc"): 259859}


def published_counts(dataset: str | None, split_by: str | None) -> dict[str, dict[str, int | None]] | None:
    """``{split: {"objects": n, "sentences": m or None}}`` of a release, or None when none is published."""
    table = PUBLISHED.get((dataset or "", split_by or ""))
    if table is None:
        return None
    return {split: dict(objects=objects, sentences=sentences) for split, (objects, sentences) in table.items()}


def count_differences(
    dataset: str | None,
    split_by: str | None,
    counts: dict[str, dict[str, int]],
    label: str,
    splits: list[str] | None = None,
) -> list[str] | None:
    """How per-split counts differ from the published ones, one readable line per difference.

    Args:
        dataset: Data set name (refcoco, refcoco+, refcocog).
        split_by: unc, umd or google.
        counts: ``{split: {"objects": n, "sentences": m}}`` to check.
        label: What the counts are, for the lines ("in the release", "packed").
        splits: Check only these splits (default: every split, published or counted).

    Returns:
        The difference lines (empty when everything matches), or None when no counts are published for
        (dataset, split_by).
    """
    published = published_counts(dataset, split_by)
    if published is None:
        return None
    lines = []
    everything = [*published, *(s for s in counts if s not in published)]  # the published order, then the rest
    for split in splits if splits is not None else everything:
        if split not in published:
            lines.append(f"{split}: a split {label} that the published release does not have")
            continue
        if split not in counts:
            lines.append(f"{split}: published with {published[split]['objects']:,} objects, absent {label}")
            continue
        for what, expected in published[split].items():
            got = counts[split][what]
            if expected is not None and got != expected:
                lines.append(f"{split}: {got:,} {what} {label}, published {expected:,} ({got - expected:+,})")
    return lines


def total_differences(
    dataset: str | None, split_by: str | None, counts: dict[str, dict[str, int]], label: str
) -> list[str] | None:
    """How the sentences summed over ``counts``' splits differ from a published total (one line, or none), or None
    when no total is published for (dataset, split_by)."""
    expected = PUBLISHED_TOTALS.get((dataset or "", split_by or ""))
    if expected is None:
        return None
    got = sum(split["sentences"] for split in counts.values())
    if got == expected:
        return []
    return [f"all splits: {got:,} sentences {label}, published {expected:,} ({got - expected:+,})"]
