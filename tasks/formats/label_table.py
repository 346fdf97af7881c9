"""Reading a label table (CSV, TSV or Parquet) into an index: each row's image path, target, split and group.

Used by the ``table`` format (tasks/formats/table.py). Invariants of :class:`TableIndex`:

- every path is inside the image root (checked on the text here; symlinks are checked when a file is
  opened) or, only with ``allow_urls``, a URL;
- targets are int64 class indices (single_label, ordinal) or float32 ``[N, findings]`` with 1 / 0 / NaN
  (unknown), after the uncertain and blank policies;
- every row has a split; rows whose split the data does not give are drawn by group: all rows of a
  group (patient, study; else the image itself) land in one split, stratified by class for
  single-label and ordinal tasks, ordered by a hash of (``split_seed``, group) so adding rows moves at
  most the groups at the cut points;
- errors name the table file and its line (CSV/TSV, the header being line 1) or row (Parquet).
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass, field

import numpy as np

from tasks.codecs.images import DatasetError

from ..spec import SPLITS, TableLayout, TaskSpec
from .files import SPLIT_ALIASES, check_regular, ext, find_files, relative, source_fs

__all__ = ["TableIndex", "index_table", "table_location", "TABLE_EXTENSIONS"]

TABLE_EXTENSIONS = (".csv", ".tsv", ".parquet")
_POLICY_VALUE = {"ignore": np.nan, "positive": 1.0, "negative": 0.0}


@dataclass
class TableIndex:
    root: str  # the source folder (table paths are relative to it)
    image_root: str
    table_files: list[str]  # tables and split lists: metadata the fingerprint covers
    paths: np.ndarray  # object [N]: each row's image path on the source filesystem (or a URL)
    targets: np.ndarray  # int64 [N] or float32 [N, C]
    split: np.ndarray  # int8 [N]: index into SPLITS
    groups: np.ndarray  # object [N]
    origin: list[tuple[int, int]]  # per row: (table index, row number in that table)
    warnings: list[str] = field(default_factory=list)

    def where(self, i: int) -> str:
        t, r = self.origin[i]
        f = self.table_files[t]
        return f"{f} line {r + 2}" if ext(f) != ".parquet" else f"{f} row {r}"

    def crossing_groups(self) -> list[str]:
        """Groups with rows in more than one split (possible only where the data gives the splits)."""
        seen: dict[str, int] = {}
        crossing = set()
        for g, s in zip(self.groups.tolist(), self.split.tolist()):
            if seen.setdefault(g, s) != s:
                crossing.add(g)
        return sorted(crossing)


def table_location(spec: TaskSpec) -> tuple[object, str, dict[str | None, str]]:
    """(filesystem, source folder, {split or None: table path}) of a table task."""
    fs, src = source_fs(spec)
    src = src.rstrip("/")
    files = spec.layout.files
    if files is None:
        if fs.isdir(src):
            found = [p for p in find_files(fs, src) if ext(p) in TABLE_EXTENSIONS]
            hint = f"; tables there: {[p.rsplit('/', 1)[-1] for p in found[:5]]}" if found else ""
            raise DatasetError(f"source {spec.source}: is a folder; name its label table in table.files{hint}")
        if ext(src) not in TABLE_EXTENSIONS:
            raise DatasetError(f"source {spec.source}: a label table must be .csv, .tsv or .parquet")
        return fs, src.rsplit("/", 1)[0], {None: src}
    named = {None: files} if isinstance(files, str) else dict(files)
    out = {}
    for split, rel in named.items():
        path = _inside(src, rel, f"table.files{'' if split is None else '.' + split}")
        if ext(path) not in TABLE_EXTENSIONS:
            raise DatasetError(f"{path}: a label table must be .csv, .tsv or .parquet")
        if not fs.exists(path):
            raise DatasetError(f"{path}: label table not found (table.files{'' if split is None else '.' + split})")
        out[split] = path
    return fs, src, out


def _inside(root: str, rel: str, what: str) -> str:
    """``rel`` joined onto ``root``; DatasetError when it is absolute, a URL or climbs out of ``root``."""
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if "://" in rel or norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise DatasetError(f"{what}={rel!r} must be a path inside the source folder {root}")
    return root if norm == "." else f"{root}/{norm}"


def _read_columns(fs, path: str, columns: list[str], optional: tuple[str, ...] = ()) -> dict[str, list]:
    """The named columns of one table as lists of str / None (empty cells are None); ``optional`` columns
    that the table lacks are left out of the result."""
    import pyarrow as pa

    check_regular(fs, path)
    try:
        with fs.open(path, "rb") as f:
            if ext(path) == ".parquet":
                import pyarrow.parquet as pq

                table = pq.read_table(f)
            else:
                import pyarrow.csv as pcsv

                table = pcsv.read_csv(
                    f, parse_options=pcsv.ParseOptions(delimiter="\t" if ext(path) == ".tsv" else ","),
                    convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                                        strings_can_be_null=True, null_values=[""],
                                                        quoted_strings_can_be_null=True))
    except Exception as exc:  # pyarrow's own errors name neither the file nor the fix
        raise DatasetError(f"{path}: unreadable table ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    missing = [c for c in columns if c not in table.column_names and c not in optional]
    if missing:
        raise DatasetError(f"{path}: column(s) {missing} missing; its columns are {table.column_names[:30]}")
    out = {}
    for c in columns:
        if c not in table.column_names:
            continue
        col = table.column(c)
        if not pa.types.is_string(col.type):
            col = col.cast(pa.string())
        out[c] = col.to_pylist()
    return out


def _numbers(values: list, where) -> np.ndarray:
    """Cells as float64, None as NaN; DatasetError naming the first cell that is not a number."""
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if v is None or v.strip() == "":
            out[i] = np.nan
            continue
        try:
            out[i] = float(v)
        except ValueError:
            raise DatasetError(f"{where(i)}: {v!r} is not a number") from None
    return out


def _single_targets(spec: TaskSpec, cols: dict[str, list], where) -> np.ndarray:
    lay = spec.layout
    n = spec.num_classes
    if lay.label_columns is not None:  # one-hot
        mat = np.stack([_numbers(cols[c], lambda i, c=c: f"{where(i)} column {c!r}") for c in lay.label_columns], 1)
        mat = np.nan_to_num(mat, nan=0.0)
        bad = np.flatnonzero(~np.isin(mat, (0.0, 1.0)).all(1) | (mat.sum(1) != 1))
        if bad.size:
            i = int(bad[0])
            raise DatasetError(f"{where(i)}: one-hot columns {lay.label_columns} must hold exactly one 1 "
                               f"(got {mat[i].tolist()}){f'; {bad.size} such rows' if bad.size > 1 else ''}")
        return mat.argmax(1).astype(np.int64)
    index = {name: k for k, name in enumerate(spec.class_names or [])}
    values = cols[lay.label]
    out = np.empty(len(values), dtype=np.int64)
    lookup: dict = {}
    for i, v in enumerate(values):
        if v not in lookup:
            lookup[v] = _class_of(v, index, n)
        k = lookup[v]
        if k is None:
            want = f"an integer in 0..{n - 1}" + (f" or one of {spec.class_names}" if spec.class_names else "")
            raise DatasetError(f"{where(i)}: {lay.label}={v!r} is not {want}")
        out[i] = k
    return out


def _class_of(value, index: dict[str, int], n: int) -> int | None:
    if value is None:
        return None
    if value in index:
        return index[value]
    try:
        f = float(value)
    except ValueError:
        return None
    return int(f) if f.is_integer() and 0 <= f < n else None


def _finding_targets(spec: TaskSpec, cols: dict[str, list], where) -> np.ndarray:
    lay = spec.layout
    names = spec.names()
    if lay.label_columns is not None:  # one column per finding: 1 / 0 / -1 / blank
        out = np.empty((len(cols[lay.label_columns[0]]), len(names)), dtype=np.float32)
        for k, c in enumerate(lay.label_columns):
            raw = _numbers(cols[c], lambda i, c=c: f"{where(i)} column {c!r}")
            blank = np.isnan(raw)
            bad = np.flatnonzero(~blank & ~np.isin(raw, (0.0, 1.0, -1.0)))
            if bad.size:
                raise DatasetError(f"{where(int(bad[0]))} column {c!r}: {raw[bad[0]]:g} is not 1, 0, -1 (uncertain) "
                                   "or blank")
            policy = lay.uncertain_per_finding.get(names[k], lay.uncertain)
            v = np.where(raw == -1.0, _POLICY_VALUE[policy], raw)
            out[:, k] = np.where(blank, np.nan if lay.blank == "ignore" else 0.0, v)
        return out
    index = {name: k for k, name in enumerate(names)}
    values = cols[lay.label]
    out = np.zeros((len(values), len(names)), dtype=np.float32)
    for i, v in enumerate(values):
        if v is None or v.strip() == "":
            if lay.blank == "ignore":
                out[i] = np.nan
            continue
        if lay.none_value is not None and v.strip() == lay.none_value:
            continue
        for part in (v.split(lay.separator) if lay.separator else [v]):
            part = part.strip()
            if part not in index:
                none = f" or {lay.none_value!r}" if lay.none_value else ""
                raise DatasetError(f"{where(i)}: {lay.label}={v!r}: {part!r} is not a finding of this task "
                                   f"({names}{none})")
            out[i, index[part]] = 1.0
    return out


def _resolve_paths(spec: TaskSpec, fs, image_root: str, values: list, where) -> np.ndarray:
    lay = spec.layout
    by_name = _name_index(fs, image_root) if lay.find_by_name else None
    out = np.empty(len(values), dtype=object)
    missing = []
    for i, v in enumerate(values):
        if v is None or not v.strip():
            raise DatasetError(f"{where(i)}: {lay.path_column} is empty")
        p = lay.path_template.format(v.strip())
        if "://" in p:
            if not lay.allow_urls:
                raise DatasetError(f"{where(i)}: {lay.path_column}={v!r} is a URL; image paths must be inside the "
                                   f"image root {image_root} (set table.allow_urls to read URLs)")
            out[i] = p
            continue
        if by_name is not None:
            found = by_name.get(p.replace("\\", "/").rsplit("/", 1)[-1])
            if isinstance(found, list):
                raise DatasetError(f"{where(i)}: {len(found)} files under {image_root} are named "
                                   f"{found[0].rsplit('/', 1)[-1]!r} (table.find_by_name needs one), e.g. {found[:2]}")
            if found is None:
                missing.append(i)
            out[i] = found
            continue
        norm = posixpath.normpath(p.replace("\\", "/"))
        if norm.startswith("/"):
            if not norm.startswith(image_root.rstrip("/") + "/"):
                raise DatasetError(f"{where(i)}: {lay.path_column}={v!r} is outside the image root {image_root}")
            out[i] = norm
        elif norm == ".." or norm.startswith("../"):
            raise DatasetError(f"{where(i)}: {lay.path_column}={v!r} climbs out of the image root {image_root}")
        else:
            out[i] = f"{image_root}/{norm}"
    if missing:
        i = missing[0]
        raise DatasetError(f"{where(i)}: no file named {lay.path_template.format(values[i])!r} under "
                           f"{image_root} ({len(missing)} of {len(values)} rows name files that are not there)")
    return out


def _name_index(fs, root: str) -> dict[str, str | list[str]]:
    """File name -> its path under ``root``, or every path of a name found more than once."""
    index: dict[str, str | list[str]] = {}
    for p in find_files(fs, root):
        name = p.rsplit("/", 1)[-1]
        have = index.get(name)
        index[name] = p if have is None else ([*have, p] if isinstance(have, list) else [have, p])
    return index


def _groups(spec: TaskSpec, cols: dict[str, list], paths: np.ndarray, root: str, where) -> np.ndarray:
    lay = spec.layout
    column = lay.group_column or (lay.path_column if lay.group_pattern else None)
    if column is None:  # every image its own group, named by its place in the dataset, not where that lives
        return np.array([p if "://" in p else relative(p, root) for p in paths.tolist()], dtype=object)
    pattern = re.compile(lay.group_pattern) if lay.group_pattern else None
    out = np.empty(len(paths), dtype=object)
    for i, v in enumerate(cols[column]):
        if v is None or not v.strip():
            raise DatasetError(f"{where(i)}: {column} (the group) is empty")
        if pattern is not None:
            m = pattern.search(v)
            if m is None:
                raise DatasetError(f"{where(i)}: {column}={v!r} does not match table.group_pattern {lay.group_pattern!r}")
            v = m.group(1) if m.groups() else m.group(0)
        out[i] = v.strip()
    return out


def _split_lists(fs, src: str, lay: TableLayout) -> tuple[dict[str, int], list[str]]:
    member: dict[str, int] = {}
    files = []
    for split, rel in (lay.split_lists or {}).items():
        path = _inside(src, rel, f"table.split_lists.{split}")
        if not fs.exists(path):
            raise DatasetError(f"{path}: split list not found (table.split_lists.{split})")
        check_regular(fs, path)
        files.append(path)
        with fs.open(path, "rb") as f:
            for line in f.read().decode("utf-8", errors="replace").splitlines():
                name = line.strip()
                if not name:
                    continue
                if member.setdefault(name, SPLITS.index(split)) != SPLITS.index(split):
                    raise DatasetError(f"{path}: {name!r} is also in the {SPLITS[member[name]]} list")
    return member, files


def index_table(spec: TaskSpec) -> TableIndex:
    """Read the task's label table(s) and return every row's path, target, split and group."""
    lay = spec.layout
    fs, src, tables = table_location(spec)
    image_root = _inside(src, lay.images, "table.images") if lay.images else src
    if not lay.allow_urls and not fs.isdir(image_root):
        raise DatasetError(f"image root {image_root} (table.images) is not a folder")
    # The split column's default name ('split') is optional; any other name must exist.
    split_col = lay.split_column if not isinstance(lay.files, dict) and not lay.split_lists else None
    explicit_split = lay.split_column not in (None, "split")
    if explicit_split and (isinstance(lay.files, dict) or lay.split_lists):
        raise DatasetError("table.split_column does not apply with one table per split or with split lists")
    label_cols = list(lay.label_columns) if lay.label_columns is not None else [lay.label]
    group_cols = [lay.group_column] if lay.group_column else []
    columns = list(dict.fromkeys([lay.path_column, *label_cols, *group_cols, *([split_col] if split_col else [])]))
    optional = (split_col,) if split_col == "split" else ()
    member, list_files = _split_lists(fs, src, lay)
    parts = []
    table_files = []
    for t, (split, path) in enumerate(tables.items()):
        table_files.append(path)
        cols = _read_columns(fs, path, columns, optional)
        n = len(cols[lay.path_column])
        where = _where(path)
        targets = (_finding_targets if spec.kind == "multi_label" else _single_targets)(spec, cols, where)
        paths = _resolve_paths(spec, fs, image_root, cols[lay.path_column], where)
        groups = _groups(spec, cols, paths, src, where)
        given = np.full(n, -1, dtype=np.int8)
        if split is not None:
            given[:] = SPLITS.index(split)
        elif split_col and split_col in cols:
            for i, v in enumerate(cols[split_col]):
                s = SPLIT_ALIASES.get(str(v).strip().lower()) if v is not None else None
                if s is None:
                    raise DatasetError(f"{where(i)}: {split_col}={v!r} is not train/val/test")
                given[i] = SPLITS.index(s)
        elif member:
            unlisted = []
            for i, v in enumerate(cols[lay.path_column]):
                s = member.get(v.strip())
                if s is None:
                    unlisted.append(i)
                else:
                    given[i] = s
            if unlisted:
                raise DatasetError(f"{where(unlisted[0])}: {cols[lay.path_column][unlisted[0]]!r} is in none of the "
                                   f"split lists {sorted(lay.split_lists)} ({len(unlisted)} such rows)")
        parts.append((targets, paths, groups, given, [(t, r) for r in range(n)]))
    if not parts or sum(len(p[1]) for p in parts) == 0:
        raise DatasetError(f"source {spec.source}: the label table has no rows")
    targets = np.concatenate([p[0] for p in parts])
    paths = np.concatenate([p[1] for p in parts])
    groups = np.concatenate([p[2] for p in parts])
    split = np.concatenate([p[3] for p in parts])
    origin = [o for p in parts for o in p[4]]
    split = _draw_splits(spec, split, groups, targets)
    return TableIndex(root=src, image_root=image_root, table_files=table_files + list_files, paths=paths,
                      targets=targets, split=split, groups=groups, origin=origin)


def _where(path: str):
    line = ext(path) != ".parquet"
    return lambda i: f"{path} line {i + 2}" if line else f"{path} row {i}"


def _draw_splits(spec: TaskSpec, given: np.ndarray, groups: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Fill in the splits the data does not give, by group (see the module docstring)."""
    split = given.copy()
    present = {int(s) for s in np.unique(given) if s >= 0}
    if not present:
        draw, pool = [0, 1, 2], split < 0
    else:
        if 0 not in present:
            raise DatasetError(f"source {spec.source}: the table gives splits {sorted(SPLITS[s] for s in present)} "
                               "but no training rows")
        draw = [0] + [s for s in (1, 2) if s not in present]
        pool = split == 0
    if len(draw) == 1:
        return split
    ratio = np.array([spec.split_ratio[s] for s in draw], dtype=np.float64)
    ratio /= ratio.sum()
    rows = np.flatnonzero(pool)
    first: dict[str, int] = {}
    for i in rows.tolist():
        first.setdefault(groups[i], i)
    strata: dict[int, list[str]] = {}
    for g, i in first.items():
        strata.setdefault(int(targets[i]) if spec.kind != "multi_label" else 0, []).append(g)
    target_of: dict[str, int] = {}
    for _, names in sorted(strata.items()):
        names.sort(key=lambda g: hashlib.sha256(f"{spec.split_seed}\0{g}".encode()).digest())
        n = len(names)
        sizes = [int(round(n * r)) for r in ratio[1:]]
        if n >= len(draw):
            sizes = [max(1, k) for k in sizes]
        while sum(sizes) > n - 1 and any(sizes):  # training keeps at least one group
            sizes[int(np.argmax(sizes))] -= 1
        cut = n - sum(sizes)
        for g in names[:cut]:
            target_of[g] = draw[0]
        for s, k in zip(draw[1:], sizes):
            for g in names[cut:cut + k]:
                target_of[g] = s
            cut += k
    split[rows] = [target_of[groups[i]] for i in rows.tolist()]
    return split
