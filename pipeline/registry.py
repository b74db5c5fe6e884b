"""The stage registry: config section name -> stage class, in pipeline order. Explicit, no import magic.

To add a stage, write its module in `stages/`, add its config section to `pipeline/config.py` and one line here
(see docs/writing-a-stage.md).
"""

from __future__ import annotations

from curate.pipeline.stage import Stage
from curate.stages.clean_captions import CleanCaptionsStage
from curate.stages.clip_filter import ClipFilterStage
from curate.stages.download import DownloadStage
from curate.stages.phash_dedup import PhashDedupStage
from curate.stages.write import WriteStage

STAGES: dict[str, type[Stage]] = {
    "download": DownloadStage,
    "captions": CleanCaptionsStage,
    "dedup": PhashDedupStage,
    "clip": ClipFilterStage,
}
#: The sink that writes each finished partition (config section `write`).
SINK: type[WriteStage] = WriteStage
