"""capsv.resources: the scoring cache's memory budget from the job's limit (a faked cgroup tree, Slurm
environment and /proc/meminfo), shared by the jobs that run at once, and one clear line when it is too small."""
import pytest
import torch

from capsv import resources, scoring
from capsv.utils import UserError

GB = 1 << 30


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A fake host: 64 GB available, no cgroup limit, no Slurm job. Returns the tmp dir to add limits to."""
    (tmp_path / "meminfo").write_text(f"MemTotal: {128 * GB // 1024} kB\nMemAvailable: {64 * GB // 1024} kB\n")
    (tmp_path / "cgroup").write_text("0::/\n")
    (tmp_path / "root").mkdir()
    monkeypatch.setattr(resources, "MEMINFO", str(tmp_path / "meminfo"))
    monkeypatch.setattr(resources, "PROC_SELF_CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(resources, "CGROUP_ROOT", str(tmp_path / "root"))
    for k in ("SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU", "SLURM_MEM_PER_GPU", "SLURM_CPUS_ON_NODE", "SLURM_GPUS_ON_NODE",
              "CAPSV_CONCURRENT_JOBS"):
        monkeypatch.delenv(k, raising=False)
    return tmp_path


def cgroup_v2(tmp, path, files):
    d = tmp / "root" / path.strip("/")
    d.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)


CPU = torch.device("cpu")


def test_host_memory_without_a_job(host):
    assert scoring.default_budget(CPU) == 32 * GB


def test_cgroup_v2_limit_of_the_job_above_the_task(host):
    """Slurm limits the job's cgroup and runs the task in one below it (memory.max 'max'); page cache is
    not counted as used."""
    (host / "cgroup").write_text("0::/system.slice/slurmstepd.scope/job_7/step_batch/user/task_0\n")
    job = "system.slice/slurmstepd.scope/job_7"
    cgroup_v2(host, job, {"memory.max": str(10 * GB), "memory.current": str(5 * GB),
                          "memory.stat": f"anon {2 * GB}\nfile {3 * GB}\n"})
    cgroup_v2(host, job + "/step_batch/user/task_0", {"memory.max": "max", "memory.current": str(4 * GB),
                                                      "memory.stat": f"file {3 * GB}\n"})
    assert scoring.default_budget(CPU) == (10 - 2) * GB // 2
    room = resources.cgroup_headroom()
    assert "job_7/memory.max" in room.source and "10.7 GB" in room.source


def test_cgroup_v1_limit(host):
    (host / "cgroup").write_text("12:pids:/x\n4:memory:/slurm/uid_0/job_8/step_0\n0::/\n")
    d = host / "root" / "memory" / "slurm" / "uid_0" / "job_8" / "step_0"
    d.mkdir(parents=True)
    (d / "memory.limit_in_bytes").write_text(str(6 * GB))
    (d / "memory.usage_in_bytes").write_text(str(3 * GB))
    (d / "memory.stat").write_text(f"cache {GB}\ntotal_cache {2 * GB}\n")
    (host / "root" / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")   # v1's "no limit"
    assert scoring.default_budget(CPU) == (6 - 1) * GB // 2


@pytest.mark.parametrize("env,limit", [
    ({"SLURM_MEM_PER_NODE": "4096"}, 4 * GB),
    ({"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_ON_NODE": "3"}, 3 * GB),
    ({"SLURM_MEM_PER_GPU": "2048", "SLURM_GPUS_ON_NODE": "2"}, 4 * GB),
])
def test_slurm_memory_of_the_job(host, monkeypatch, env, limit):
    """A cluster without cgroups: the job's --mem (or --mem-per-cpu x CPUs), less what this process holds."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rss = resources._own_rss()
    budget = scoring.default_budget(CPU)
    assert (limit - resources._own_rss()) // 2 <= budget <= (limit - rss) // 2


def test_smallest_limit_wins(host, monkeypatch):
    cgroup_v2(host, "/", {"memory.max": str(8 * GB), "memory.current": "0", "memory.stat": ""})
    monkeypatch.setenv("SLURM_MEM_PER_NODE", str(200 * 1024))   # 200 GB: the cgroup is tighter
    assert scoring.default_budget(CPU) == 4 * GB


def test_jobs_sharing_the_host_share_its_memory(host, monkeypatch):
    monkeypatch.setenv("CAPSV_CONCURRENT_JOBS", "4")
    assert scoring.default_budget(CPU) == 64 * GB // 4 // 2


def test_jobs_sharing_a_gpu_share_its_memory(host, monkeypatch):
    """Four jobs on one 80 GB GPU each take half of a quarter, even when each sees it all free."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (79 * GB, 80 * GB))
    monkeypatch.setenv("CAPSV_CONCURRENT_JOBS", "4")
    assert scoring.default_budget(torch.device("cuda")) == 20 * GB // 2
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * GB, 80 * GB))   # others hold the rest
    assert scoring.default_budget(torch.device("cuda")) == 3 * GB


def test_budget_below_one_block_is_one_clear_line(host, monkeypatch):
    cgroup_v2(host, "/", {"memory.max": str(2 * GB), "memory.current": str(2 * GB - (2 << 20)),
                          "memory.stat": "file 0\n"})
    monkeypatch.setenv("CAPSV_CONCURRENT_JOBS", "2")
    with pytest.raises(UserError) as e:
        scoring.default_budget(CPU)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("the scoring cache's memory budget is 524 kB (half of the cgroup limit 2.15 GB")
    assert "shared by 2 jobs at once" in msg and "less than one block of 911 kB" in msg and "--mem" in msg
