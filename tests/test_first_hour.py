"""What a new user meets in the first hour: flags where they type them, runs that end with a hint when nothing
(or nearly nothing) was kept, one console format."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from curate.pipeline import stats
from curate.pipeline.cli import build_parser, main


def test_verbose_flag_works_before_and_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["-v", "run", "c.yaml"]).verbose is True
    assert parser.parse_args(["run", "c.yaml", "-v"]).verbose is True
    assert parser.parse_args(["run", "c.yaml"]).verbose is False
    assert parser.parse_args(["validate", "c.yaml", "--verbose"]).verbose is True


def test_outcome_warnings_name_the_reason_and_the_fix() -> None:
    hints = {("download", "private_address"): "set download.allowed_networks"}
    nothing = {"input_rows": 10, "kept": 0, "rejected": {"download": {"private_address": 9, "http_404": 1}}}
    assert stats.outcome_warnings(nothing, hints) == [
        "nothing was kept: 9 of 10 rows were turned down as download/private_address; set download.allowed_networks"]
    nearly = {"input_rows": 100, "kept": 5, "rejected": {"clip_filter": {"low_clip_score": 95}}}
    assert stats.outcome_warnings(nearly, hints) == ["95% of the rows were turned down as clip_filter/low_clip_score"]
    fine = {"input_rows": 100, "kept": 60, "rejected": {"clip_filter": {"low_clip_score": 40}}}
    assert stats.outcome_warnings(fine, hints) == []


def test_a_run_that_keeps_nothing_ends_with_exit_0_and_a_warning_with_the_fix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with tarfile.open(tmp_path / "captions-only.tar", "w") as tar:  # WebDataset tars without image members
        for i in range(4):
            data = f"caption {i}".encode()
            info = tarfile.TarInfo(f"s{i}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    config = tmp_path / "c.yaml"
    config.write_text("input: {path: captions-only.tar}\noutput: {path: run}\n"
                      "cluster: {processes: false, n_workers: 1, dashboard: false}\n"
                      "download: {enabled: false}\ncaptions: {languages: []}\ndedup: {enabled: false}\n"
                      "clip: {enabled: false}\n")
    assert main(["run", str(config), "--no-progress"]) == 0  # the run completed: exit 0, see operations.md
    err = capsys.readouterr().err
    assert ("curate: warning: nothing was kept: 4 of 4 rows were turned down as input/no_image; "
            "the rows carry no image bytes") in err


def test_every_row_private_ends_with_the_allowed_networks_fix(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "c.csv").write_text("url,caption\n" + "".join(
        f"http://127.0.0.1:9/{i}.jpg,a photo of a cat number {i}\n" for i in range(3)))
    config = tmp_path / "c.yaml"
    config.write_text("input: {path: c.csv}\noutput: {path: run}\n"
                      "cluster: {processes: false, n_workers: 1, dashboard: false}\n"
                      "dedup: {enabled: false}\nclip: {enabled: false}\n")
    assert main(["run", str(config), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "curate: warning: nothing was kept: 3 of 3 rows were turned down as download/private_address" in err
    assert "download.allowed_networks" in err


def test_report_cards_show_the_language_decision() -> None:
    from curate.stages.clean_captions import CleanCaptionsStage

    parts = CleanCaptionsStage.report_parts({})
    assert parts.facts({"caption_language": "zh", "caption_language_score": 0.52}) == [
        ("language", "zh"), ("language score", "0.5200")]
