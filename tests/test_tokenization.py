import json
import random
from collections import Counter

import pytest
import tiktoken
import torch

from ch01_tokenization.tokenization import (
    GPT2_SPLIT_PATTERN,
    BPETokenizer,
    GPTDataset,
    create_dataloader,
    learn_merges,
    learn_merges_naive,
    merge_pair,
    split_into_chunks,
)
from shared.data import fetch, read_text


@pytest.fixture(scope="module")
def gpt2():
    return BPETokenizer.from_gpt2(fetch("gpt2-encoder"), fetch("gpt2-vocab-bpe"))


@pytest.fixture(scope="module")
def reference():
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="module")
def verdict():
    return read_text("the-verdict")


def random_texts(seed: int, count: int) -> list[str]:
    """Adversarial strings: mixed scripts, emoji (with modifiers), odd whitespace, contractions."""
    rng = random.Random(seed)
    alphabet = list("abcXYZ019 '\t\n\r.,!?-_\"") + [
        "é", "ß", "日", "本", "🤗", "👍🏽", "\u200b", "\u00a0", "\u2028", "\u3000", "ﬁ", "Ω", "١", "²",
        "\x00", "\x85", "'s", "'LL", " the", "   ", "\n\n"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(count)]
    for _ in range(count // 2):
        codepoints = [rng.choice([rng.randint(0x20, 0xD7FF), rng.randint(0x10000, 0x1FFFF)])
                      for _ in range(rng.randint(1, 12))]
        texts.append("".join(map(chr, codepoints)))
    return texts


# ---- exactly GPT-2's tokenizer ------------------------------------------------------------

def test_gpt2_vocabulary_matches_tiktoken(gpt2, reference):
    assert gpt2.n_vocab == reference.n_vocab == 50257
    assert gpt2.special_tokens == {"<|endoftext|>": 50256}
    assert len(gpt2.merges) == 50000
    for i in [0, 1, 255, 256, 1000, 30000, 50255]:
        assert gpt2.token_bytes(i) == reference.decode_single_token_bytes(i)


def test_gpt2_ids_equal_tiktoken_on_real_text(gpt2, reference, verdict):
    shakespeare = read_text("tinyshakespeare")[:200_000]
    for text in [verdict, shakespeare]:
        assert gpt2.encode(text) == reference.encode(text)


@pytest.mark.parametrize("text", [
    "", " ", "Hello, world!", "  leading and trailing  ", "tabs\tand\nnewlines\n\n\n  \n",
    "I'm sure you'll see we've done it; they'd say it's 'quoted'.", "CAN'T WON'T", "x" * 5000,
    " " * 300 + "end", "naïve café — “quotes” …", "日本語のテキスト", "Привет, мир", "مرحبا بالعالم",
    "emoji 🤗🧪👩‍👩‍👧‍👦 flags 🇫🇷", "numbers 1234567890 3.14159 1e-10", "\u200b\u200c\ufeff zero widths",
    "def f(x):\n    return x ** 2  # code\n",
])
def test_gpt2_ids_equal_tiktoken_on_hard_cases(gpt2, reference, text):
    assert gpt2.encode(text) == reference.encode(text)
    assert gpt2.decode(gpt2.encode(text)) == text


def test_gpt2_ids_equal_tiktoken_on_random_strings(gpt2, reference):
    for text in random_texts(seed=0, count=2000):
        assert gpt2.encode(text) == reference.encode(text), repr(text)


def test_special_tokens_like_tiktoken(gpt2, reference):
    text = "first<|endoftext|>second <|endoftext|><|endoftext|> third"
    assert gpt2.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    assert gpt2.encode(text, allowed_special={"<|endoftext|>"}).count(50256) == 3
    assert gpt2.encode_ordinary(text) == reference.encode_ordinary(text)
    with pytest.raises(ValueError, match="not allowed"):
        gpt2.encode(text)
    with pytest.raises(ValueError, match="unknown special token"):
        gpt2.encode("hi", allowed_special={"<|im_start|>"})


def test_decode_replaces_partial_utf8_like_tiktoken(gpt2, reference):
    ids = gpt2.encode("🤗")
    assert len(ids) > 1
    for cut in range(1, len(ids)):
        assert gpt2.decode(ids[:cut]) == reference.decode(ids[:cut])
        assert "\ufffd" in gpt2.decode(ids[:cut])


def test_decode_unknown_id_is_an_error(gpt2):
    with pytest.raises(ValueError, match="token id 50257 does not exist"):
        gpt2.decode([50257])
    with pytest.raises(ValueError, match="-1"):
        gpt2.decode([-1])


def test_from_gpt2_refuses_mismatched_files(tmp_path):
    vocab = fetch("gpt2-vocab-bpe").read_text(encoding="utf-8").splitlines()
    vocab[1], vocab[2] = vocab[2], vocab[1]  # swap the first two merges
    bad = tmp_path / "vocab.bpe"
    bad.write_text("\n".join(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="does not match"):
        BPETokenizer.from_gpt2(fetch("gpt2-encoder"), bad)


def test_from_gpt2_defaults_fetch_the_files(gpt2):
    assert BPETokenizer.from_gpt2().ranks == gpt2.ranks


# ---- training -----------------------------------------------------------------------------

def test_split_pattern_is_lossless(verdict):
    chunks = split_into_chunks(verdict)
    assert "".join(chunks) == verdict
    assert split_into_chunks("Hello world's  end!!\n") == ["Hello", " world", "'s", " ", " end", "!!", "\n"]


def test_merge_pair():
    assert merge_pair([1, 2, 2, 2, 1, 2], (2, 2), 9) == [1, 9, 2, 1, 2]
    assert merge_pair([1, 2, 1, 2], (1, 2), 7) == [7, 7]
    assert merge_pair([], (1, 2), 7) == []


def test_incremental_training_equals_the_naive_loop(verdict):
    chunks = [c.encode("utf-8") for c in split_into_chunks(verdict)]
    naive = learn_merges_naive(chunks, 300)
    fast = learn_merges(Counter(chunks), 300)
    assert fast == naive
    assert len({new for _, new in fast}) == 300


def test_training_reaches_the_vocab_size_and_round_trips(verdict):
    tok = BPETokenizer().train(verdict, 400, special_tokens=["<|endoftext|>"])
    assert tok.n_vocab == 400
    assert tok.special_tokens == {"<|endoftext|>": 399}
    assert len(set(tok.vocab.values())) == len(tok.vocab) == 399  # no duplicate tokens
    ids = tok.encode(verdict)
    assert tok.decode(ids) == verdict
    assert len(ids) < len(verdict.encode("utf-8")) / 1.5  # it compresses
    other = "Zebras quizzically jump 🦓 — über 42!"
    assert tok.decode(tok.encode(other)) == other  # never out-of-vocabulary
    joined = tok.encode("a<|endoftext|>b", allowed_special="all")
    assert joined[1] == 399 and tok.decode(joined) == "a<|endoftext|>b"


def test_training_ignores_special_token_text(verdict):
    text = (verdict[:3000] + "<|endoftext|>") * 3
    tok = BPETokenizer().train(text, 300, special_tokens=["<|endoftext|>"])
    assert not any(b"<|" in tok.vocab[i] for i in tok.vocab)


def test_training_naive_flag_gives_same_tokenizer(verdict):
    fast = BPETokenizer().train(verdict[:5000], 300)
    slow = BPETokenizer().train(verdict[:5000], 300, naive=True)
    assert fast.ranks == slow.ranks


def test_training_too_small_text_warns():
    with pytest.warns(UserWarning, match="ran out of pairs"):
        tok = BPETokenizer().train("ab ab", 300)
    assert tok.n_vocab == 258  # "ab" and " ab", then nothing left to merge


@pytest.mark.parametrize("bad, match", [
    (255, "too small"), (300.0, "must be an int"), ("300", "must be an int"), (True, "must be an int"),
])
def test_bad_vocab_size(bad, match):
    with pytest.raises(ValueError, match=match):
        BPETokenizer().train("some text", bad)


def test_vocab_size_must_leave_room_for_specials():
    with pytest.raises(ValueError, match="1 special token"):
        BPETokenizer().train("text", 256, special_tokens=["<|endoftext|>"])


def test_untrained_tokenizer_is_plain_bytes():
    tok = BPETokenizer()
    assert tok.encode("hé") == list("hé".encode())


# ---- files --------------------------------------------------------------------------------

def test_save_and_load_round_trip(tmp_path, verdict, gpt2):
    tok = BPETokenizer().train(verdict, 350, special_tokens=["<|endoftext|>"])
    loaded = BPETokenizer.load(tok.save(tmp_path / "tok.json"))
    assert loaded.ranks == tok.ranks and loaded.special_tokens == tok.special_tokens
    assert loaded.encode(verdict) == tok.encode(verdict)
    big = BPETokenizer.load(gpt2.save(tmp_path / "gpt2.json"))
    assert big.encode(verdict) == gpt2.encode(verdict)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.json", "tok.json"]  # no temp files left


@pytest.mark.parametrize("content", [
    "not json at all", json.dumps({"hello": 1}), json.dumps([1, 2]),
    json.dumps({"format": "llm-from-scratch-bpe", "version": 99, "pattern": "", "tokens": [],
                "special_tokens": {}}),
    json.dumps({"format": "llm-from-scratch-bpe", "version": 1, "pattern": GPT2_SPLIT_PATTERN,
                "tokens": ["zz"], "special_tokens": {}}),
])
def test_loading_something_else_is_a_clear_error(tmp_path, content):
    path = tmp_path / "other.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="is not a tokenizer saved by BPETokenizer.save"):
        BPETokenizer.load(path)


def test_loading_a_binary_file_is_a_clear_error(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match="is not a tokenizer"):
        BPETokenizer.load(path)


# ---- data loading -------------------------------------------------------------------------

def test_dataset_windows_are_shifted_by_one():
    ids = list(range(100, 120))
    ds = GPTDataset(ids, max_length=4, stride=3)
    assert len(ds) == len(range(0, 20 - 4, 3)) == 6
    x, y = ds[1]
    assert x.tolist() == [103, 104, 105, 106] and y.tolist() == [104, 105, 106, 107]
    x, y = ds[len(ds) - 1]
    assert y[-1].item() <= 119


def test_dataset_uses_every_token_when_stride_equals_length():
    ds = GPTDataset(list(range(9)), max_length=4, stride=4)
    assert [ds[k][0].tolist() for k in range(len(ds))] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ds[1][1].tolist() == [5, 6, 7, 8]


def test_dataset_bad_arguments():
    with pytest.raises(ValueError, match="too few"):
        GPTDataset([1, 2, 3], max_length=3, stride=1)
    with pytest.raises(ValueError, match="at least 1"):
        GPTDataset([1, 2, 3], max_length=2, stride=0)


def test_dataloader_batches_and_seeded_shuffle():
    ids = torch.arange(1000)
    loader = create_dataloader(ids, batch_size=8, max_length=16, stride=16, seed=1)
    x, y = next(iter(loader))
    assert x.shape == y.shape == (8, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    again = next(iter(create_dataloader(ids, batch_size=8, max_length=16, stride=16, seed=1)))[0]
    assert torch.equal(x, again)
    ordered = create_dataloader(ids, batch_size=8, max_length=16, stride=16, shuffle=False)
    assert next(iter(ordered))[0][0].tolist() == list(range(16))
    assert len(ordered) == (1000 - 16 + 15) // 16 // 8  # drop_last
