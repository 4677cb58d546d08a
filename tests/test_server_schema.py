"""The served OpenAPI spec is true: schemathesis (its CLI, every check) fuzzes a running server
against its own /openapi.json: no 5xx, every status and content type documented, bodies as
documented, schema-valid requests accepted, schema-invalid ones refused, 405s with ``Allow``,
the API key enforced where the spec says so.

One allowance: a request valid per the spec may get a 400 for a limit no JSON schema can state
(a prompt longer than the context in tokens, prompts x n over the batch size, min_tokens over
max_tokens, stream_options without stream): the server marks those with the codes in
``CROSS_FIELD_CODES``, and ``valid_data_refused_only_for_cross_field_limits`` below (loaded into
schemathesis as a hook) fails any other 400 on valid data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install schemathesis)")

from rm_runner.server.app import CROSS_FIELD_CODES  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KEY = "schema-key"

CONFIG = """
[checks.positive_data_acceptance]
# 400 too, for the cross-field limits; the hook below fails every other 400 on valid data.
expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]
"""


@schemathesis.check
def valid_data_refused_only_for_cross_field_limits(ctx, response, case):
    """A schema-valid request answered 400 must name a limit the schema cannot state."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return None
    code = response.json()["error"]["code"]
    if code not in CROSS_FIELD_CODES:
        raise AssertionError(f"a request valid per the spec got a 400 ({code}): {response.text[:500]}")
    return None


def test_schemathesis_finds_nothing_against_the_served_spec(tmp_path: Path) -> None:
    from tests.conftest import Server

    srv = Server(tmp_path / "run", "model=tiny-random", "server.max_tokens=4", "server.max_batch_size=4",
                 "server.max_wait_ms=0", env={"RM_RUNNER_API_KEY": KEY})
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", "--checks", "all",
             "--max-examples", "10", "--seed", "1", "--workers", "1", "--request-timeout", "60",
             "-H", f"Authorization: Bearer {KEY}", f"{srv.base}/openapi.json"],
            cwd=tmp_path, capture_output=True, text=True, timeout=600,
            env={**os.environ, "SCHEMATHESIS_HOOKS": __file__, "PYTHONPATH": str(REPO), "NO_COLOR": "1"},
        )
    finally:
        srv.stop()
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    assert "Tested: 9" in run.stdout  # every operation of the spec was exercised
