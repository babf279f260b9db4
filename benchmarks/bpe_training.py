"""BPE training and encoding speed, measured side by side in one run.

    python benchmarks/bpe_training.py            # Tiny Shakespeare, vocabulary 1,024 (a few minutes)
    python benchmarks/bpe_training.py --chars 200000 --vocab-size 512   # quicker

1. Training: the textbook loop that recounts every pair after each merge (`naive=True`) against the
   incremental trainer, on the same text to the same vocabulary; checks they learn the same merges and
   prints the speed-up.
2. Encoding: our from-scratch GPT-2 tokenizer against tiktoken on the same text, cold (a fresh
   tokenizer, empty chunk cache) and warm (second pass), in MB/s and as a ratio.
3. One long chunk (a word of 5,000 and of 50,000 random letters): `merge_chunk` (a heap, O(n log n))
   and tiktoken, and how much longer each takes for the 10x longer word (a quadratic loop: 100x).
"""

import argparse
import random
import time

import tiktoken

from ch01_tokenization.tokenization import BPETokenizer, merge_chunk
from shared.data import read_text


def seconds(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chars", type=int, default=None, help="train on the first N characters only")
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()

    text = read_text("tinyshakespeare")[: args.chars]
    mb = len(text.encode("utf-8")) / 1e6
    print(f"Training to {args.vocab_size} tokens on {mb:.2f} MB of Tiny Shakespeare")
    fast_s, fast = seconds(BPETokenizer().train, text, args.vocab_size)
    print(f"  incremental: {fast_s:8.2f} s", flush=True)
    naive_s, naive = seconds(BPETokenizer().train, text, args.vocab_size, naive=True)
    print(f"  naive:       {naive_s:8.2f} s")
    assert fast.ranks == naive.ranks, "the two trainers learned different merges"
    print(f"  same merges; incremental is {naive_s / fast_s:.0f}x faster than naive")

    corpus = read_text("tinyshakespeare") + read_text("the-verdict")
    mb = len(corpus.encode("utf-8")) / 1e6
    reference = tiktoken.get_encoding("gpt2")
    ours = BPETokenizer.from_gpt2()
    cold_s, ids = seconds(ours.encode_ordinary, corpus)
    warm_s, _ = seconds(ours.encode_ordinary, corpus)
    tik_s, tik_ids = seconds(reference.encode_ordinary, corpus)
    assert ids == tik_ids, "our GPT-2 ids differ from tiktoken's"
    print(f"\nEncoding {mb:.2f} MB with GPT-2's vocabulary ({len(ids):,} tokens, identical ids)")
    print(f"  tiktoken (Rust):          {mb / tik_s:7.2f} MB/s")
    print(f"  ours, cold chunk cache:   {mb / cold_s:7.2f} MB/s  ({tik_s / cold_s:.2f}x tiktoken's speed)")
    print(f"  ours, warm chunk cache:   {mb / warm_s:7.2f} MB/s  ({tik_s / warm_s:.2f}x tiktoken's speed)")

    word = "".join(random.Random(1).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(50_000))
    print("\nOne chunk of n random letters (a base64 blob or a DNA line looks like this to the split pattern)")
    times = {}
    for n in (5_000, 50_000):
        chunk = word[:n].encode()
        times["merge_chunk", n], parts = seconds(merge_chunk, chunk, ours.ranks)
        times["tiktoken", n], tik = seconds(reference.encode_ordinary, word[:n])
        assert [ours.ranks[p] for p in parts] == tik
        print(f"  n = {n:6,}: merge_chunk {times['merge_chunk', n] * 1e3:8.1f} ms, "
              f"tiktoken {times['tiktoken', n] * 1e3:6.1f} ms")
    growth = {name: times[name, 50_000] / times[name, 5_000] for name in ("merge_chunk", "tiktoken")}
    print(f"  10x longer: merge_chunk takes {growth['merge_chunk']:.0f}x the time, tiktoken {growth['tiktoken']:.0f}x "
          f"(a quadratic loop: 100x)")



if __name__ == "__main__":
    main()
