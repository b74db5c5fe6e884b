"""Row columns: the engine's, and the output schema they form with the stages' declared columns.

Names follow img2dataset where it has one. `image` (bytes) and `image_ext` are internal: they
travel between stages but never reach Parquet outputs. So are the pixel columns (``pixels.<stage>``):
what a later stage computed from the pixels an earlier stage of the same task decoded (one decode per
image; see ``Stage.from_pixels``).
"""

from __future__ import annotations

import functools
from typing import Any

import pyarrow as pa

STATUS_SUCCESS = "success"  # still alive / kept
STATUS_FAILED = "failed"  # could not be processed (download error, undecodable image)
STATUS_REJECTED = "rejected"  # a filter decided against it

KEY = "key"
URL = "url"
CAPTION = "caption"
CAPTION_ORIGINAL = "caption_original"
STATUS = "status"
#: `reject_stage` of rows the input itself rules out (malformed lines, tar members): before every stage.
INPUT_STAGE = "input"
REJECT_STAGE = "reject_stage"
REJECT_REASON = "reject_reason"
ERROR_MESSAGE = "error_message"
IMAGE = "image"
IMAGE_EXT = "image_ext"

# The engine's columns and their Arrow types. Every output Parquet carries these, then the columns every
# registered stage declares in `Stage.adds` (null where a stage did not run), then the input's extra columns,
# so partitions concatenate cleanly.
ENGINE_SCHEMA = pa.schema(
    [
        (KEY, pa.string()),
        (URL, pa.string()),
        (CAPTION, pa.string()),
        (CAPTION_ORIGINAL, pa.string()),
        (STATUS, pa.string()),
        (REJECT_STAGE, pa.string()),
        (REJECT_REASON, pa.string()),
        (ERROR_MESSAGE, pa.string()),
    ]
)
INTERNAL_COLUMNS = (IMAGE, IMAGE_EXT)
PIXELS_PREFIX = "pixels."


def pixel_column(stage_name: str) -> str:
    """The internal column holding what stage `stage_name` computed from pixels decoded before it."""
    return PIXELS_PREFIX + stage_name


def is_internal(name: str) -> bool:
    """Columns that travel between stages but never reach the outputs."""
    return name in INTERNAL_COLUMNS or name.startswith(PIXELS_PREFIX)


def input_column(name: str) -> str:
    """The row column an extra input column (or tar `.json` field) becomes: its own name, or `input_<name>` where
    that name is one of curate's columns (DataComp's `sha256`, a table's own `status`)."""
    return f"input_{name}" if name in known_schema().names or is_internal(name) else name


def known_schema() -> pa.Schema:
    """The output schema of this install: engine columns, then each registered stage's `adds`."""
    from curate.pipeline import registry  # the registry imports the stage contract, which imports us

    return _schema_of(registry.STAGES)


@functools.cache
def _schema_of(entries: tuple[Any, ...]) -> pa.Schema:
    from curate.pipeline import registry

    fields = list(ENGINE_SCHEMA)
    seen = set(ENGINE_SCHEMA.names) | set(INTERNAL_COLUMNS)
    for stage in registry.registered(entries):
        for field in stage.cls.adds:
            if field.name not in seen:
                seen.add(field.name)
                fields.append(field)
    return pa.schema(fields)


def conform(table: pa.Table, *, keep_internal: bool = False) -> pa.Table:
    """Return `table` with every known column (typed, in canonical order) then the extra columns.

    Missing known columns are added as nulls; internal columns are dropped unless asked for.
    """
    schema = known_schema()
    n = table.num_rows
    arrays: list[pa.Array | pa.ChunkedArray] = []
    fields: list[pa.Field] = []
    for field in schema:
        if field.name in table.column_names:
            arrays.append(table.column(field.name).cast(field.type))
        else:
            arrays.append(pa.nulls(n, type=field.type))
        fields.append(field)
    for name in table.column_names:
        if name in schema.names:
            continue
        if is_internal(name) and not keep_internal:
            continue
        arrays.append(table.column(name))
        fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def set_column(table: pa.Table, name: str, values: pa.Array | list) -> pa.Table:
    """Add or replace column `name`."""
    if not isinstance(values, pa.Array | pa.ChunkedArray):
        schema = known_schema()
        values = pa.array(values, type=schema.field(name).type if name in schema.names else None)
    idx = table.schema.get_field_index(name)
    if idx >= 0:
        return table.set_column(idx, name, values)
    return table.append_column(name, values)
