"""Every file a job writes is written and read through one typed record: what goes out comes back."""

from __future__ import annotations

import json

import pytest

from tp2d_exp.records import (CommReport, Count, DimBytes, FailureKind, MemoryPrediction, MemoryReport, Mesh,
                              RestartRecord, RunStatus, RunSummary, StateBytes, StepRow, WorkerReport, read_json,
                              write_json)

MEMORY = MemoryReport(predicted=MemoryPrediction(params=1, grads=1, optimizer=2, gathered_params=0, activations=3,
                                                 total=7),
                      peak_bytes=9, peak_bytes_per_rank=[9, 8], state_bytes_per_rank=[StateBytes(1, 1, 2), None])
COMM = CommReport(predicted={"dp": {"all_gather": Count(3, 300)}},
                  predicted_bytes={"tp": DimBytes(0, 0.0), "dp": DimBytes(300, 150.0)}, predicted_collectives=[])


@pytest.mark.parametrize("record", [
    WorkerReport(),  # every Optional left None: a report written before anything was measured
    WorkerReport(attempts=2, restarts=1, restart_history=[RestartRecord(attempt=2)], already_done=False,
                 failure=FailureKind.nonfinite, error="NonFiniteError: nan", memory=MEMORY, comm=COMM),
    RunSummary(status=RunStatus.completed, run_name="r", mesh=Mesh(tp=2, dp=2), steps=3, final_loss=1.5,
               restart_history=[RestartRecord(attempt=2, resumed_from_step=None, checkpoint=None)]),
    RunSummary(run_name="r", failure=FailureKind.config, error="run.x=1 must be ..."),
], ids=["empty_worker_report", "worker_report", "completed_summary", "config_failure"])
def test_records_round_trip_through_json(tmp_path, record):
    write_json(tmp_path / "r.json", record)
    assert read_json(type(record), tmp_path / "r.json") == record
    assert '": null' not in (tmp_path / "r.json").read_text()  # None fields are left out, not written as null


def test_summary_json_starts_with_the_runs_own_fields(tmp_path):
    write_json(tmp_path / "summary.json", RunSummary(status=RunStatus.failed, run_name="r", attempts=1, restarts=0))
    assert list(json.loads((tmp_path / "summary.json").read_text()))[:2] == ["status", "run_name"]


def test_step_rows_keep_their_comm_keys_flat():
    row = StepRow(step=2, epoch=0, loss=1.0, lr=1e-3, grad_norm=0.5, samples_consumed=8, skipped_steps=0,
                  tokens_per_s=10.0, useful_tokens_per_s=9.0, tokens_per_s_per_device=2.5, step_time_s=0.1,
                  instrumented=True, comm={"tp_bytes": 12, "matches_prediction": True})
    flat = row.flat()
    assert flat["comm/tp_bytes"] == 12 and "comm" not in flat and "mfu" not in flat
    assert StepRow.parse(json.dumps(flat)) == row
