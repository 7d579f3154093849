"""examples/one_shot.py, three copies started together: the job runs once (issue 14, item 1)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.contrib.helpers import EXAMPLES, PYTHON, child_env, lease_info
from tests.redis_server import RedisServer


@pytest.mark.timeout(60)
def test_three_copies_of_the_one_shot_example_run_the_job_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # A fresh Redis: every copy waits out the first-use lock-delay (ttl 1 s), then one wins.
    args = [PYTHON, str(EXAMPLES / "one_shot.py"), "--redis", redis_server.url, "--ttl", "1"]
    args += ["--steps", "2", "--hold-at-least", "3"]
    procs = [
        subprocess.Popen(
            args,
            cwd=tmp_path,
            env=child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [proc.communicate(timeout=45)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    ran = [out for out in outputs if "running the job" in out and "not running" not in out]
    skipped = [out for out in outputs if "another node holds the lease" in out]
    assert len(ran) == 1 and len(skipped) == 2, outputs
    assert "step 2/2 done" in ran[0] and ran[0].splitlines()[-1] == "job done; lease released"
    assert not lease_info(redis_server, "examples:one-shot").held
