"""One spawn of 2 gloo processes per test session runs every distributed scenario (workers._all)."""

import pytest

from tests.distributed import workers as w


@pytest.fixture(scope="session")
def spawned(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    shards = w.write_shards(out / "shards")
    info = w.spawn("all", out, 2, str(shards))
    return out, shards, info
