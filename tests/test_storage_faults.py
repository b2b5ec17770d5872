"""Storage faults in front of real servers (issue 8): a fault-injecting HTTP
proxy (``tests/fault_proxy.py``) between ckptmgr and fake-gcs-server or moto.

Random 503s and connection resets, a lost response on the manifest's
create-only write, persistent 500s, unreachable endpoints, missing
credentials. Saves complete or fail with one ``CkptmgrError`` line; nothing
partial is ever listed; a save that committed never reports failure.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ckptmgr import CheckpointManager
from ckptmgr.errors import CkptmgrError, StorageError
from fault_proxy import FaultProxy, Rule
from servers import free_port
from writer_worker import snapshot

MANIFEST = re.compile(r"(^|/)ckpt-\d{9,}\.json$")
REPO = Path(__file__).resolve().parents[1]


def is_manifest_write(req) -> bool:
    return req.is_write and bool(req.object_name) and bool(MANIFEST.search(req.object_name))


class Faulty:
    """A checkpoint directory reached through a fault-injecting proxy."""

    def __init__(self, name, server, proxy):
        self.name, self.server, self.proxy = name, server, proxy
        self.url = server.new_url()
        self.options = proxy.storage_options_for(server.storage_options)
        if name == "s3":  # 2 attempts, not 5: keeps persistent faults quick
            self.options["config_kwargs"] = {"retries": {"max_attempts": 1}}

    def manager(self, **kwargs) -> CheckpointManager:
        return CheckpointManager(self.url, storage_options=self.options, **kwargs)

    def direct(self) -> CheckpointManager:
        """The same directory without the proxy: what is really there."""
        return CheckpointManager(self.url, storage_options=self.server.storage_options)


@pytest.fixture(params=["gcs", "s3"])
def faulty(request, fast_gcsfs_retries):
    name = request.param
    server = request.getfixturevalue(f"{name}_server")
    with FaultProxy.for_server(server, seed=11) as proxy:
        yield Faulty(name, server, proxy)


def save(manager: CheckpointManager, step: int):
    return manager.write_snapshot(step, snapshot(step))


def test_lost_response_on_the_manifest_write_is_not_a_failure(faulty):
    """The create-only manifest write lands but its response is lost; the
    client's retry then sees "already exists". Reading back shows it is ours."""
    mgr = faulty.manager()
    save(mgr, 1)
    faulty.proxy.set_rules([Rule(kind="lose_response", match=is_manifest_write, times=1)])
    manifest = save(mgr, 2)
    assert faulty.proxy.injected("lose_response") == 1
    assert manifest.step == 2
    direct = faulty.direct()
    assert direct.steps() == [1, 2]
    assert direct.manifest(2).attempt == manifest.attempt
    assert all(r.ok for r in direct.verify())


def test_lost_response_on_the_lease_claim_is_not_a_failure(faulty):
    faulty.proxy.set_rules([Rule(kind="lose_response", match=lambda r: r.is_write and "lease-" in (r.object_name or ""), times=1)])
    mgr = faulty.manager()
    save(mgr, 1)
    assert faulty.proxy.injected("lose_response") == 1
    save(mgr, 2)  # holds the newest lease: not fenced by its own first claim
    assert faulty.direct().steps() == [1, 2]


def test_random_503s_and_resets_never_list_partial_or_report_falsely(faulty):
    faulty.proxy.set_rules([
        Rule(kind="status", status=503, probability=0.12),
        Rule(kind="reset", probability=0.05),
        Rule(kind="lose_response", probability=0.05),
    ])
    mgr = faulty.manager(keep_last=3)
    outcomes = {}
    for step in range(1, 9):
        try:
            save(mgr, step)
            outcomes[step] = "ok"
        except CkptmgrError as exc:
            assert "\n" not in str(exc) and str(exc), repr(exc)
            outcomes[step] = str(exc)
    faulty.proxy.clear_rules()
    injected = sum(faulty.proxy.stats["injected"].values())
    assert injected >= 6, faulty.proxy.stats  # it really was a bad network
    direct = faulty.direct()
    listed = direct.steps()
    assert all(r.ok for r in direct.verify() if r.step in listed)
    saved = [s for s, o in outcomes.items() if o == "ok"]
    assert saved, outcomes
    assert max(saved) in listed  # the newest good save is never lost
    for step in listed:  # a listed step was reported saved: no false failure
        assert outcomes[step] == "ok", (step, outcomes)


def test_persistent_500s_fail_with_one_line_and_list_nothing(faulty):
    mgr = faulty.manager()
    save(mgr, 1)
    faulty.proxy.set_rules([Rule(kind="persistent_status", status=500)])
    with pytest.raises(StorageError) as info:
        save(mgr, 2)
    message = str(info.value)
    assert "\n" not in message and faulty.url in message
    assert "HttpError" in message or "OSError" in message or "Storage failed" in message
    with pytest.raises(StorageError):
        mgr.steps()
    faulty.proxy.clear_rules()
    assert faulty.direct().steps() == [1]
    assert all(r.ok for r in faulty.direct().verify() if r.step == 1)


@pytest.fixture
def cli_in_process(capsys):
    """Run ``ckptmgr.cli.main`` here (so gcsfs's fast retries apply), then put
    the logging the CLI configures back."""
    from ckptmgr.cli import main
    from ckptmgr.io.backend_errors import NOISY_LOGGERS

    names = ("ckptmgr",) + NOISY_LOGGERS
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).propagate, logging.getLogger(n).level) for n in names}

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:], logger.propagate, logger.level = handlers, propagate, level


def _option_args(options: dict) -> list[str]:
    import json

    args = []
    for key, value in options.items():
        args += ["--storage-option", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return args


def test_cli_under_persistent_500s_prints_one_line(faulty, cli_in_process):
    save(faulty.manager(), 1)
    faulty.proxy.set_rules([Rule(kind="persistent_status", status=500)])
    for command in (["list"], ["verify"], ["inspect"]):
        code, out, err = cli_in_process(*command, faulty.url, *_option_args(faulty.options))
        assert code == 1, (command, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (command, err)
        assert "Traceback" not in err


def test_cli_unreachable_gcs_endpoint_is_one_line(tmp_path, cli_in_process, fast_gcsfs_retries):
    port = free_port()  # nothing listens there
    code, out, err = cli_in_process(
        "list", "gs://bucket/run", "--storage-option", "token=anon",
        "--storage-option", f"endpoint_url=http://127.0.0.1:{port}",
    )
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "gs://bucket/run" in lines[0], err


def _cli_subprocess(args: list[str], env: dict[str, str], timeout: float = 120):
    full = dict(env, PYTHONPATH=str(REPO), PATH=os.environ.get("PATH", ""))
    return subprocess.run([sys.executable, "-m", "ckptmgr.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full)


def test_cli_unreachable_s3_endpoint_and_missing_credentials_are_one_line(tmp_path, s3_server):
    clean = {"HOME": str(tmp_path), "AWS_CONFIG_FILE": str(tmp_path / "none"),
             "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    port = free_port()
    unreachable = _cli_subprocess(
        ["list", "s3://bucket/run", "--storage-option", "key=x", "--storage-option", "secret=y",
         "--storage-option", f'client_kwargs={{"endpoint_url": "http://127.0.0.1:{port}"}}',
         "--storage-option", 'config_kwargs={"retries": {"max_attempts": 1}}'], clean)
    no_credentials = _cli_subprocess(
        ["list", s3_server.new_url(), "--storage-option",
         f'client_kwargs={{"endpoint_url": "{s3_server.endpoint}"}}'], clean)
    for result in (unreachable, no_credentials):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 1, result.stderr
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Credentials" in no_credentials.stderr or "credentials" in no_credentials.stderr
