"""The torchx component and ``shardrec submit --dryrun``: AppDef fields, the sbatch script and the
Kubernetes manifest (no cluster needed), bad launches refused before anything is submitted, and the
launch's nodes reaching the planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torchrec.distributed.planner.types import CollectiveType
from torchx.specs import BindMount
from torchx.specs.builders import materialize_appdef
from torchx.specs.finder import get_component

from helpers import tiny_job_dict
from shardrec.cli import main as cli_main
from shardrec.errors import PlanError
from shardrec.launch import cluster, components
from shardrec.train.worker import main as worker_main, parse_args
from shardrec.sharding.config import ShardingConfig
from shardrec.sharding.plan_file import check_plan
from shardrec.sharding.planner import topology_spec, torchrec_topology

IMAGE = "ghcr.io/acme/shardrec:1"


@pytest.fixture
def job(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(tiny_job_dict(tmp_path)))
    return path


def _dryrun(capsys: pytest.CaptureFixture[str], job: Path, *args: str) -> tuple[dict, str]:
    """The AppDef (parsed) and the scheduler's request (text) that ``submit --dryrun`` prints."""
    assert cli_main(["submit", str(job), "--dryrun", *args]) == 0
    appdef, request = capsys.readouterr().out.split("---\n", 1)
    assert not (job.parent / "runs").exists()  # a dry run makes no run folder
    return yaml.safe_load(appdef), request


def test_component_runs_under_the_stock_torchx_cli() -> None:
    component = get_component(f"{components.__file__}:train")
    assert component.validation_errors == []
    args = ["--config", "/jobs/dlrm.yaml", "-j", "2x4", "--gpu", "4", "--memMB", "64000", "--max_restarts", "3",
            "--env", "NCCL_DEBUG=INFO", "--mounts", "type=bind,src=/data,dst=/data,readonly", "--", "--train.steps=5"]
    app = materialize_appdef(component.fn, args)
    (role,) = app.roles
    assert (role.name, role.num_replicas, role.entrypoint) == ("trainer", 2, "bash")
    assert (role.resource.cpu, role.resource.gpu, role.resource.memMB) == (2, 4, 64000)
    assert role.env["NCCL_DEBUG"] == "INFO" and role.port_map == {"c10d": 29500}
    assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # a store per rendezvous round: restarts work
    assert role.mounts == [BindMount(src_path="/data", dst_path="/data", read_only=True)]
    command = role.args[1]
    for part in ["--nnodes=2", "--nproc-per-node=4", "--max-restarts=3", "--rdzv-backend=c10d", "'--rdzv-id=${app_id}'",
                 "--rdzv-endpoint=$${${rank0_env}:=localhost}:29500", "-m shardrec.train.worker --config /jobs/dlrm.yaml",
                 "--run-id '${app_id}' --resume auto --train.steps=5"]:
        assert part in command


def test_one_node_rendezvous_on_a_free_port_and_fixed_run_folder() -> None:
    app = components.train(config="job.yaml", j="1x2", run_dir="/runs/x")
    command = app.roles[0].args[1]
    assert "--nnodes=1" in command and "--rdzv-endpoint=localhost:0" in command
    assert "--run-dir /runs/x --resume auto" in command and "--run-id" not in command


def test_dryrun_slurm_prints_the_sbatch_script(capsys: pytest.CaptureFixture[str], job: Path) -> None:
    appdef, script = _dryrun(capsys, job, "-s", "slurm", "-j", "2x2", "--gpu", "2", "--cpu", "16", "--mem-mb", "64000",
                             "--max-restarts", "3", "--cfg", "partition=gpu", "--train.steps=7")
    (role,) = appdef["roles"]
    assert role["num_replicas"] == 2 and role["resource"] == {"cpu": 16, "gpu": 2, "memMB": 64000, "capabilities": {}, "devices": {}}
    assert script.count("#SBATCH --job-name=trainer-") == 2 and "#SBATCH hetjob" in script
    for flag in ("--partition=gpu", "--cpus-per-task=16", "--mem=64000", "--gpus-per-task=2"):
        assert script.count(flag) == 2, flag
    run_dir = next(p for p in role["args"][1].split() if "/runs/dlrm/" in p and not p.endswith(".yaml"))
    for part in ["--nnodes=2", "--nproc-per-node=2", "--max-restarts=3", "${SLURM_JOB_NODELIST_HET_GROUP_0:=localhost}:29500",
                 f"--config {run_dir}/config.yaml --run-dir {run_dir} --resume auto", "--rdzv-id='\"$SLURM_JOB_ID\"'"]:
        assert part in script, part


def test_dryrun_kubernetes_prints_the_manifest(capsys: pytest.CaptureFixture[str], job: Path) -> None:
    appdef, manifest_text = _dryrun(
        capsys, job, "-s", "kubernetes", "-j", "2x1", "--gpu", "1", "--cpu", "8", "--mem-mb", "32000", "--image", IMAGE,
        "--mount", f"type=bind,src={job.parent},dst=/job", "--env", "NCCL_DEBUG=INFO", "--cfg", "queue=research",
        "--cfg", "namespace=recsys", "--max-restarts", "2",
    )
    assert appdef["roles"][0]["image"] == IMAGE and appdef["roles"][0]["num_replicas"] == 2
    manifest = yaml.safe_load(manifest_text.split("\n", 1)[1])
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch.volcano.sh/v1alpha1", "Job")
    assert manifest["spec"]["queue"] == "research" and [t["name"] for t in manifest["spec"]["tasks"]] == ["trainer-0", "trainer-1"]
    pod = manifest["spec"]["tasks"][0]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    assert container["resources"]["limits"] == {"cpu": "8000m", "memory": "32000M", "nvidia.com/gpu": "1"}
    assert {"name": "NCCL_DEBUG", "value": "INFO"} in container["env"]
    assert {"mountPath": "/job", "name": "mount-0", "readOnly": False} in container["volumeMounts"]
    assert {"hostPath": {"path": str(job.parent)}, "name": "mount-0"} in pod["volumes"]
    command = " ".join(container["command"][2].split())
    assert "--nnodes=2 --nproc-per-node=1" in command and "--max-restarts=2" in command
    assert "--rdzv-endpoint=${TORCHX_RANK0_HOST:=localhost}:29500" in command
    assert "--config /job/runs/dlrm/" in command and "--run-dir /job/runs/dlrm/" in command  # the container's paths


def test_run_folder_on_a_shared_volume_keeps_its_path(capsys: pytest.CaptureFixture[str], job: Path) -> None:
    # This machine mounts the claim at the folder the containers mount it at: paths stay as they are.
    _, manifest_text = _dryrun(capsys, job, "-s", "kubernetes", "--image", IMAGE, "--cfg", "queue=q",
                               "--mount", f"type=volume,src=recsys-shared,dst={job.parent}")
    pod = yaml.safe_load(manifest_text.split("\n", 1)[1])["spec"]["tasks"][0]["template"]["spec"]
    assert {"name": "mount-0", "persistentVolumeClaim": {"claimName": "recsys-shared"}} in pod["volumes"]
    assert f"--config {job.parent}/runs/dlrm/" in " ".join(pod["containers"][0]["command"][2].split())


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-s", "pbs"], "unknown scheduler 'pbs'; choose one of local_cwd, local_docker, slurm, kubernetes"),
        (["-s", "slurm", "--cfg", "partiton=gpu"], "unknown slurm option 'partiton' (give --cfg KEY=VALUE); its options:"),
        (["-s", "kubernetes", "--image", IMAGE, "--mount", "type=bind,src=/,dst=/h"], "Required run option: queue"),
        (["-s", "kubernetes", "--image", IMAGE, "--cfg", "queue=q"], "would be missing in the container"),
        (["-s", "kubernetes", "--cfg", "queue=q"], "kubernetes runs a container: give --image"),
        (["-s", "slurm", "--image", IMAGE], "slurm runs this machine's Python, not an image: drop --image"),
        (["-s", "slurm", "--mount", "type=bind,src=/a,dst=/b"], "slurm cannot mount volumes"),
        (["--mem-mb", "1000"], "local_cwd cannot reserve or cap CPUs or memory"),
        (["-s", "slurm", "-j", "1x4", "--gpu", "2"], "-j 1x4 puts 4 ranks on each node but --gpu 2: each rank needs a GPU of its own"),
        (["-s", "slurm", "--sharding.compute_device=cuda"], "computes on cuda (sharding.compute_device) but the launch asks for no GPU"),
        (["-j", "2:4x1"], "-j must be NODESxPROCS"),
        (["--env", "NCCL_DEBUG"], "--env takes KEY=VALUE"),
        (["-s", "slurm", "--train.stepz=3"], "unknown config key 'train.stepz'"),
    ],
)
def test_bad_launch_is_refused_before_submitting(capsys: pytest.CaptureFixture[str], job: Path, args: list[str], expected: str) -> None:
    assert cli_main(["submit", str(job), *args]) == 2
    assert expected in capsys.readouterr().err
    assert not (job.parent / "runs").exists()


def test_data_outside_the_mounts_is_refused(capsys: pytest.CaptureFixture[str], job: Path) -> None:
    runs = job.parent / "runs"
    args = ["-s", "kubernetes", "--image", IMAGE, "--cfg", "queue=q", "--mount", f"type=bind,src={runs},dst=/runs", f"--run.root={runs}"]
    assert cli_main(["submit", str(job), *args]) == 2
    assert f"data.train_path '{job.parent / 'train.parquet'}' would be missing in the container" in capsys.readouterr().err


def test_missing_config_and_gpus_this_machine_lacks(capsys: pytest.CaptureFixture[str], job: Path) -> None:
    assert cli_main(["submit", str(job.parent / "nope.yaml"), "-s", "slurm"]) == 2
    assert "nope.yaml' does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["submit", str(job), "--gpu", "1", "-j", "1x1"]) == 2
        assert "needs 1 GPUs; this machine has 0" in capsys.readouterr().err


def test_unknown_handles_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["status", "local_cwd://torchx/dlrm-gone"]) == 2
    err = capsys.readouterr().err
    assert "the scheduler does not know this job" in err and "known only to the process that submitted them" in err
    assert cli_main(["logs", "not-a-handle"]) == 2
    assert "bad app handle 'not-a-handle'" in capsys.readouterr().err


def test_worker_takes_run_id_resume_auto_and_overrides() -> None:
    args, overrides = parse_args(["--config", "job.yaml", "--run-id", "app-1", "--resume", "auto", "--train.steps=3"])
    assert (args.run_dir, args.run_id, args.resume, overrides) == (None, "app-1", "auto", ["train.steps=3"])
    with pytest.raises(SystemExit):
        parse_args(["--config", "job.yaml", "--run-id", "a", "--run-dir", "b"])


def test_rank_error_reaches_torchelastic_error_file_and_status(monkeypatch: pytest.MonkeyPatch, job: Path) -> None:
    error_file, run = job.parent / "error.json", job.parent / "run"
    run.mkdir()
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert worker_main(["--config", str(job), "--run-dir", str(run), "--train.stepz=3"]) == 2
    message = json.loads(error_file.read_text())["message"]["message"]
    assert message.startswith("ConfigError: unknown config key 'train.stepz'")
    assert "unknown config key 'train.stepz'" in (run / "error.txt").read_text()
    # torchrun copies the first failure into the node's error file, adding the exit code; torchx passes it on.
    reported = json.dumps({"message": {"message": message, "errorCode": 2, "extraInfo": {}}})
    assert cluster.root_cause(reported) == f"{message} (exit code 2)"
    assert cluster.root_cause("<NONE>") is None


def test_launch_nodes_reach_the_planner_bandwidths() -> None:
    cfg = ShardingConfig(compute_device="cpu")
    one_node = torchrec_topology(topology_spec(cfg, world_size=4, local_world_size=4))
    two_nodes = torchrec_topology(topology_spec(cfg, world_size=4, local_world_size=2))
    assert (one_node.local_world_size, two_nodes.local_world_size) == (4, 2)
    all_to_all = CollectiveType.ALL_TO_ALL
    intra = one_node.comms_bandwidths.get_bw(local_world_size=4, world_size=4, collective_type=all_to_all)
    inter = two_nodes.comms_bandwidths.get_bw(local_world_size=2, world_size=4, collective_type=all_to_all)
    assert inter < intra  # a collective across nodes is planned at the network's bandwidth


def test_plan_grouped_by_node_needs_the_same_ranks_per_node() -> None:
    plan = {"topology": {"world_size": 2, "local_world_size": 1, "compute_device": "cpu"},
            "tables": [{"table": "t", "rows": 10, "dim": 4, "sharding_type": "table_row_wise"}]}
    check_plan(plan, path=Path("p.json"), tables={"t": (10, 4)}, world_size=2, compute_device="cpu", local_world_size=1)
    with pytest.raises(PlanError, match=r"made for 2x1 \(nodes x ranks per node\), this launch is 1x2; its table 't' is table_row_wise"):
        check_plan(plan, path=Path("p.json"), tables={"t": (10, 4)}, world_size=2, compute_device="cpu", local_world_size=2)
