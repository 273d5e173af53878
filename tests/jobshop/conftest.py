import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def taillard_dir():
    path = Path(os.environ.get("TAILLARD_DATA", REPO / ".." / "shared" / "data" / "taillard"))
    if not (path / "instances" / "ta01.txt").is_file():
        if os.environ.get("CI"):  # in CI a skipped test is a failure in disguise
            pytest.fail(f"Taillard data not found at {path} (../shared/data/taillard, or set TAILLARD_DATA)")
        pytest.skip("Taillard data not found (set TAILLARD_DATA)")
    return path
