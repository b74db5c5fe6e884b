"""download stage: fetch image-caption pairs over http(s) safely, verify, resize and encode the images."""

from curate.stages.download.stage import DownloadConfig, DownloadStage

__all__ = ["DownloadConfig", "DownloadStage"]
