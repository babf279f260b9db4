"""Chapter 4's FineWeb-Edu path, offline: parquet files made here, tokenised into shards and read back, checked
against tiktoken."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from ch01_tokenization.tokenization import TiktokenTokenizer
from ch04_pretraining import fineweb
from ch04_pretraining.config import TrainConfig
from ch04_pretraining.data import load_data
from ch04_pretraining.fineweb import (
    ShardedTokens,
    ShardError,
    read_shard,
    tokenize_parquet,
    write_shard,
)
from shared.config import ConfigError

DOCUMENTS = ["The cell is the basic unit of life.", "Water boils at 100 °C at sea level. ∑ αβγ 😀",
             "A page that quotes <|endoftext|> as text.", "", "Photosynthesis turns light into sugar.\n\nIt needs CO₂."]


def make_parquet(path, documents, extra_column=True):
    columns = {"text": documents}
    if extra_column:
        columns["score"] = [3.5] * len(documents)
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


def expected_ids(documents):
    gpt2 = tiktoken.get_encoding("gpt2")
    return [i for text in documents if text for i in [gpt2.eot_token, *gpt2.encode_ordinary(text)]]


def test_a_parquet_file_becomes_shards_of_tiktokens_ids_in_order(tmp_path):
    source = make_parquet(tmp_path / "000_00000.parquet", DOCUMENTS * 3)
    manifest = tokenize_parquet(source, tmp_path / "tokens", TiktokenTokenizer("gpt2"), shard_tokens=40,
                                threads=3, progress=False)
    expected = expected_ids(DOCUMENTS * 3)
    assert manifest["tokens"] == len(expected) and len(manifest["shards"]) == -(-len(expected) // 40)
    assert manifest["bytes"] == sum(len(text.encode("utf-8")) for text in DOCUMENTS * 3)
    shards = [read_shard(tmp_path / "tokens" / name) for name in manifest["shards"]]
    assert all(len(shard) == 40 for shard in shards[:-1])
    assert np.concatenate(shards).tolist() == expected               # the literal <|endoftext|> stays text
    assert json.loads((tmp_path / "tokens" / "000_00000.json").read_text()) == manifest


def test_max_tokens_keeps_whole_documents(tmp_path):
    source = make_parquet(tmp_path / "013_00000.parquet", DOCUMENTS * 4)
    whole = expected_ids(DOCUMENTS[:2])
    manifest = tokenize_parquet(source, tmp_path / "val", TiktokenTokenizer("gpt2"), max_tokens=len(whole) + 3,
                                progress=False)
    assert manifest["tokens"] == len(whole) and manifest["bytes"] == sum(len(t.encode()) for t in DOCUMENTS[:2])


def test_tokenising_is_done_once_and_an_interrupted_file_starts_again(tmp_path):
    source = make_parquet(tmp_path / "000_00000.parquet", DOCUMENTS)
    tokenizer = TiktokenTokenizer("gpt2")
    first = tokenize_parquet(source, tmp_path / "t", tokenizer, shard_tokens=16, progress=False)
    source.write_bytes(b"gone")                        # not read again: the manifest says the work is done
    assert tokenize_parquet(source, tmp_path / "t", tokenizer, shard_tokens=16, progress=False) == first
    make_parquet(source, DOCUMENTS)
    (tmp_path / "t" / "000_00000.json").unlink()       # as a run stopped before the manifest was written
    (tmp_path / "t" / first["shards"][-1]).unlink()
    assert tokenize_parquet(source, tmp_path / "t", tokenizer, shard_tokens=16, progress=False) == first


def test_bad_files_are_named_with_what_to_do(tmp_path):
    bad = tmp_path / "000_00000.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(ShardError, match=r"000_00000.parquet cannot be read as a parquet file.*downloaded again"):
        tokenize_parquet(bad, tmp_path / "t", TiktokenTokenizer("gpt2"), progress=False)
    no_text = tmp_path / "001_00000.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), no_text)        # a parquet file without a text column
    with pytest.raises(ShardError, match="with a text column"):
        tokenize_parquet(no_text, tmp_path / "t", TiktokenTokenizer("gpt2"), progress=False)
    shard = tmp_path / "s.bin"
    write_shard(shard, np.arange(100))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r"s.bin says it holds 100 ids \(1,224 bytes\) but has 1,214"):
        read_shard(shard)
    shard.write_bytes(b"\0" * 2000)
    with pytest.raises(ShardError, match="is not a token shard"):
        read_shard(shard)


def test_sharded_tokens_read_as_one_sequence(tmp_path):
    ids = np.arange(250) % 65536
    paths = []
    for index, (start, stop) in enumerate([(0, 100), (100, 130), (130, 250)]):
        paths.append(tmp_path / f"{index}.bin")
        write_shard(paths[-1], ids[start:stop])
    tokens = ShardedTokens(paths)
    assert len(tokens) == 250 and tokens[0] == 0 and tokens[129] == 129 and tokens[-1] == 249
    for start, stop in [(0, 250), (95, 135), (100, 130), (129, 131), (240, 260), (10, 10)]:
        assert tokens[start:stop].tolist() == ids[start:stop].tolist()


def test_fineweb_edu_trains_on_the_first_files_and_holds_out_the_last(tmp_path, monkeypatch):
    sources = {f"fineweb-edu-{i:03d}": make_parquet(tmp_path / f"{i:03d}_00000.parquet", [f"doc {i} {j}." for j in
                                                                                         range(5)])
               for i in range(fineweb.FINEWEB_EDU_FILES)}
    monkeypatch.setattr(fineweb, "fetch", lambda name, progress=True: sources[name])
    monkeypatch.setattr(fineweb, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(fineweb, "VAL_TOKENS", 12)
    tokenizer, train, val, manifest = fineweb.fineweb_edu(2, progress=False)
    assert train[:].tolist() == expected_ids([f"doc {i} {j}." for i in range(2) for j in range(5)])
    assert val[:].tolist() == expected_ids(["doc 13 0.", "doc 13 1."]) and manifest["tokens"] == len(val)
    for files in (0, 14, 2.0, True):
        with pytest.raises(ConfigError, match="data_files: FineWeb-Edu's sample has 13 files to train on"):
            fineweb.fineweb_edu(files)


def test_a_run_on_fineweb_edu_is_refused_before_any_download_when_its_settings_cannot_work(monkeypatch):
    monkeypatch.setattr(fineweb, "fetch", lambda name, progress=True: pytest.fail("nothing may be downloaded"))
    with pytest.raises(ConfigError, match="tokenizer: FineWeb-Edu is read with the gpt2 tokenizer, not 'char'"):
        load_data(TrainConfig(data="fineweb-edu", tokenizer="char"))
    with pytest.raises(ConfigError, match="data_files: must be"):
        TrainConfig(data="fineweb-edu", tokenizer="gpt2", data_files=0)
    with pytest.raises(ConfigError, match="data_files: FineWeb-Edu's sample has 13 files"):
        load_data(TrainConfig(data="fineweb-edu", tokenizer="gpt2", data_files=20))
