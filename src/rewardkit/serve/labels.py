"""Review labels in a database (SQLAlchemy: a SQLite file by default, any SQLAlchemy URL).

Tables:

==============  =========================================================================
``manifests``   an opened manifest: its resolved path, content hash, rows, when it was
                opened and with which inspector
``items``       one reviewable image of a manifest: its row, the image and product photo
                (absolute paths), caption, prompt, the manifest's own label/verdict, the
                inspector's verdict and probabilities, and the columns a training manifest
                carries (``product_height_cm``, ``fill``, depth and saliency paths)
``labels``      a reviewer's label of an item (Available or a defect class) with when it
                was first given and last changed; one per item and reviewer
==============  =========================================================================

:func:`agreement` measures reviewers against each other and against the inspector;
:func:`export_labels` writes the labelled items as a manifest ``rewardkit train rfnet``
takes (``path``, ``product_path``, ``caption``, ``label``, ...).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from rewardkit.world.scene import CLASSES

__all__ = [
    "CARRIED_COLUMNS",
    "Item",
    "Label",
    "LabelStore",
    "Manifest",
    "agreement",
    "export_labels",
]

# Columns of a source manifest that travel with an item into the exported training manifest.
CARRIED_COLUMNS = ("product_height_cm", "fill", "depth_path", "saliency_path", "image_id")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Manifest(Base):
    __tablename__ = "manifests"
    __table_args__ = (UniqueConstraint("path", "sha256"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(String(4096))
    sha256: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(Integer)
    skipped: Mapped[str] = mapped_column(Text, default="[]")  # JSON: rows left out, why
    inspector: Mapped[str] = mapped_column(String(4096), default="")
    opened_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    items: Mapped[list[Item]] = relationship(back_populates="manifest", order_by="Item.row")


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("manifest_id", "row"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    manifest_id: Mapped[int] = mapped_column(ForeignKey("manifests.id"), index=True)
    row: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(4096))
    product_path: Mapped[str] = mapped_column(String(4096))
    caption: Mapped[str] = mapped_column(Text, default="")
    prompt: Mapped[str] = mapped_column(Text, default="")
    source_label: Mapped[str | None] = mapped_column(String(64), nullable=True)
    source_verdict: Mapped[str | None] = mapped_column(String(64), nullable=True)
    verdict: Mapped[str | None] = mapped_column(String(64), nullable=True)
    p_available: Mapped[float | None] = mapped_column(Float, nullable=True)
    probabilities: Mapped[str] = mapped_column(Text, default="{}")  # JSON {class: p}
    extra: Mapped[str] = mapped_column(Text, default="{}")  # JSON of CARRIED_COLUMNS
    manifest: Mapped[Manifest] = relationship(back_populates="items")
    labels: Mapped[list[Label]] = relationship(back_populates="item")


class Label(Base):
    __tablename__ = "labels"
    __table_args__ = (UniqueConstraint("item_id", "reviewer"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(128))
    label: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    item: Mapped[Item] = relationship(back_populates="labels")


def _engine(url: str) -> Engine:
    """An engine for ``url``; a SQLite file's folder is created, and SQLite waits for a
    writer of another server process instead of failing."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return create_engine(url, connect_args={"timeout": 30})
    return create_engine(url)


class LabelStore:
    """The review database. One per process: the engine is rebuilt after a fork (the
    server's HTTP processes are forked), so connections are never shared."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pid: int | None = None
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None or self._pid != os.getpid():
            try:
                self._engine = _engine(self.url)
                Base.metadata.create_all(self._engine)
            except Exception as err:  # a bad URL or an unreachable database: one line
                raise ValueError(f"--db {self.url}: {type(err).__name__}: {err}") from None
            self._pid = os.getpid()
        return self._engine

    def session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    # -- manifests and items -------------------------------------------------------------

    def find_manifest(self, path: str, sha256: str) -> Manifest | None:
        with self.session() as s:
            return s.scalars(
                select(Manifest).where(Manifest.path == path, Manifest.sha256 == sha256)
            ).first()

    def add_manifest(
        self, path: str, sha256: str, rows: int, skipped: list[dict], inspector: str,
        items: Sequence[dict[str, Any]],
    ) -> int:  # fmt: skip
        """Record an opened manifest and its items (dicts of :class:`Item` fields)."""
        with self.session() as s, s.begin():
            m = Manifest(path=path, sha256=sha256, rows=rows, skipped=json.dumps(skipped),
                         inspector=inspector)  # fmt: skip
            s.add(m)
            s.flush()
            for it in items:
                s.add(Item(manifest_id=m.id, **it))
            return m.id

    def set_verdicts(self, manifest_id: int, inspector: str, verdicts: dict[int, dict]) -> None:
        """Store the inspector's verdicts ({item id: {"verdict", "probabilities"}})."""
        with self.session() as s, s.begin():
            m = s.get(Manifest, manifest_id)
            m.inspector = inspector
            for item in s.scalars(select(Item).where(Item.manifest_id == manifest_id)):
                v = verdicts.get(item.id)
                item.verdict = v["verdict"] if v else None
                probs = v["probabilities"] if v else {}
                item.probabilities = json.dumps(probs)
                item.p_available = probs.get("Available")

    def manifests(self, limit: int = 50) -> list[dict]:
        with self.session() as s:
            found = s.scalars(select(Manifest).order_by(Manifest.opened_at.desc()).limit(limit))
            return [{"id": m.id, "path": m.path, "rows": m.rows,
                     "opened_at": m.opened_at.isoformat() + "Z"} for m in found]  # fmt: skip

    def manifest(self, manifest_id: int) -> dict | None:
        """A manifest with its items and every reviewer's label of each."""
        with self.session() as s:
            m = s.get(Manifest, manifest_id)
            if m is None:
                return None
            items = s.scalars(select(Item).where(Item.manifest_id == m.id).order_by(Item.row))
            labels: dict[int, dict[str, str]] = {}
            query = select(Label).join(Item).where(Item.manifest_id == m.id)
            for lab in s.scalars(query):
                labels.setdefault(lab.item_id, {})[lab.reviewer] = lab.label
            return {
                "id": m.id, "path": m.path, "rows": m.rows, "skipped": json.loads(m.skipped),
                "inspector": m.inspector, "classes": list(CLASSES),
                "items": [
                    {"id": it.id, "row": it.row, "caption": it.caption, "prompt": it.prompt,
                     "source_label": it.source_label, "source_verdict": it.source_verdict,
                     "verdict": it.verdict, "probabilities": json.loads(it.probabilities),
                     "labels": labels.get(it.id, {})}
                    for it in items
                ],
            }  # fmt: skip

    def item(self, item_id: int) -> Item | None:
        with self.session() as s:
            return s.get(Item, item_id)

    # -- labels ---------------------------------------------------------------------------

    def set_label(self, item_id: int, reviewer: str, label: str) -> dict[str, str]:
        """Record (or change) ``reviewer``'s label of an item; returns the item's labels."""
        reviewer = reviewer.strip()
        if not reviewer or len(reviewer) > 128:
            raise ValueError("reviewer: a name of 1 to 128 characters is needed")
        if label not in CLASSES:
            raise ValueError(f"label: {label!r} is not one of {', '.join(CLASSES)}")
        with self.session() as s, s.begin():
            if s.get(Item, item_id) is None:
                raise KeyError(f"item: no item {item_id}")
            found = s.scalars(
                select(Label).where(Label.item_id == item_id, Label.reviewer == reviewer)
            ).first()
            if found is None:
                s.add(Label(item_id=item_id, reviewer=reviewer, label=label))
            elif found.label != label:
                found.label, found.updated_at = label, _now()
            s.flush()
            rows = s.scalars(select(Label).where(Label.item_id == item_id))
            return {r.reviewer: r.label for r in rows}

    def label_rows(self, manifest_ids: Iterable[int] | None = None) -> list[dict]:
        """Every label with its item: item, reviewer, label, times, and the item's fields."""
        with self.session() as s:
            query = (
                select(Label, Item, Manifest)
                .join(Item, Label.item_id == Item.id)
                .join(Manifest, Item.manifest_id == Manifest.id)
            )
            if manifest_ids is not None:
                query = query.where(Item.manifest_id.in_(list(manifest_ids)))
            out = []
            for lab, it, m in s.execute(query.order_by(Item.id, Label.reviewer)):
                out.append({
                    "item": it.id, "reviewer": lab.reviewer, "label": lab.label,
                    "created_at": lab.created_at, "updated_at": lab.updated_at,
                    "verdict": it.verdict, "path": it.path, "product_path": it.product_path,
                    "caption": it.caption, "prompt": it.prompt, "row": it.row,
                    "manifest": m.path, "manifest_id": m.id, "extra": json.loads(it.extra),
                })  # fmt: skip
            return out


# ---------------------------------------------------------------------------------------
# Agreement


def _kappa(pairs: list[tuple[str, str]]) -> float | None:
    """Cohen's kappa of paired labels (None when chance agreement is certain)."""
    n = len(pairs)
    if n == 0:
        return None
    observed = sum(a == b for a, b in pairs) / n
    left, right = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    chance = sum(left[c] * right[c] for c in left) / (n * n)
    if chance >= 1.0:
        return None
    return (observed - chance) / (1.0 - chance)


def _summary(pairs: list[tuple[str, str]]) -> dict:
    n = len(pairs)
    agree = sum(a == b for a, b in pairs)
    binary = sum((a == CLASSES[0]) == (b == CLASSES[0]) for a, b in pairs)
    return {
        "n": n,
        "agreement": agree / n if n else None,
        "available_agreement": binary / n if n else None,
        "kappa": _kappa(pairs),
    }


def agreement(rows: Sequence[dict]) -> dict:
    """Reviewer-reviewer and reviewer-inspector agreement of :meth:`LabelStore.label_rows`.

    - ``reviewers``: for each pair of reviewers, over the items both labelled: the share of
      equal labels (six classes), of equal Available-or-not, and Cohen's kappa; ``overall``
      pools every pair of labels given to the same item.
    - ``inspector``: for each reviewer (and ``overall``), the same against the inspector's
      verdict of the items they labelled.
    """
    by_item: dict[int, dict[str, str]] = {}
    verdicts: dict[int, str | None] = {}
    for r in rows:
        by_item.setdefault(r["item"], {})[r["reviewer"]] = r["label"]
        verdicts[r["item"]] = r["verdict"]
    names = sorted({r["reviewer"] for r in rows})
    pairs: dict[tuple[str, str], list[tuple[str, str]]] = {}
    pooled: list[tuple[str, str]] = []
    for labels in by_item.values():
        present = sorted(labels)
        for i, a in enumerate(present):
            for b in present[i + 1 :]:
                pairs.setdefault((a, b), []).append((labels[a], labels[b]))
                pooled.append((labels[a], labels[b]))
    vs_inspector: dict[str, list[tuple[str, str]]] = {}
    for item, labels in by_item.items():
        if verdicts[item] is None:
            continue
        for name, lab in labels.items():
            vs_inspector.setdefault(name, []).append((lab, verdicts[item]))
    every = [p for name in names for p in vs_inspector.get(name, [])]
    return {
        "labels": len(rows),
        "items": len(by_item),
        "reviewers_per_item": {str(k): v for k, v in
                               sorted(Counter(len(v) for v in by_item.values()).items())},
        "reviewers": {
            "overall": _summary(pooled),
            "pairs": [{"a": a, "b": b, **_summary(p)} for (a, b), p in sorted(pairs.items())],
        },
        "inspector": {
            "overall": _summary(every),
            "by_reviewer": {name: _summary(vs_inspector.get(name, [])) for name in names},
        },
    }  # fmt: skip


# ---------------------------------------------------------------------------------------
# Export


def consensus(labels: dict[str, tuple[str, dt.datetime]]) -> tuple[str, float]:
    """The majority label of an item's reviews ({reviewer: (label, updated_at)}), ties to
    the label given most recently, and the share of reviewers who gave it."""
    counts = Counter(lab for lab, _ in labels.values())
    top = max(counts.values())
    tied = {lab for lab, c in counts.items() if c == top}
    latest = max((t, lab) for lab, t in labels.values() if lab in tied)[1]
    return latest, top / len(labels)


def export_labels(
    db_url: str,
    out: str | Path,
    manifests: Sequence[str] | None = None,
    reviewers: Sequence[str] | None = None,
    min_reviewers: int = 1,
) -> dict:
    """Write the labelled items as a training manifest (Parquet, atomically).

    One row per item with at least ``min_reviewers`` labels (from ``reviewers`` only, when
    given; from the opened manifests ``manifests`` only, ids or paths, when given): ``path``
    and ``product_path`` (absolute), ``caption``, ``label`` (the reviewers' majority, ties
    to the latest), ``prompt``, the carried columns of the source manifest, and
    ``n_reviewers``, ``consensus`` (share agreeing), ``reviewers``, ``inspector_verdict``,
    ``labelled_at``, ``source_manifest``, ``source_row``. ``rewardkit train rfnet
    --manifest`` takes it.

    Raises:
        ValueError: No labels to export, an unknown manifest, or a bad database URL.
    """
    import pyarrow as pa

    from rewardkit.io import write_parquet_atomic

    store = LabelStore(db_url)
    ids = None
    if manifests:
        known = store.manifests(limit=1_000_000)
        ids = []
        for m in manifests:
            match = [k["id"] for k in known
                     if str(k["id"]) == str(m) or k["path"] == str(Path(m).resolve())]  # fmt: skip
            if not match:
                raise ValueError(f"--manifest {m}: not a manifest opened on the review page")
            ids.extend(match)
    rows = store.label_rows(ids)
    if reviewers:
        rows = [r for r in rows if r["reviewer"] in set(reviewers)]
    by_item: dict[int, list[dict]] = {}
    for r in rows:
        by_item.setdefault(r["item"], []).append(r)
    records = []
    for reviews in by_item.values():
        if len(reviews) < min_reviewers:
            continue
        first = reviews[0]
        label, share = consensus({r["reviewer"]: (r["label"], r["updated_at"]) for r in reviews})
        record = {
            "path": first["path"], "product_path": first["product_path"],
            "caption": first["caption"], "label": label, "prompt": first["prompt"],
        }  # fmt: skip
        for c in CARRIED_COLUMNS:
            record[c] = first["extra"].get(c)
        record.update({
            "n_reviewers": len(reviews), "consensus": share,
            "reviewers": ",".join(sorted(r["reviewer"] for r in reviews)),
            "inspector_verdict": first["verdict"],
            "labelled_at": max(r["updated_at"] for r in reviews).isoformat() + "Z",
            "source_manifest": first["manifest"], "source_row": first["row"],
        })  # fmt: skip
        records.append(record)
    if not records:
        who = f" by {', '.join(reviewers)}" if reviewers else ""
        raise ValueError(
            f"--db {db_url}: no items with at least {min_reviewers} label(s){who} to export"
        )
    types = {"product_height_cm": pa.float64(), "fill": pa.float64(), "depth_path": pa.string(),
             "saliency_path": pa.string(), "image_id": pa.string()}  # fmt: skip
    columns = {}
    for name in records[0]:
        values = [r[name] for r in records]
        if name == "image_id":
            values = [None if v is None else str(v) for v in values]
        columns[name] = pa.array(values, types.get(name))
    table = pa.table(columns)
    write_parquet_atomic(out, table)
    return {
        "out": str(out),
        "rows": table.num_rows,
        "labels": len(rows),
        "per_class": dict(Counter(r["label"] for r in records)),
        "agreement": agreement(rows),
    }
