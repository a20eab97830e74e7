"""A plan made ahead with ``shardrec plan`` drives training on 2 gloo ranks, exactly as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from helpers import TINY_ROWS, tiny_job, tiny_job_dict
from shardrec.errors import PlanError
from shardrec.launch.spawn import run_ranks
from shardrec.train.worker import run
from shardrec.sharding.plan_file import load_plan
from shardrec.sharding.plan_job import PlanInput, input_from_job, plan_command
from shardrec.sharding.topology import TopologyConfig

# A layout the planner would not pick by itself on 2 CPU ranks.
FORCED = {
    "t_C3": {"sharding_types": ["column_wise"], "min_partition": 4},
    "t_C1": {"sharding_types": ["row_wise"]},
    "t_C5": {"sharding_types": ["table_row_wise"]},
}


def _plan_file(tmp: Path, *, ranks: int) -> Path:
    """Plans the tiny job with the forced layout for ``ranks`` CPU ranks and writes the plan file."""
    config = tmp / "plan-job.yaml"
    config.write_text(yaml.safe_dump(tiny_job_dict(tmp, sharding={"tables": FORCED})))
    source: PlanInput = input_from_job(config, [])
    out = tmp / f"plan-{ranks}.json"
    plan_command(source=source, topology=TopologyConfig(nodes=1, devices_per_node=ranks, device="CPU"),
                 objective="balanced", out=out, chart=None)
    return out


def _train(tmp: Path, plan: Path, steps: int) -> dict:
    job = tiny_job(tmp, steps=steps, sharding={"compute_device": "cpu", "plan": str(plan)})
    run_dir = tmp / "run-with-plan"
    run_dir.mkdir(exist_ok=True)
    result = run(job, run_dir=run_dir, resume=None)
    saved = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").exists() else None
    return {"losses": result.losses, "plan": saved}


def _layout(rows: list[dict]) -> dict[str, tuple]:
    return {
        r["table"]: (r["module"], r["rows"], r["dim"], r["sharding_type"], r["compute_kernel"], r["ranks"],
                     [(s["offsets"], s["sizes"], s["placement"]) for s in r["shards"]])
        for r in rows
    }


def test_training_follows_the_plan_file(tmp_path: Path) -> None:
    plan = _plan_file(tmp_path, ranks=2)
    written = json.loads(plan.read_text())
    types = {r["table"]: r["sharding_type"] for r in written["tables"]}
    assert {n: types[n] for n in FORCED} == {n: c["sharding_types"][0] for n, c in FORCED.items()}
    column_shards = next(r["shards"] for r in written["tables"] if r["table"] == "t_C3")
    assert [s["sizes"] for s in column_shards] == [[1000, 4], [1000, 4]]

    results = run_ranks(_train, tmp_path, plan, 25)
    rank0 = results[0]
    assert _layout(rank0["plan"]["tables"]) == _layout(written["tables"])
    assert rank0["plan"]["topology"]["world_size"] == 2
    for losses in (r["losses"] for r in results):
        assert len(losses) == 25
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02, losses


def test_a_plan_for_4_ranks_is_refused_on_2(tmp_path: Path) -> None:
    plan = _plan_file(tmp_path, ranks=4)
    assert json.loads(plan.read_text())["topology"]["world_size"] == 4
    tables = {f"t_C{i + 1}": (n, 8) for i, n in enumerate(TINY_ROWS)}
    assert load_plan(plan, tables=tables, world_size=4, compute_device="cpu").plan  # the plan itself is fine
    with pytest.raises(PlanError) as e:
        load_plan(plan, tables=tables, world_size=2, compute_device="cpu")
    assert f"plan file '{plan}' was made for 4 ranks, this launch has 2" in str(e.value)
    assert "plan again or launch 4 ranks" in str(e.value)
