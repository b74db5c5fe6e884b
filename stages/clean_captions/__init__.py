"""clean_captions stage: normalise captions, reject junk, identify the language."""

from curate.stages.clean_captions.stage import CaptionsConfig, CleanCaptionsStage

__all__ = ["CaptionsConfig", "CleanCaptionsStage"]
