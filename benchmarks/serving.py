"""Chapter 6's server under load: tokens per second with 1, 4 and 16 streaming clients at once, against the
same requests sent one at a time, measured side by side in one run.

    python benchmarks/serving.py [--model FILE.gguf] [--tokens 64] [--clients 1 4 16] [--rounds 2]
                                 [--llama-server PATH]

It starts `python -m ch06_llama serve` on a free port of 127.0.0.1 with the model (default SmolLM2-135M-Instruct,
4-bit GGUF), then, for each count of clients, sends that many completions at once (streamed, greedy, a different
prompt each, `--tokens` tokens each unless the model ends sooner) and counts the tokens the answers took over the
time from the first request to the last answer. "one at a time" sends the largest count of the same requests one
after another. Rounds alternate the settings, so that the machine's noise falls on all of them alike.

`--llama-server PATH` names llama.cpp's `llama-server` binary: it then serves the same file on another port,
with as many parallel slots as the largest count of clients, and is measured the same way in the same rounds.
"""
import argparse
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from shared.data import fetch
from shared.network import free_port

ROOT = Path(__file__).resolve().parent.parent
SUBJECTS = ["the sea", "a city at night", "an old tree", "the first snow", "a train journey", "a lighthouse",
            "the desert", "a market", "a clockmaker", "a lost key", "the moon", "a river", "a small boat",
            "a library", "a storm", "a garden"]


def start(command: list[str], port: int) -> tuple[subprocess.Popen, openai.OpenAI]:
    """Start a server and wait until it answers /v1/models."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    deadline = time.monotonic() + 300
    while True:
        try:
            client.models.list()
            return process, client
        except (openai.APIConnectionError, openai.InternalServerError):     # not listening, or 503 while loading
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} did not start: {process.stderr.read()[-2000:]}") from None
            time.sleep(0.2)


def completion_tokens(client: openai.OpenAI, model: str, k: int, tokens: int) -> int:
    """One streamed, greedy completion; the tokens it took (counted by the server, else by its chunks)."""
    stream = client.completions.create(model=model, prompt=f"Here is a short story about {SUBJECTS[k % 16]}.",
                                       max_tokens=tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks, usage = 0, None
    for chunk in stream:
        chunks += bool(chunk.choices and chunk.choices[0].text)
        usage = chunk.usage or usage
    return usage.completion_tokens if usage else chunks


def measure(client: openai.OpenAI, model: str, clients: int, tokens: int, one_at_a_time: bool = False) -> float:
    """Tokens per second for `clients` requests, sent at once (or one after another)."""
    start_time = time.perf_counter()
    if one_at_a_time:
        produced = sum(completion_tokens(client, model, k, tokens) for k in range(clients))
    else:
        with ThreadPoolExecutor(clients) as pool:
            produced = sum(pool.map(lambda k: completion_tokens(client, model, k, tokens), range(clients)))
    return produced / (time.perf_counter() - start_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a GGUF file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer (default 64)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--llama-server", type=Path, default=None, help="llama.cpp's llama-server, to compare")
    args = parser.parse_args()
    path = args.model or fetch("smollm2-135m-instruct")
    most = max(args.clients)
    servers = {}
    try:
        ours_port = free_port()
        servers["ours"] = start([sys.executable, "-m", "ch06_llama", "serve", "--model", str(path), "--port",
                                 str(ours_port), "--max-batch", str(most)], ours_port)
        if args.llama_server:
            port = free_port()
            servers["llama.cpp"] = start([str(args.llama_server), "-m", str(path), "--port", str(port),
                                          "--parallel", str(most), "--ctx-size", str(most * (args.tokens + 64))],
                                         port)
        names = {name: client.models.list().data[0].id for name, (_, client) in servers.items()}
        settings = [(f"{n} at once", n, False) for n in args.clients] + [(f"{most} one at a time", most, True)]
        rates = {(server, label): [] for server in servers for label, _, _ in settings}
        for round_ in range(args.rounds):
            for label, clients, alone in settings:
                for server, (_, client) in servers.items():
                    rate = measure(client, names[server], clients, args.tokens, alone)
                    rates[server, label].append(rate)
                    print(f"round {round_ + 1}: {server:9s} {label:18s} {rate:8.1f} tokens/s", flush=True)
        print(f"\n{path.name}, {args.tokens} tokens per answer, median of {args.rounds} rounds:")
        print(f"{'':18s}" + "".join(f"{server:>22s}" for server in servers))
        for label, _, _ in settings:
            row = ""
            for server in servers:
                rate = statistics.median(rates[server, label])
                baseline = statistics.median(rates[server, f"{most} one at a time"])
                row += f"{rate:10.1f} tok/s {rate / baseline:5.2f}x"
            print(f"{label:18s}{row}")
        print("(x: against the same server answering the requests one at a time)")
        if "llama.cpp" in servers:
            print("ours / llama.cpp: " + ", ".join(
                f"{label} {statistics.median(rates['ours', label]) / statistics.median(rates['llama.cpp', label]):.2f}x"
                for label, _, _ in settings))
    finally:
        for process, _ in servers.values():
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:             # llama-server may wait for its slots to drain
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
