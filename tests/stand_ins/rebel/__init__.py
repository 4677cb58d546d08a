"""Test-only stand-in for Rebellions' compiler module: reports $RBLN_STANDIN_NPUS devices."""

import os


def get_npu_count() -> int:
    return int(os.environ.get("RBLN_STANDIN_NPUS", "1"))
