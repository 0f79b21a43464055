"""The multi-process launcher (tests/multihost/launch.py) and the package's one way into a job
(`mla_jax.parallel.initialize`): processes on localhost join, their collectives add up across
processes, and a failing or hanging job ends with every process stopped and its output reported."""

import json
import os
import sys
import time

import pytest

from multihost.launch import JobFailed, launch

HERE = os.path.dirname(os.path.abspath(__file__))


def test_two_processes_join_and_sum_across_them():
    procs = launch([os.path.join(HERE, "psum_worker.py")], python=True, num_processes=2, devices_per_process=2,
                   timeout=120)
    seen = [json.loads(p.out.strip().splitlines()[-1]) for p in procs]
    assert [s["process"] for s in seen] == [0, 1]
    for s in seen:
        assert s["joined"] and s["processes"] == 2 and s["devices"] == 4 and s["local_devices"] == 2, s
        assert s["collectives"] == "gloo", s
        assert s["sum"] == 2 * 1 + 2 * 2, s  # two devices of process 0 hold 1, two of process 1 hold 2
    assert [s["main"] for s in seen] == [True, False]


def test_a_failing_process_stops_the_others_and_is_reported():
    # process 1 fails at once; process 0 would wait for it for ever
    script = "import os, sys, time; i = int(os.environ['MLA_JAX_PROCESS_ID']); print('started', i, flush=True); " \
             "sys.exit(3) if i == 1 else time.sleep(600)"
    begin = time.monotonic()
    with pytest.raises(JobFailed, match="process 1 exited with 3") as e:
        launch(["-c", script], python=True, timeout=60)
    assert time.monotonic() - begin < 30
    assert [p.rc for p in e.value.procs] == [None, 3]  # None: stopped by the launcher
    assert [p.out for p in e.value.procs] == ["started 0\n", "started 1\n"]


def test_a_job_past_its_timeout_is_stopped():
    script = "import time; print('{process_id} of {num_processes} at {coordinator}', flush=True); time.sleep(600)"
    with pytest.raises(JobFailed, match="did not finish within 3 s") as e:
        launch(["-c", script], python=True, via_env=False, timeout=3)
    procs = e.value.procs
    assert [p.rc for p in procs] == [None, None]
    assert [p.out.split(" at ")[0] for p in procs] == ["0 of 2", "1 of 2"]
    assert procs[0].out.split(" at localhost:")[1].strip().isdigit()


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "localhost:1234"], r"missing \['--num-processes \(\$MLA_JAX_NUM_PROCESSES\)', "
                                          r"'--process-id \(\$MLA_JAX_PROCESS_ID\)'\]"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "--coordinator 'localhost': expected HOST:PORT"),
    (["--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "2"], "--process-id 2 with --num-processes 2"),
])
def test_an_incomplete_or_wrong_job_is_a_usage_error_naming_the_option(argv, message, monkeypatch):
    import argparse

    from mla_jax.errors import UsageError
    from mla_jax.parallel import launch as job

    for name in job.ENV.values():
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser()
    job.add_arguments(parser)
    with pytest.raises(UsageError, match=message):
        job.distributed_settings(parser.parse_args(argv))


def test_the_job_comes_from_the_environment_when_no_flag_names_it(monkeypatch):
    from mla_jax.parallel.launch import settings

    monkeypatch.setenv("MLA_JAX_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("MLA_JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("MLA_JAX_PROCESS_ID", "1")
    assert settings() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert settings(process_id=0)["process_id"] == 0  # a flag wins over its variable
    for name in ("MLA_JAX_COORDINATOR", "MLA_JAX_NUM_PROCESSES", "MLA_JAX_PROCESS_ID"):
        monkeypatch.delenv(name)
    assert settings() is None  # one process, no job
