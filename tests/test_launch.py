"""Launch tooling: lint (shellcheck, hadolint), dry-run commands against golden files, argument
checks, the TPU babysitter against a fake gcloud, the remote training commands run locally, the
Dockerfile / CI install chain, cloudbuild.yaml, and the XManager launcher with submission
intercepted. Regenerate the golden files with UPDATE_GOLDEN=1."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "launch"
TPU = "launch/tpu_vm.sh"
GPU = "launch/gpu_docker.sh"
VENV_BIN = pathlib.Path(sys.executable).parent


def tool(name: str) -> str:
    """A linter from the test extra; missing is a failure, not a skip."""
    path = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} is not installed: it comes with the test extra "
                    "(scripts/install.sh .venv test)")
    return path


def write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_bin(tmp_path):
    """gcloud, docker and git that only record their arguments (one JSON list per line)."""
    bin_dir = tmp_path / "bin"
    log = tmp_path / "calls.jsonl"
    for name in ("gcloud", "docker", "git"):
        write_exe(bin_dir / name, f"""
            #!{sys.executable}
            import json, sys
            with open({str(log)!r}, "a") as f:
                f.write(json.dumps([{name!r}] + sys.argv[1:]) + "\\n")
            """)
    return bin_dir, log


def run_script(script: str, args: list[str], bin_dir: pathlib.Path,
               **env) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(["bash", script, *args], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=60)


def calls(log: pathlib.Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


# ---- lint ----

def test_shellcheck_passes_on_every_script():
    scripts = sorted(REPO.glob("launch/*.sh")) + sorted(REPO.glob("scripts/*.sh"))
    scripts.append(REPO / ".ci" / "run")
    assert REPO / TPU in scripts and REPO / GPU in scripts
    result = subprocess.run([tool("shellcheck"), "-x", *map(str, scripts)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_launch_scripts_use_strict_mode():
    for script in (TPU, GPU):
        text = (REPO / script).read_text()
        assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text


def test_hadolint_passes_on_the_dockerfile():
    result = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- dry runs against golden files ----

IMAGE_TPU = "us-central1-docker.pkg.dev/my-project/mwmae/mwmae:tpu-v1"
IMAGE_CUDA = "us-central1-docker.pkg.dev/my-project/mwmae/mwmae:cuda-v1"
POD = ["--project", "my-project", "--zone", "us-central2-b"]
DRY = {
    "tpu_up_v4-32_pip": (TPU, ["up", *POD, "--accelerator-type", "v4-32", "--spot",
                               "--workdir", "gs://my-bucket/mwmae_base",
                               "--data", "gs://my-bucket/audioset/manifest.csv",
                               "--", "--config.mesh.preset=fsdp"]),
    "tpu_up_v4-8_single_host": (TPU, ["up", *POD, "--accelerator-type", "v4-8", "--name",
                                      "mwmae-tiny", "--config", "configs/tiny.py",
                                      "--workdir", "runs/tiny_tpu"]),
    "tpu_up_v5litepod-16_queued_docker": (
        TPU, ["up", "--project", "my-project", "--zone", "us-west4-a", "--accelerator-type",
              "v5litepod-16", "--queued", "--spot", "--mode", "docker", "--image", IMAGE_TPU,
              "--workdir", "gs://my-bucket/mwmae_v5e"]),
    "tpu_babysit_v4-32_pip": (TPU, ["babysit", *POD, "--accelerator-type", "v4-32", "--spot",
                                    "--workdir", "gs://my-bucket/mwmae_base"]),
    "tpu_babysit_queued_docker": (
        TPU, ["babysit", *POD, "--accelerator-type", "v4-32", "--queued", "--spot", "--mode",
              "docker", "--image", IMAGE_TPU, "--workdir", "gs://my-bucket/mwmae_base"]),
    "tpu_logs_worker_3": (TPU, ["logs", *POD, "--worker", "3"]),
    "tpu_status_stop": (TPU, ["status", *POD, "--accelerator-type", "v4-32"]),
    "tpu_fetch": (TPU, ["fetch", *POD, "--accelerator-type", "v4-32", "--workdir",
                        "gs://my-bucket/mwmae_base", "--dest", "results/base"]),
    "tpu_delete_queued": (TPU, ["delete", *POD, "--queued"]),
    "tpu_train_v4-8_skip_preflight": (TPU, ["train", *POD, "--accelerator-type", "v4-8",
                                            "--config", "configs/tiny.py", "--workdir",
                                            "runs/tiny_tpu", "--skip-preflight"]),
    "tpu_train_v4-32_docker_skip_preflight": (
        TPU, ["train", *POD, "--accelerator-type", "v4-32", "--mode", "docker", "--image",
              IMAGE_TPU, "--workdir", "gs://my-bucket/mwmae_base", "--skip-preflight"]),
    "gpu_train_one_host": (GPU, ["train", "--image", IMAGE_CUDA, "--config",
                                 "configs/mwmae_base_200_4x16.py", "--workdir",
                                 "/srv/mwmae/runs/base", "--data",
                                 "/srv/data/audioset/manifest.csv", "--user", "1000:1000"]),
    "gpu_train_multihost_process_1": (
        GPU, ["train", "--image", IMAGE_CUDA, "--config", "configs/mwmae_base_200_4x16.py",
              "--workdir", "gs://my-bucket/mwmae_gpu", "--data",
              "gs://my-bucket/audioset/manifest.csv", "--coordinator", "10.128.0.2:12345",
              "--num-processes", "2", "--process-id", "1", "--gpus", "all", "--restart", "3",
              "--name", "mwmae-train-1", "--credentials", "/etc/mwmae/key.json", "--user",
              "1000:1000", "--", "--config.mesh.preset=fsdp"]),
    "gpu_train_skip_preflight": (GPU, ["train", "--image", IMAGE_CUDA, "--config",
                                       "configs/mwmae_base_200_4x16.py", "--workdir",
                                       "/srv/mwmae/runs/base", "--user", "1000:1000",
                                       "--restart", "3", "--skip-preflight"]),
    "gpu_export": (GPU, ["export", "--image", IMAGE_CUDA, "--workdir", "/srv/mwmae/runs/base",
                         "--out", "/srv/mwmae/exports/base", "--step", "198400", "--user",
                         "1000:1000"]),
    "gpu_eval": (GPU, ["eval", "--image", IMAGE_CUDA, "--artifact", "/srv/mwmae/exports/base",
                       "--tasks-dir", "/srv/hear/tasks", "--out", "/srv/hear/results/base",
                       "--seeds", "3", "--grid", "faster", "--gpus", "1", "--user", "1000:1000"]),
}


def dry_run(name: str, fake_bin) -> str:
    script, args = DRY[name]
    bin_dir, log = fake_bin
    result = run_script(script, [*args, "--dry-run"] if "--" not in args else
                        [*args[:args.index("--")], "--dry-run", *args[args.index("--"):]],
                        bin_dir)
    assert result.returncode == 0, result.stderr
    assert calls(log) == [], "a dry run must not run anything"
    return result.stdout


@pytest.mark.parametrize("name", sorted(DRY))
def test_dry_run_matches_golden(name, fake_bin):
    got = dry_run(name, fake_bin)
    if name == "tpu_status_stop":
        script, args = DRY[name]
        got += run_script(script, ["stop", *args[1:], "--dry-run"], fake_bin[0]).stdout
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"missing golden file {path.name}; run with UPDATE_GOLDEN=1"
    assert got == path.read_text(), f"commands changed; see {path.name} (UPDATE_GOLDEN=1)"
    for line in got.splitlines():  # every line is one shell command a shell can read back
        words = shlex.split(line)
        assert words[0] in {"gcloud", "docker", "git", "mkdir"}, line


def test_multihost_tpu_training_runs_on_all_workers_with_multihost(fake_bin):
    ssh = [shlex.split(line) for line in dry_run("tpu_up_v4-32_pip", fake_bin).splitlines()
           if " tpu-vm ssh " in line]
    start = [w for w in ssh if any("mwmae.train" in x for x in w)]
    assert len(start) == 1 and "--worker=all" in start[0]
    assert "--multihost" in start[0][-1] and "--workdir gs://my-bucket/mwmae_base" in start[0][-1]
    single = dry_run("tpu_up_v4-8_single_host", fake_bin)
    assert "mwmae.train" in single and "--multihost" not in single
    docker = dry_run("tpu_up_v5litepod-16_queued_docker", fake_bin)
    assert "queued-resources create mwmae --node-id=mwmae" in docker
    assert "--multihost" in docker and "docker run -d --name mwmae-train" in docker


def words(command: str) -> list[str]:
    """A shell command's words, with ; | > and the like as words of their own."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def job_of(remote: str) -> list[str]:
    """The words of the background job that a start command hands to setsid nohup bash -c."""
    remote_words = words(remote)
    return words(remote_words[remote_words.index("-c") + 1])


def test_tpu_preflight_runs_first_in_the_same_job_with_the_trainers_flags(fake_bin):
    trainer = ["--config", "configs/mwmae_base_200_4x16.py", "--workdir",
               "gs://my-bucket/mwmae_base", "--multihost", "--config.data.source=shards",
               "--config.data.train_shards=gs://my-bucket/audioset/manifest.csv",
               "--config.mesh.preset=fsdp"]
    lines = dry_run("tpu_up_v4-32_pip", fake_bin).splitlines()
    [start] = [shlex.split(x)[-1] for x in lines if "mwmae.train" in x]
    assert "--worker=all" in lines[-1]  # one ssh: every worker starts both together
    job = job_of(start.removeprefix("--command="))
    pre = job.index("mwmae.preflight")
    train = job.index("mwmae.train")
    assert pre < train
    assert job[pre + 1:pre + 1 + len(trainer)] == trainer == job[train + 1:train + 1 + len(trainer)]
    assert "preflight.log" in job and "preflight.rc" in start
    # the trainer is reached only past the exit-status check
    between = " ".join(job[pre:train])
    assert "if [ $rc -ne 0 ]" in between and "exit $rc" in between
    assert "gs://my-bucket/mwmae_base/preflight.json" in between

    docker = [x for x in dry_run("tpu_up_v5litepod-16_queued_docker", fake_bin).splitlines()
              if "docker run" in x]
    [start] = [shlex.split(x)[-1].removeprefix("--command=") for x in docker]
    job = job_of(start)
    runs = [i for i, w in enumerate(job) if w == "run"]
    assert len(runs) == 2
    assert job[job.index(IMAGE_TPU) + 1] == "preflight" and "--rm" in job[:job.index(IMAGE_TPU)]
    assert job[runs[1] + 1:runs[1] + 3] == ["-d", "--name"] and "mwmae-train" in job[runs[1]:]
    assert start.endswith("echo $! > preflight.pid")


def start_command(name: str, fake_bin) -> str:
    [line] = [x for x in dry_run(name, fake_bin).splitlines()
              if " tpu-vm ssh " in x and ("mwmae.train" in x or "docker run" in x)]
    return shlex.split(line)[-1].removeprefix("--command=")


def test_skip_preflight_removes_only_the_preflight(fake_bin):
    # pip: the job is the trainer alone, as it runs after a passing preflight
    with_it = job_of(start_command("tpu_up_v4-8_single_host", fake_bin))
    skipped = job_of(start_command("tpu_train_v4-8_skip_preflight", fake_bin))
    assert "mwmae.preflight" in with_it and "mwmae.preflight" not in skipped
    assert skipped == with_it[with_it.index("mwmae.train") - 2:]
    # docker: the trainer container straight away, no background job
    with_it = job_of(start_command("tpu_babysit_queued_docker", fake_bin))
    skipped = words(start_command("tpu_train_v4-32_docker_skip_preflight", fake_bin))
    assert "preflight" in with_it and "preflight" not in skipped[skipped.index(IMAGE_TPU):]
    assert "setsid" not in skipped

    def trainer(command: list[str]) -> list[str]:
        start = len(command) - 1 - command[::-1].index("sudo")
        return [w for w in command[start:] if w not in (">", "/dev/null")]

    assert trainer(skipped) == trainer(with_it)
    # gpu: one docker run, the trainer's, restart policy and all
    gpu = dry_run("gpu_train_skip_preflight", fake_bin).splitlines()
    assert len(gpu) == 1 and "--restart on-failure:3" in gpu[0] and " preflight " not in gpu[0]
    with_pre = dry_run("gpu_train_one_host", fake_bin).splitlines()
    assert len(with_pre) == 2 and f"{IMAGE_CUDA} preflight --config" in with_pre[0]


def test_gpu_preflight_shares_mounts_and_flags_but_not_the_restart_policy(fake_bin):
    pre, train = (shlex.split(x) for x in
                  dry_run("gpu_train_multihost_process_1", fake_bin).splitlines())
    i, j = pre.index(IMAGE_CUDA), train.index(IMAGE_CUDA)
    assert pre[i + 1] == "preflight" and pre[i + 2:] == train[j + 1:]
    assert "--coordinator_address=10.128.0.2:12345" in pre and "--process_id=1" in pre
    assert "--restart" not in pre and "--detach" not in pre and "--rm" in pre
    assert "on-failure:3" in train
    assert pre[pre.index("--name") + 1] == "mwmae-train-1-preflight"
    mounts = [w for k, w in enumerate(pre[:i]) if pre[k - 1] in ("-v", "-e", "--ulimit")]
    assert mounts and mounts == [w for k, w in enumerate(train[:j])
                                 if train[k - 1] in ("-v", "-e", "--ulimit")]
    # the image's entry point turns `preflight ARGS` into the preflight module with ARGS
    from mwmae import job
    assert job.module_and_args(pre[i + 1:]) == ("mwmae.preflight", train[j + 1:])


def fake_docker(bin_dir: pathlib.Path, log: pathlib.Path, preflight_rc: int) -> None:
    write_exe(bin_dir / "docker", f"""
        #!{sys.executable}
        import json, sys
        with open({str(log)!r}, "a") as f:
            f.write(json.dumps(["docker"] + sys.argv[1:]) + "\\n")
        if "preflight" in sys.argv:
            print("preflight: verdict fail (one check failed)")
            sys.exit({preflight_rc})
        """)


@pytest.mark.parametrize("rc", [1, 2])
def test_gpu_failed_preflight_stops_before_the_trainer(tmp_path, fake_bin, rc):
    bin_dir, log = fake_bin
    fake_docker(bin_dir, log, rc)
    workdir = tmp_path / "runs" / "base"
    result = run_script(GPU, ["train", "--image", IMAGE_CUDA, "--config", "configs/tiny.py",
                              "--workdir", str(workdir), "--restart", "2"], bin_dir)
    assert result.returncode == rc, result.stderr
    ran = calls(log)
    assert len(ran) == 1 and ran[0][:2] == ["docker", "run"] and "preflight" in ran[0]
    last = result.stderr.strip().splitlines()[-1]
    assert f"preflight failed (exit {rc}), so the trainer was not started" in last
    assert f"{workdir}/preflight.json" in last and "--skip-preflight" in last
    assert "verdict fail" in result.stdout  # the preflight's own lines reach the caller


def test_gpu_passing_preflight_then_starts_the_trainer(tmp_path, fake_bin):
    bin_dir, log = fake_bin
    fake_docker(bin_dir, log, 0)
    workdir = tmp_path / "runs" / "base"
    result = run_script(GPU, ["train", "--image", IMAGE_CUDA, "--config", "configs/tiny.py",
                              "--workdir", str(workdir)], bin_dir)
    assert result.returncode == 0, result.stderr
    pre, train = calls(log)
    assert pre[pre.index(IMAGE_CUDA) + 1] == "preflight"
    assert train[train.index(IMAGE_CUDA) + 1:] == pre[pre.index(IMAGE_CUDA) + 2:]
    assert f"{workdir}:/mnt/workdir" in pre and f"{workdir}:/mnt/workdir" in train
    assert workdir.is_dir()  # made before docker could make it as root


# ---- bad arguments fail before any command ----

BAD = [
    (TPU, ["create", "--project", "p", "--zone", "z", "--accelerator-type", "v9-8"],
     "unknown accelerator type 'v9-8'"),
    (TPU, ["create", "--project", "p", "--zone", "z", "--accelerator-type", "v4-12"],
     "v4 sizes are multiples of 8"),
    (TPU, ["up", "--zone", "z", "--accelerator-type", "v4-8", "--workdir", "gs://b/w"],
     "missing --project"),
    (TPU, ["up", "--project", "p", "--accelerator-type", "v4-8", "--workdir", "gs://b/w"],
     "missing --zone"),
    (TPU, ["train", "--project", "p", "--zone", "z", "--accelerator-type", "v4-32",
           "--workdir", "runs/x"], "--workdir must be on gs:// for a multi-host slice"),
    (TPU, ["babysit", "--project", "p", "--zone", "z", "--accelerator-type", "v4-8",
           "--workdir", "runs/x"], "--workdir must be on gs:// for babysit"),
    (TPU, ["train", "--project", "p", "--zone", "z", "--accelerator-type", "v4-8"],
     "missing --workdir"),
    (TPU, ["up", "--project", "p", "--zone", "z", "--accelerator-type", "v4-8", "--mode",
           "docker", "--workdir", "gs://b/w"], "--mode docker needs --image"),
    (TPU, ["create", "--project", "p", "--zone", "z", "--accelerator-type", "v4-8", "--queued",
           "--preemptible"], "use --spot"),
    (TPU, ["train", "--project", "p", "--zone", "z", "--accelerator-type", "v4-8", "--workdir",
           "gs://b/w", "--config", "configs/nope.py"], "config 'configs/nope.py' not found"),
    (TPU, ["create", "--project", "p", "--zone", "z", "--accelerator-type", "v4-8", "--bogus"],
     "unknown flag '--bogus'"),
    (TPU, ["launch"], "unknown verb 'launch'"),
    (GPU, ["train", "--image", "i", "--config", "c", "--workdir", "/srv/runs", "--coordinator",
           "h:1234", "--num-processes", "2", "--process-id", "0"],
     "--workdir must be on gs:// for a multi-host run"),
    (GPU, ["train", "--image", "i", "--config", "c", "--workdir", "gs://b/w", "--coordinator",
           "h:1234", "--num-processes", "2", "--process-id", "2"], "--process-id must be 0..1"),
    (GPU, ["train", "--config", "c", "--workdir", "/srv/runs"], "missing --image"),
    (GPU, ["train", "--image", "i", "--config", "c", "--workdir", "/srv/runs", "--gpus", "two"],
     "--gpus must be all, a count or device=I,J"),
    (GPU, ["eval", "--image", "i", "--artifact", "/nonexistent/artifact", "--tasks-dir",
           "/nonexistent/tasks", "--out", "/tmp/out"], "'/nonexistent/artifact' is not a folder"),
]


@pytest.mark.parametrize("script,args,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_arguments_fail_before_any_command(script, args, message, fake_bin):
    bin_dir, log = fake_bin
    result = run_script(script, args, bin_dir)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert result.stdout == "" and calls(log) == []


def test_help_describes_every_verb(fake_bin):
    out = run_script(TPU, ["--help"], fake_bin[0])
    assert out.returncode == 0
    for verb in ("create", "setup", "train", "up", "logs", "status", "stop", "fetch", "delete",
                 "babysit", "--dry-run"):
        assert verb in out.stdout
    out = run_script(GPU, ["--help"], fake_bin[0])
    assert out.returncode == 0
    assert all(v in out.stdout for v in ("train", "export", "eval", "--coordinator"))


# ---- babysitter against a scripted fake gcloud ----

def fake_gcloud(tmp_path, states: list[str], probes: list[list[str]]) -> tuple:
    """gcloud answering describe with `states` and status probes with `probes`, in turn."""
    bin_dir = tmp_path / "bin"
    log = tmp_path / "calls.jsonl"
    script = f"""
        #!{sys.executable}
        import json, pathlib, sys
        state = pathlib.Path({str(tmp_path)!r})
        args = sys.argv[1:]
        with open({str(log)!r}, "a") as f:
            f.write(json.dumps(args) + "\\n")
        def take(name, answers):
            counter = state / name
            i = int(counter.read_text()) if counter.exists() else 0
            counter.write_text(str(i + 1))
            return answers[min(i, len(answers) - 1)]
        if "describe" in args:
            print(take("describe", {states!r}))
        elif "ssh" in args and any("mwmae-status" in a for a in args):
            for line in take("probe", {probes!r}):
                print("mwmae-status: " + line)
        """
    write_exe(bin_dir / "gcloud", script)
    return bin_dir, log


def kind(call: list[str]) -> str:
    text = " ".join(call)
    if "describe" in call:
        return "describe"
    if "ssh" in call:
        for key, what in (("mwmae-status", "probe"), ("docker pull", "setup"),
                          ("docker run", "start"), ("docker rm", "stop"),
                          ("tail -n", "preflight log")):
            if key in text:
                return what
    return call[3] if len(call) > 3 else text


BABYSIT = ["babysit", "--project", "p", "--zone", "z", "--accelerator-type", "v4-16", "--mode",
           "docker", "--image", IMAGE_TPU, "--workdir", "gs://b/w", "--poll", "0"]


def test_babysit_recreates_a_preempted_tpu_and_restarts_a_crashed_run(tmp_path):
    bin_dir, log = fake_gcloud(
        tmp_path, states=["READY", "PREEMPTED", "READY", "READY"],
        probes=[["running", "running"], ["done 0", "absent"], ["done 0", "done 0"]])
    result = run_script(TPU, BABYSIT, bin_dir)
    assert result.returncode == 0, result.stderr
    assert "training finished on all 2 workers" in result.stderr
    assert [kind(c) for c in calls(log)] == [
        "describe", "probe",                                   # running: nothing to do
        "describe", "delete", "create", "setup", "start",      # preempted: recreate, resume
        "describe", "probe", "stop", "start",                  # a worker died: restart
        "describe", "probe"]                                   # both done: finished
    create = next(c for c in calls(log) if kind(c) == "create")
    assert "--accelerator-type=v4-16" in create and "--version=tpu-ubuntu2204-base" in create


def test_babysit_gives_up_after_max_restarts(tmp_path):
    bin_dir, log = fake_gcloud(tmp_path, states=["READY"], probes=[["done 1", "done 1"]])
    result = run_script(TPU, [*BABYSIT, "--max-restarts", "2"], bin_dir)
    assert result.returncode != 0 and "giving up" in result.stderr
    assert [kind(c) for c in calls(log)].count("start") == 2


def test_babysit_waits_for_the_preflight_and_stops_when_it_fails(tmp_path):
    bin_dir, log = fake_gcloud(
        tmp_path, states=["READY"],
        probes=[["preflight", "preflight"], ["preflight failed 1", "preflight failed 1"]])
    result = run_script(TPU, BABYSIT, bin_dir)
    assert result.returncode == 1, result.stderr
    assert "preflight running on 2 worker(s)" in result.stderr
    assert [kind(c) for c in calls(log)] == [
        "describe", "probe",                       # the preflight is running: wait
        "describe", "probe", "preflight log", "stop"]  # it failed: show it, stop, no restart
    last = result.stderr.strip().splitlines()[-1]
    assert "preflight failed on 2 worker(s) (exit 1)" in last
    assert "gs://b/w/preflight.json" in result.stderr and "--skip-preflight" in result.stderr
    tail = next(c for c in calls(log) if kind(c) == "preflight log")
    assert "--worker=0" in tail


# ---- the remote training commands (pip mode), run here in a fake home ----

def remote_command(verb: str, fake_bin) -> str:
    args = [verb, *POD, "--accelerator-type", "v4-8", "--dry-run"]
    if verb == "train":
        args += ["--config", "configs/tiny.py", "--workdir", "gs://b/tiny"]
    out = run_script(TPU, args, fake_bin[0]).stdout.strip().splitlines()
    [line] = [x for x in out if " tpu-vm ssh " in x]
    [command] = [w for w in shlex.split(line) if w.startswith("--command=")]
    return command.removeprefix("--command=")


def test_remote_start_status_and_stop_work_in_a_shell(tmp_path, fake_bin):
    home = tmp_path / "home"
    # The preflight waits while `hold` exists and exits with the number in `preflight_exit`.
    write_exe(home / "mwmae" / ".venv" / "bin" / "python", """
        #!/usr/bin/env bash
        if [ "$2" = mwmae.preflight ]; then
          echo "$@" > preflight_args.txt
          echo "verdict: $(cat preflight_exit 2> /dev/null || echo 0)"
          while [ -f hold ]; do sleep 0.1; done
          exit "$(cat preflight_exit 2> /dev/null || echo 0)"
        fi
        echo "$@" > args.txt
        for _ in $(seq 100); do [ -f release ] && exit 0; sleep 0.1; done
        exit 3
        """)
    repo = home / "mwmae"
    start, probe, stop = (remote_command(v, fake_bin) for v in ("train", "status", "stop"))

    def sh(command: str) -> str:
        return subprocess.run(["bash", "-c", command], cwd=home, capture_output=True, text=True,
                              timeout=30, env={**os.environ, "HOME": str(home)}).stdout.strip()

    def wait_for(expected: str) -> None:
        deadline = time.monotonic() + 15
        while sh(probe) != f"mwmae-status: {expected}" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sh(probe) == f"mwmae-status: {expected}"

    assert sh(probe) == "mwmae-status: absent"
    (repo / "hold").touch()
    sh(start)
    wait_for("preflight")
    assert not (repo / "args.txt").exists()  # the trainer waits for the preflight
    (repo / "hold").unlink()
    wait_for("running")
    (repo / "release").touch()
    wait_for("done 0")
    flags = ["--config", "configs/tiny.py", "--workdir", "gs://b/tiny"]
    assert (repo / "args.txt").read_text().split() == ["-m", "mwmae.train", *flags]
    assert (repo / "preflight_args.txt").read_text().split() == ["-m", "mwmae.preflight", *flags]
    assert (repo / "preflight.log").read_text() == "verdict: 0\n"
    assert (repo / "train.log").read_text().startswith("verdict: 0\n")  # what logs shows
    (repo / "release").unlink()
    sh(start)
    wait_for("running")
    sh(stop)
    wait_for("absent")  # the whole process group is gone, and no exit code was written

    # a failing preflight: recorded as such, the trainer never starts, the log says why
    (repo / "args.txt").unlink()
    (repo / "preflight_exit").write_text("1")
    sh(start)
    wait_for("preflight failed 1")
    deadline = time.monotonic() + 15  # the job writes its last line just after preflight.rc
    while "mwmae: " not in (repo / "train.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not (repo / "args.txt").exists() and not (repo / "train.rc").exists()
    log = (repo / "train.log").read_text().splitlines()
    assert log[0] == "verdict: 1"
    assert log[-1] == ("mwmae: preflight exited 1, so the trainer was not started; its verdict "
                       "is in gs://b/tiny/preflight.json")
    (repo / "preflight_exit").write_text("0")
    sh(start)  # the next start clears the old verdict
    wait_for("running")
    sh(stop)
    wait_for("absent")


# ---- Dockerfile, CI and the shared install script ----

def dockerfile_install_run() -> str:
    """The Dockerfile's RUN instruction that installs the package, as one shell command."""
    text = (REPO / "Dockerfile").read_text()
    for instruction in re.split(r"\n(?=[A-Z]+ )", re.sub(r"\\\n", " ", text)):
        if instruction.startswith("RUN ") and "scripts/install.sh" in instruction:
            return instruction.removeprefix("RUN ")
    pytest.fail("the Dockerfile does not run scripts/install.sh")


def stub_install(root: pathlib.Path, log: pathlib.Path) -> None:
    write_exe(root / "scripts" / "install.sh", f"""
        #!/usr/bin/env bash
        echo "PYTHON=${{PYTHON:-}} $*" >> {log}
        """)


@pytest.mark.parametrize("target,extras", [("cpu", "test,hear,demo"), ("tpu", "test,tpu"),
                                           ("cuda", "train,test,cuda,hear-torch"), ("gpu", None)])
def test_dockerfile_installs_with_the_shared_script(tmp_path, target, extras):
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^COPY scripts \./scripts$", dockerfile, re.M)
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\} AS base$", dockerfile, re.M)
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm$", dockerfile, re.M)
    assert re.search(r"^USER 1000:1000$", dockerfile, re.M)
    assert '\nENTRYPOINT ["python", "-m", "mwmae.job"]\n' in dockerfile
    log = tmp_path / "install.log"
    stub_install(tmp_path, log)
    result = subprocess.run(["bash", "-o", "pipefail", "-c", dockerfile_install_run()],
                            cwd=tmp_path, env={**os.environ, "TARGET": target, "EXTRAS": ""},
                            capture_output=True, text=True, timeout=30)
    if extras is None:
        assert result.returncode != 0 and "TARGET must be cpu, tpu or cuda" in result.stderr
        assert not log.exists()
    else:
        assert result.returncode == 0, result.stderr
        assert log.read_text() == f"PYTHON=python3 /opt/venv {extras}\n"


@pytest.mark.parametrize("target,torch_index,expected", [
    ("cpu", "", "https://download.pytorch.org/whl/cpu"),  # PyPI's Linux torch is the CUDA build
    ("cpu", "https://mirror.example/torch-cpu", "https://mirror.example/torch-cpu"),
    ("cpu", "none", "unset"),  # the configured indexes hold the CPU wheel
    ("tpu", "", "unset"), ("cuda", "", "unset")])
def test_dockerfile_picks_where_torch_comes_from(tmp_path, target, torch_index, expected):
    write_exe(tmp_path / "scripts" / "install.sh", f"""
        #!/usr/bin/env bash
        echo "${{PIP_EXTRA_INDEX_URL-unset}}" >> {tmp_path / 'index.log'}
        """)
    env = {k: v for k, v in os.environ.items() if k != "PIP_EXTRA_INDEX_URL"}
    result = subprocess.run(["bash", "-o", "pipefail", "-c", dockerfile_install_run()],
                            cwd=tmp_path, env={**env, "TARGET": target, "EXTRAS": "",
                                               "TORCH_INDEX": torch_index},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "index.log").read_text() == f"{expected}\n"


@pytest.mark.parametrize("target,cuda,fails", [("cuda", None, True), ("cuda", "13.0", False),
                                               ("cpu", None, False), ("tpu", None, False)])
def test_dockerfile_refuses_a_cpu_torch_in_the_cuda_image(tmp_path, target, cuda, fails):
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    guard = next(i.removeprefix("RUN ") for i in re.split(r"\n(?=[A-Z]+ )", text)
                 if i.startswith("RUN ") and "torch.version.cuda" in i)
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    version = "2.13.0+cpu" if cuda is None else "2.13.0"
    (fake / "__init__.py").write_text(f"import types\n__version__ = {version!r}\n"
                                      f"version = types.SimpleNamespace(cuda={cuda!r})\n")
    python = write_exe(tmp_path / "python", f"""
        #!/usr/bin/env bash
        PYTHONPATH={fake.parent} exec {sys.executable} "$@"
        """)
    assert "/opt/venv/bin/python" in guard
    result = subprocess.run(["bash", "-o", "pipefail", "-c",
                             guard.replace("/opt/venv/bin/python", str(python))],
                            env={**os.environ, "TARGET": target}, capture_output=True, text=True,
                            timeout=30)
    if fails:
        assert result.returncode == 1
        assert "cuda image: torch 2.13.0+cpu is a CPU build" in result.stderr
    else:
        assert result.returncode == 0, result.stderr


def test_dockerfile_says_what_each_image_carries():
    header = (REPO / "Dockerfile").read_text().split("\nARG ")[0]
    for target, carries in (("cpu", "HEAR evaluation"), ("tpu", "jax[tpu]"),
                            ("cuda", "jax[cuda12]")):
        assert re.search(rf"^#\s+{target}\s+.*{re.escape(carries)}", header, re.M), target
    assert "No torch" in header and "PyTorch" in header
    # The extras are chosen in one place: the install step's case block.
    assert (REPO / "Dockerfile").read_text().count("extras=") == 3


def test_install_skips_an_unchanged_install_and_redoes_a_changed_one(tmp_path):
    """The stamp of the last install (pyproject.toml, constraints.txt and the extras) lets
    scripts/install.sh return at once when nothing pip reads has changed."""
    import hashlib

    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    for name in ("scripts/install.sh", "pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, repo / name)
    calls = tmp_path / "python.log"
    write_exe(repo / "venv" / "bin" / "python", f"""
        #!/usr/bin/env bash
        echo "$*" >> {calls}
        """)
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()
                            + (REPO / "constraints.txt").read_bytes()).hexdigest()
    stamp = repo / "venv" / ".mwmae-installed"
    stamp.write_text(f"{digest} train,test\n")
    run = lambda: subprocess.run(["bash", "scripts/install.sh", "venv", "test"], cwd=repo,
                                 capture_output=True, text=True, timeout=60)
    r = run()
    assert r.returncode == 0 and "is installed in venv" in r.stdout, r.stderr
    assert calls.read_text() == "-c import mwmae\n"  # no pip
    stamp.write_text(f"{digest} train,test,hear\n")  # installed with other extras
    r = run()
    assert r.returncode == 0, r.stderr
    assert "-m pip install --quiet -c constraints.txt -e .[train,test]" in calls.read_text()
    assert stamp.read_text() == f"{digest} train,test\n"


def ci_repo(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A copy of .ci/run and the scripts it calls, with the installer and the venvs stubbed."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", repo / ".ci" / "run")
    (repo / "scripts").mkdir()
    for script in ("test.sh", "docs.sh", "test_tpu.sh", "test_gpu.sh"):
        shutil.copy(REPO / "scripts" / script, repo / "scripts" / script)
    log = tmp_path / "install.log"
    stub_install(repo, log)
    for venv, name in ((".venv", "ruff"), (".venv", "python"), (".venv", "mkdocs"),
                       (".venv-tpu", "python"), (".venv-gpu", "python")):
        write_exe(repo / venv / "bin" / name, f"""
            #!/usr/bin/env bash
            echo "{venv} {name} CI=$CI $*" >> {tmp_path / 'venv.log'}
            """)
    return repo, log


def test_ci_runs_the_same_install_script(tmp_path):
    """.ci/run -> scripts/test.sh -> scripts/install.sh, run with the installer stubbed."""
    repo, log = ci_repo(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    result = subprocess.run(["bash", ".ci/run"], cwd=repo, capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    # The default environment first; the compile groups' environments install in the background
    # while the suites run (so their order among the default suite's own call is not fixed),
    # and their test scripts call the installer again (a no-op once installed).
    installs = log.read_text().splitlines()
    assert installs[0] == "PYTHON= .venv test,hear,demo,docs"
    assert collections.Counter(installs) == {"PYTHON= .venv test,hear,demo,docs": 2,
                                             "PYTHON= .venv-tpu test,tpu": 2,
                                             "PYTHON= .venv-gpu test,cuda": 2}
    assert installs.index("PYTHON= .venv-tpu test,tpu") < installs.index(
        "PYTHON= .venv-gpu test,cuda")
    ran = (tmp_path / "venv.log").read_text()
    # The manual as a site, strictly, after the default suite and before the slow group.
    assert re.search(r"^\.venv mkdocs CI= build --strict --site-dir \S+$", ran, re.M)
    assert ran.index("-m pytest -m not slow") < ran.index("mkdocs") < ran.index("-m slow")
    # The slow group without the image build (buildah as root, 10-15 min: run on purpose).
    assert ".venv python CI= -m pytest -m slow and not images" in ran
    assert re.search(r"^\.venv-tpu python CI=\S* -m pytest tests_tpu", ran, re.M)
    # Then the GPU compile checks, slow ones included (the base step for 1 and 8 H100s).
    assert re.search(r"^\.venv-gpu python CI=\S* -m pytest tests_gpu --durations=10 -m $", ran,
                     re.M)
    assert ran.index("tests_tpu") < ran.index("tests_gpu")
    # ... and the cpu image calls the same script with the same extra
    assert "cpu) extras=\"test,hear,demo\"" in dockerfile_install_run()


def test_dockerignore_keeps_the_context_small_but_complete():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "runs", "dist"} <= ignored
    copied = re.findall(r"^COPY (?:--chown=\S+ )?(?!--from)(.+) \S+$",
                        (REPO / "Dockerfile").read_text(), re.M)
    assert {"scripts", "mwmae", "configs", "tests"} <= {s for c in copied for s in c.split()}
    for sources in copied:
        for source in sources.split():
            assert source not in ignored and (REPO / source).exists(), source


# ---- cloudbuild.yaml ----

def test_cloudbuild_builds_tests_and_pushes_the_images():
    import yaml  # PyYAML comes with flax (a core dependency)
    build = yaml.safe_load((REPO / "cloudbuild.yaml").read_text())
    subs = build["substitutions"]
    assert set(subs) == {"_PROJECT", "_REGION", "_REPOSITORY", "_TAG"}
    assert subs["_PROJECT"] == "${PROJECT_ID}" and build["options"]["dynamicSubstitutions"]
    steps = {step["id"]: step for step in build["steps"]}
    assert list(steps) == ["build-cpu", "unit-tests", "build-tpu", "build-cuda"]
    image = "${_REGION}-docker.pkg.dev/${_PROJECT}/${_REPOSITORY}/mwmae:%s-${_TAG}"
    for target in ("cpu", "tpu", "cuda"):
        args = steps[f"build-{target}"]["args"]
        assert args[:3] == ["build", "--build-arg", f"TARGET={target}"] and args[-1] == "."
        assert args[args.index("-t") + 1] == image % target
    assert build["images"] == [image % t for t in ("cpu", "tpu", "cuda")]
    tests = steps["unit-tests"]
    assert tests["name"] == image % "cpu" and tests["waitFor"] == ["build-cpu"]
    assert tests["entrypoint"] == "python" and tests["args"][:2] == ["-m", "pytest"]
    assert "not slow" in tests["args"]
    assert steps["build-tpu"]["waitFor"] == ["unit-tests"] == steps["build-cuda"]["waitFor"]
    # every substitution used is defined, and every test the step leaves out exists
    text = (REPO / "cloudbuild.yaml").read_text()
    assert set(re.findall(r"\$\{(_[A-Z_]+)\}", text)) <= set(subs)
    for arg in tests["args"]:
        if arg.startswith("--ignore="):
            assert (REPO / arg.removeprefix("--ignore=")).exists(), arg
    deselected = re.findall(r"test_\w+", tests["args"][tests["args"].index("-k") + 1])
    model_tests = (REPO / "tests" / "test_model.py").read_text()
    assert deselected and all(f"def {name}(" in model_tests for name in deselected)


# ---- XManager launcher: specs built, submission intercepted ----

DRIVER = """
import collections, json, os, runpy, sys
from xmanager import xm
from xmanager.xm import async_packager, job_operators, utils
from xmanager.xm_local import experiment as local_experiment

recorded = {"packaged": [], "jobs": []}

def package(packageables):  # instead of pulling/pushing images
    for p in packageables:
        recorded["packaged"].append({"image": p.executable_spec.image_path,
                                     "spec": type(p.executor_spec).__name__,
                                     "push": getattr(p.executor_spec, "push_image_tag", None)})
    return [xm.Executable(name="mwmae") for _ in packageables]

async def submit(self, job_group):  # the call that would start the jobs
    for job in job_operators.flatten_jobs(job_group):
        options = getattr(job.executor, "docker_options", None)
        recorded["jobs"].append({
            "executor": type(job.executor).__name__,
            "argv": job.args.to_list(utils.ARGV_ESCAPER),
            "requirements": {r.name.lower(): v for r, v
                             in job.executor.requirements.task_requirements.items()},
            "volumes": options.volumes if options else None})
    return local_experiment._LaunchResult(collections.defaultdict(list))

local_experiment.LocalExperiment._async_packager = async_packager.AsyncPackager(package)
local_experiment.LocalExperimentUnit._submit_jobs_for_execution = submit
try:
    sys.argv = ["xm_launcher.py", *sys.argv[1:]]
    runpy.run_path(os.environ["XM_LAUNCHER"], run_name="__main__")
finally:
    with open(os.environ["XM_RECORD"], "w") as f:
        json.dump(recorded, f)
"""


def run_launcher(tmp_path, args: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    try:
        import xmanager  # noqa: F401
    except ImportError:
        pytest.fail("xmanager is not installed (the launch extra: pip install -e '.[launch]')")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    record = tmp_path / "record.json"
    env = {**os.environ, "HOME": str(tmp_path / "home"), "XM_RECORD": str(record),
           "XM_LAUNCHER": str(REPO / "xm_launcher.py")}
    result = subprocess.run([sys.executable, str(driver), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    return result, json.loads(record.read_text()) if record.exists() else {}


def test_xm_launcher_builds_a_vertex_sweep(tmp_path):
    result, rec = run_launcher(tmp_path, [
        "--executor=vertex", f"--image={IMAGE_CUDA}", "--workdir=gs://my-bucket/sweep",
        "--accelerator=a100", "--accelerator_count=8", "--data=gs://my-bucket/shards/m.csv",
        "--sweep_decoder_windows=2,5,10,25,50,125,0,0", "--sweep_decoder_windows=5,25,0,0,0,0,0,0",
        "--sweep_mask_ratio=0.7,0.8", "--override=batch_size=512"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert rec["packaged"] == [{"image": IMAGE_CUDA, "spec": "VertexSpec", "push": IMAGE_CUDA}]
    assert len(rec["jobs"]) == 4
    assert {job["executor"] for job in rec["jobs"]} == {"Vertex"}
    assert all(job["requirements"] == {"a100": 8} for job in rec["jobs"])
    first = rec["jobs"][0]["argv"]
    assert first == [
        "--config=configs/mwmae_base_200_4x16.py",
        "--workdir=gs://my-bucket/sweep/dw2-5-10-25-50-125-0-0_mr0.7",
        "--config.data.source=shards", "--config.data.train_shards=gs://my-bucket/shards/m.csv",
        "--config.batch_size=512",
        "--config.model.decoder_window_sizes=(2,5,10,25,50,125,0,0)",
        "--config.model.mask_ratio=0.7"]
    workdirs = [a for job in rec["jobs"] for a in job["argv"] if a.startswith("--workdir=")]
    assert len(set(workdirs)) == 4  # every point has its own checkpoints


def test_xm_launcher_builds_a_local_docker_run(tmp_path):
    runs = tmp_path / "runs"
    result, rec = run_launcher(tmp_path, ["--image=mwmae:cpu", "--config=configs/tiny.py",
                                          f"--workdir={runs}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert rec["packaged"] == [{"image": "mwmae:cpu", "spec": "LocalSpec", "push": None}]
    [job] = rec["jobs"]
    assert job["executor"] == "Local" and job["volumes"] == {str(runs): "/mnt/workdir"}
    assert job["argv"] == ["--config=configs/tiny.py", "--workdir=/mnt/workdir"]
    assert (tmp_path / "home" / ".xmanager").exists()  # the local experiment's database


def test_xm_launcher_chains_pretrain_export_and_evaluation_per_point(tmp_path):
    result, rec = run_launcher(tmp_path, [
        "--executor=vertex", f"--image={IMAGE_CUDA}", "--workdir=gs://my-bucket/sweep",
        "--accelerator=a100", "--sweep_mask_ratio=0.7,0.8", "--override=batch_size=512",
        "--hear_tasks=gs://my-bucket/hear/tasks", "--hear_args=--seeds 10 --preset hear2021"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert [job["argv"] for job in rec["jobs"]][0] == [
        "sweep", "point", "--config=configs/mwmae_base_200_4x16.py",
        "--workdir=gs://my-bucket/sweep/mr0.7", "--tasks-dir=gs://my-bucket/hear/tasks",
        "--set=batch_size=512", "--set=model.mask_ratio=0.7",
        "--evaluate=--seeds 10 --preset hear2021"]
    # What the image's entry point makes of those arguments: the sweep's point command.
    from mwmae import job

    module, args = job.module_and_args(rec["jobs"][1]["argv"])
    assert module == "mwmae.sweep" and args[:2] == ["point",
                                                    "--config=configs/mwmae_base_200_4x16.py"]
    assert job.module_and_args(["--config=c", "--workdir=w"]) == ("mwmae.train",
                                                                  ["--config=c", "--workdir=w"])


@pytest.mark.parametrize("args,message", [
    (["--executor=vertex", "--image=i", "--workdir=runs/x"], "must be on gs:// for Vertex AI"),
    (["--executor=vertex", "--image=i", "--workdir=gs://b/w", "--accelerator=tpu_v3",
      "--accelerator_count=32"], "launch/tpu_vm.sh"),
    (["--workdir=runs/x"], "--image is required"),
    (["--image=i", "--workdir=w", "--sweep_mask_ratio=0.8,1.5"], "mask ratio must be in (0, 1)"),
    (["--image=i", "--workdir=w", "--hear_args=--seeds 3"], "--hear_args needs --hear_tasks"),
])
def test_xm_launcher_rejects_bad_flags(args, message):
    result = subprocess.run([sys.executable, "xm_launcher.py", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr, result.stderr
