import json
import random
from collections import Counter

import pytest
import tiktoken
import torch

from ch01_tokenization.tokenization import (
    CL100K_SPECIAL_TOKENS,
    CL100K_SPLIT_PATTERN,
    GPT2_SPLIT_PATTERN,
    LLAMA3_SPLIT_PATTERN,
    BPETokenizer,
    CharTokenizer,
    GPTDataset,
    TiktokenTokenizer,
    Tokenizer,
    create_dataloader,
    derive_merges,
    learn_merges,
    learn_merges_naive,
    merge_chunk,
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


def obvious_merge(chunk: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's rule at its plainest: merge the leftmost lowest-ranked pair until none is a token."""
    parts = [chunk[i:i + 1] for i in range(len(chunk))]
    while True:
        candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not candidates:
            return parts
        _, i = min(candidates)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


def test_merge_chunk_equals_the_obvious_loop_on_random_vocabularies():
    rng = random.Random(3)
    for _ in range(300):
        alphabet = rng.sample(b"abcdef ", rng.randint(2, 7))
        ranks = {bytes([b]): b for b in range(256)}
        for _ in range(rng.randint(1, 30)):        # random multi-byte tokens with distinct ranks
            token = bytes(rng.choice(alphabet) for _ in range(rng.randint(2, 4)))
            ranks.setdefault(token, len(ranks))
        chunk = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        assert merge_chunk(chunk, ranks) == obvious_merge(chunk, ranks), (chunk, ranks)


def test_a_50000_letter_word_encodes_like_tiktoken(gpt2, reference):
    """The obvious loop is quadratic in a chunk's length (32 s for this word); merge_chunk is not."""
    word = "".join(random.Random(1).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(50_000))
    assert gpt2.encode(word) == reference.encode(word)
    assert gpt2.encode("a" * 50_000) == reference.encode("a" * 50_000)


def test_merges_derived_from_ranks_equal_gpt2s_vocab_bpe(gpt2):
    assert derive_merges(gpt2.ranks) == gpt2.merges and len(gpt2.merges) == 50_000
    assert BPETokenizer(gpt2.ranks).merges == gpt2.merges          # derived when not given


# ---- one interface for every tokenizer ----------------------------------------------------

@pytest.fixture(scope="module")
def cl100k():
    return BPETokenizer.from_tiktoken(fetch("cl100k-base"), CL100K_SPLIT_PATTERN, CL100K_SPECIAL_TOKENS)


def test_from_tiktoken_gives_cl100k_base_ids(cl100k, verdict):
    reference = tiktoken.get_encoding("cl100k_base")
    assert cl100k.n_vocab == reference.n_vocab and cl100k.special_tokens == {
        token: reference.encode_single_token(token) for token in reference.special_tokens_set}
    texts = [verdict, "In 2024: 1234567 tokens... (really?)  \n\n  x", *random_texts(3, 300)]
    texts += [t + "<|endoftext|>" + t[::-1] + "<|fim_middle|>" for t in texts[:50]]
    for text in texts:
        assert cl100k.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all"), text


def test_from_tiktoken_round_trips_through_save(cl100k, tmp_path):
    reloaded = Tokenizer.load(cl100k.save(tmp_path / "cl100k.json"))
    text = "Ünïcode, digits 98765 and <|endofprompt|>"
    assert reloaded.encode(text, allowed_special="all") == cl100k.encode(text, allowed_special="all")
    assert reloaded.merges == cl100k.merges


def test_from_tiktoken_names_a_bad_line(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("IQ== 0\nnot-base64! 1\n", encoding="ascii")
    with pytest.raises(ValueError, match="line 2"):
        BPETokenizer.from_tiktoken(bad, GPT2_SPLIT_PATTERN)


def test_llama3_pattern_splits_like_cl100k_on_ordinary_text(verdict):
    """Llama 3's pattern is cl100k's without possessive quantifiers: the same chunks on ordinary text."""
    assert split_into_chunks(verdict, LLAMA3_SPLIT_PATTERN) == split_into_chunks(verdict, CL100K_SPLIT_PATTERN)
    assert split_into_chunks("12345 it's", LLAMA3_SPLIT_PATTERN) == ["123", "45", " it", "'s"]


def test_ids_with_gaps_and_missing_bytes():
    """Special tokens before the ordinary ones, and a vocabulary without some bytes (SmolLM2's layout)."""
    ranks = {bytes([b]): 10 + b for b in range(256) if b != 4}
    ranks[b"ab"] = 300
    tok = BPETokenizer(ranks, {"<|s|>": 0, "<|e|>": 1})
    assert tok.n_vocab == 301 and tok.encode("ab<|e|>", allowed_special="all") == [300, 1]
    data = tok.to_dict()
    assert data["tokens"][:3] == [None, None, None]               # ids 0..9 are not ordinary tokens
    reloaded = BPETokenizer.from_dict(data)
    assert reloaded.ranks == tok.ranks and reloaded.special_tokens == tok.special_tokens
    with pytest.raises(ValueError, match="no token for the byte"):
        tok.encode("a\x04b")
    with pytest.raises(ValueError, match="already taken"):
        BPETokenizer(ranks, {"<|x|>": 300})


def test_from_byte_level_refuses_merges_out_of_id_order():
    tokens = {"a": 0, "b": 1, "c": 2, "ab": 4, "bc": 3}
    assert BPETokenizer.from_byte_level(tokens, ["b c", "a b"], {}).encode("abc") == [0, 3]
    with pytest.raises(ValueError, match="merge 1"):
        BPETokenizer.from_byte_level(tokens, ["a b", "b c"], {})


def test_char_tokenizer_follows_the_interface(tmp_path):
    tok = CharTokenizer("hello world")
    assert tok.chars == " dehlorw" and tok.n_vocab == 8 and tok.special_tokens == {} and tok.eot_token is None
    assert tok.decode(tok.encode("lower")) == "lower"
    with pytest.raises(ValueError, match="'z' is not in"):
        tok.encode("zoo")
    with pytest.raises(ValueError, match="token id 8 does not exist"):
        tok.decode([8])
    loaded = Tokenizer.load(tok.save(tmp_path / "chars.json"))
    assert isinstance(loaded, CharTokenizer) and loaded.chars == tok.chars
    with pytest.raises(ValueError, match="holds a CharTokenizer"):
        BPETokenizer.load(tmp_path / "chars.json")


def test_tiktoken_tokenizer_is_interchangeable_with_ours(gpt2, verdict, tmp_path):
    fast = TiktokenTokenizer("gpt2")
    assert fast.n_vocab == gpt2.n_vocab and fast.special_tokens == gpt2.special_tokens and fast.eot_token == 50256
    texts = [verdict, "x<|endoftext|>y", "🤗 café"]
    assert fast.encode_batch(texts, allowed_special="all") == gpt2.encode_batch(texts, allowed_special="all")
    assert fast.decode(fast.encode(verdict)) == verdict
    for tok in (fast, gpt2):
        with pytest.raises(ValueError, match="not allowed"):
            tok.encode("x<|endoftext|>y")
        with pytest.raises(ValueError, match="not allowed"):
            tok.encode_batch(["fine", "x<|endoftext|>y"])
        with pytest.raises(ValueError, match="token id 50257 does not exist"):
            tok.decode([50257])
    assert isinstance(Tokenizer.load(fast.save(tmp_path / "t.json")), TiktokenTokenizer)


def test_special_tokens_must_be_a_list_of_non_empty_strings(verdict):
    with pytest.raises(ValueError, match=r"got the string '<\|endoftext\|>'; write special_tokens=\['<"):
        BPETokenizer().train(verdict, 300, special_tokens="<|endoftext|>")
    with pytest.raises(ValueError, match="non-empty string"):
        BPETokenizer().train(verdict, 300, special_tokens=[""])
    with pytest.raises(ValueError, match="non-empty string"):
        BPETokenizer(special_tokens={"": 256})
    tok = BPETokenizer(special_tokens={"<|endoftext|>": 256})
    with pytest.raises(ValueError, match=r"write allowed_special=\{'<\|endoftext\|>'\}"):
        tok.encode("a<|endoftext|>", allowed_special="<|endoftext|>")


def test_sparse_special_ids_count_like_tiktoken():
    """n_vocab is one more than the largest id (cl100k_base's specials have gaps)."""
    tok = BPETokenizer(special_tokens={"<|a|>": 300, "<|b|>": 256})
    assert tok.n_vocab == 301
    assert tok.decode(tok.encode("x<|a|>", allowed_special="all")) == "x<|a|>"
    with pytest.raises(ValueError, match="already taken"):
        BPETokenizer(special_tokens={"<|a|>": 255})


def test_a_split_pattern_with_a_capturing_group_keeps_every_character():
    tok = BPETokenizer(pattern=r"( ?\p{L}+)|\s+|.")
    text = "Hello, wide world!"
    assert tok.decode(tok.encode(text)) == text
    assert split_into_chunks(text, r"( ?\p{L}+)|\s+|.")[:3] == ["Hello", ",", " wide"]


def test_a_split_pattern_that_skips_characters_is_an_error():
    with pytest.raises(ValueError, match="skips characters"):
        BPETokenizer(pattern=r"\w+").encode("two words")


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
    assert loaded.merges == tok.merges                       # kept, not re-derived (ours can differ)
    big = BPETokenizer.load(gpt2.save(tmp_path / "gpt2.json"))
    assert big.encode(verdict) == gpt2.encode(verdict) and big.merges == gpt2.merges
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


def test_version_1_files_without_merges_still_load(tmp_path, verdict):
    tok = BPETokenizer().train(verdict, 300)
    data = {"format": "llm-from-scratch-bpe", **tok.to_dict(), "version": 1}
    del data["merges"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = BPETokenizer.load(tmp_path / "old.json")
    assert old.ranks == tok.ranks and old.merges == derive_merges(tok.ranks)


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


def test_an_empty_vocabulary_with_special_tokens_only():
    tok = BPETokenizer({}, {"<|x|>": 0})
    assert tok.n_vocab == 1 and tok.encode("<|x|>", allowed_special="all") == [0]
