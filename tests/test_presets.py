"""experiment/ presets for common cluster shapes compose and fit every 7B/8B model they name."""

from __future__ import annotations

import pytest

from tp2d_exp.config.validate import check_config

PRESETS = {"nodes1_gpus8": (4, 2, None), "nodes2_gpus4": (4, 2, "auto"), "nodes2_gpus8": (4, 4, "auto")}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("model", ["llama3_8b", "qwen2_7b", "mistral_7b"])
def test_preset_gives_its_mesh_on_gpus_and_validates(job_factory, preset, model):
    job = job_factory([f"+experiment={preset}", f"model={model}"], prepare=False)
    tp, dp, address = PRESETS[preset]
    assert (job.dims.tp, job.dims.dp) == (tp, dp) and job.model.name == model
    assert job.cluster.device == "cuda" and job.cluster.address == address
    check_config(job)  # tp divides every head count of the model
