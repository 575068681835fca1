import numpy as np
import pytest

from lmforge.data.shards import ShardWriter, open_shard
from lmforge.errors import DataError


def test_write_and_memmap_roundtrip(tmp_path):
    with ShardWriter(tmp_path / "s", vocab_size=65535, tokenizer_hash="abc", bos_id=50256) as w:
        w.write([50256, 1, 2, 3], documents=1)
        w.write(np.array([50256, 65535 - 1]), documents=1)
    tokens, header = open_shard(tmp_path / "s")
    assert tokens.dtype == np.uint16 and header["count"] == 6 and header["documents"] == 2
    assert tokens.tolist() == [50256, 1, 2, 3, 50256, 65534]


def test_uint32_for_large_vocab_and_range_check(tmp_path):
    with ShardWriter(tmp_path / "big", vocab_size=100_000) as w:
        w.write([99_999])
    tokens, header = open_shard(tmp_path / "big.bin")
    assert header["dtype"] == "uint32" and tokens.tolist() == [99_999]
    with pytest.raises(DataError, match="out of range"), ShardWriter(tmp_path / "c", vocab_size=10) as w:
        w.write([10])
    assert not (tmp_path / "c.bin").exists() and not (tmp_path / "c.json").exists()


def test_truncated_shard_is_detected(tmp_path):
    with ShardWriter(tmp_path / "s", vocab_size=100) as w:
        w.write(range(10))
    (tmp_path / "s.bin").write_bytes(b"\0" * 6)
    with pytest.raises(DataError, match="does not match header"):
        open_shard(tmp_path / "s")
