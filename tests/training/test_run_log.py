"""A run's log: metrics.jsonl as the steps go, and the history a resume keeps."""

from __future__ import annotations

import json

from loralab.training.run_log import METRICS_FILE, RunLog, read_history


def test_logged_steps_and_validations_go_to_the_file_and_the_history(tmp_path):
    log = RunLog(tmp_path, [], step=0, max_steps=3, writes=True, progress=False)
    for step in (1, 2, 3):
        entry = {"step": step, "loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 10.0}
        log.step(entry, logged=step != 2)  # log_every would skip step 2
    log.validation(3, 0.25)
    log.close()
    lines = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 3, 3]
    assert log.losses == [1.0, 1.0 / 3] and log.validation_losses == [(3, 0.25)]


def test_a_rank_that_does_not_write_keeps_the_history_only(tmp_path):
    log = RunLog(tmp_path, [], step=0, max_steps=1, writes=False, progress=False)
    log.step({"step": 1, "loss": 0.5, "lr": 1e-3, "tokens_per_s": 1.0}, logged=True)
    assert log.losses == [0.5] and not (tmp_path / METRICS_FILE).exists()


def test_a_resume_drops_the_lines_of_steps_after_its_checkpoint(tmp_path):
    entries = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(e) + "\n" for e in entries))
    assert [e["step"] for e in read_history(tmp_path, up_to=2)] == [1, 2]
    assert len((tmp_path / METRICS_FILE).read_text().splitlines()) == 2  # lost work removed
    assert read_history(tmp_path, up_to=0) == [] and not (tmp_path / METRICS_FILE).exists()
