from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def artifact_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One artifact cache shared by the unit tests, so each structure is generated once."""
    return tmp_path_factory.mktemp("artifact-cache")
