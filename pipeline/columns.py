"""Row columns shared by every stage (see docs/architecture.md and shared/design.md).

Names follow img2dataset where it has one. `image` (bytes) and `image_ext` are internal: they
travel between stages but never reach Parquet outputs.
"""

from __future__ import annotations

import pyarrow as pa

STATUS_SUCCESS = "success"  # still alive / kept
STATUS_FAILED = "failed"  # could not be processed (download error, undecodable image)
STATUS_REJECTED = "rejected"  # a filter decided against it

KEY = "key"
URL = "url"
CAPTION = "caption"
CAPTION_ORIGINAL = "caption_original"
STATUS = "status"
REJECT_STAGE = "reject_stage"
REJECT_REASON = "reject_reason"
ERROR_MESSAGE = "error_message"
IMAGE = "image"
IMAGE_EXT = "image_ext"

# Known columns and their Arrow types. Every output Parquet carries all of them (null where a
# stage did not run), followed by the input's extra columns, so partitions concatenate cleanly.
KNOWN_SCHEMA = pa.schema(
    [
        (KEY, pa.string()),
        (URL, pa.string()),
        (CAPTION, pa.string()),
        (CAPTION_ORIGINAL, pa.string()),
        (STATUS, pa.string()),
        (REJECT_STAGE, pa.string()),
        (REJECT_REASON, pa.string()),
        (ERROR_MESSAGE, pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
        ("eval_match", pa.string()),
        ("eval_distance", pa.int32()),
        ("dup_of", pa.string()),
        ("clip_score", pa.float32()),
    ]
)
INTERNAL_COLUMNS = (IMAGE, IMAGE_EXT)
KNOWN_NAMES = frozenset(KNOWN_SCHEMA.names)


def conform(table: pa.Table, *, keep_internal: bool = False) -> pa.Table:
    """Return `table` with every known column (typed, in canonical order) then the extra columns.

    Missing known columns are added as nulls; internal columns are dropped unless asked for.
    """
    n = table.num_rows
    arrays: list[pa.Array | pa.ChunkedArray] = []
    fields: list[pa.Field] = []
    for field in KNOWN_SCHEMA:
        if field.name in table.column_names:
            arrays.append(table.column(field.name).cast(field.type))
        else:
            arrays.append(pa.nulls(n, type=field.type))
        fields.append(field)
    for name in table.column_names:
        if name in KNOWN_NAMES:
            continue
        if name in INTERNAL_COLUMNS and not keep_internal:
            continue
        arrays.append(table.column(name))
        fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def set_column(table: pa.Table, name: str, values: pa.Array | list) -> pa.Table:
    """Add or replace column `name`."""
    if not isinstance(values, pa.Array | pa.ChunkedArray):
        field_type = KNOWN_SCHEMA.field(name).type if name in KNOWN_NAMES else None
        values = pa.array(values, type=field_type)
    idx = table.schema.get_field_index(name)
    if idx >= 0:
        return table.set_column(idx, name, values)
    return table.append_column(name, values)
