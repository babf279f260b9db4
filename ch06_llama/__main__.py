"""Chapter 6's command line: chat with a Llama-architecture model, or serve it, through the chapter's own code.

    python -m ch06_llama chat [--model FILE.gguf | FOLDER | REPO_ID | gpt2] [--temperature 0.7] [--top-k K]
                              [--top-p 0.9] [--max-new-tokens 256] [--system TEXT] [--seed N] [--no-pack]
                              [--device auto]
    python -m ch06_llama serve [--model ...] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                               [--max-batch 16] [--max-waiting 64] [--no-pack] [--device auto]

The default model is SmolLM2-135M-Instruct, read from its 4-bit GGUF file (downloaded once, or found in the
offline mirror `LLM_DATA_MIRROR` names). `--model` takes another Llama GGUF file, a Hugging Face Llama folder,
a Hugging Face repository id such as meta-llama/Llama-3.2-1B-Instruct (downloaded with HF_TOKEN), or one of
the book's own models: a chapter 5 instruct (or dpo, grpo, ppo) run, which answers in the Alpaca format it was
finetuned on; a chapter 4 run, a Hugging Face GPT-2 folder or gpt2 (OpenAI's weights), which have no chat
template: they continue text, so `serve` them and send prompts to /v1/completions.

At a terminal: type a message and press Enter; the answer streams as it is generated, then its speed. Ctrl-C
during an answer ends the answer, not the chat; Ctrl-C or Ctrl-D at the prompt ends the chat. `/reset` forgets
the conversation. When standard input is not a terminal, each line is one message and each answer is printed
in turn, so a chat can be scripted: `printf 'Hi!\\nWhat is 2 + 2?\\n' | python -m ch06_llama chat`.
"""

import argparse
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from ch06_llama.chat import Chat, ChatModel, load_chat_model
from ch06_llama.checkpoints import download_llama_hf
from ch06_llama.decoding import pack_for_decoding
from shared.config import BriefParser
from shared.data import DataUnavailableError
from shared.device import get_device

PROG = "python -m ch06_llama"


def checked(kind: type, allowed: str, ok: Callable) -> Callable[[str], object]:
    """An argparse type: the flag's text read as `kind` and kept if `ok(value)`, else an error naming what is
    allowed, so that a bad sampling setting stops the chat before the model loads, not at the first message."""
    def read(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text}")
        return value
    return read


temperature = checked(float, "a number >= 0 (0: always the most likely token)", lambda t: 0 <= t < math.inf)
probability = checked(float, "in (0, 1] (1: every token)", lambda p: 0 < p <= 1)
positive = checked(int, "a whole number >= 1", lambda n: n >= 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = BriefParser(prog=PROG, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="chat with a model, streaming its answers",
                               description=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawTextHelpFormatter)
    chat.add_argument("--model", help="a GGUF file, a Hugging Face Llama folder or repository id, a chapter 5 "
                                      "instruct run (default: SmolLM2-135M-Instruct)")
    chat.add_argument("--system", help="a system message that opens the conversation")
    chat.add_argument("--temperature", type=temperature, default=0.7,
                      help="0: always the most likely token (default 0.7)")
    chat.add_argument("--top-k", type=positive, help="sample among the k most likely tokens only (default: all)")
    chat.add_argument("--top-p", type=probability, default=0.9, help="sample among the most likely tokens whose "
                                                                "probabilities reach p (default 0.9; 1: all)")
    chat.add_argument("--max-new-tokens", type=positive, default=256, help="longest answer, in tokens (default 256)")
    chat.add_argument("--seed", type=int, help="seed the sampling, for answers that repeat from run to run")
    chat.add_argument("--no-pack", action="store_true", help="keep the weights in PyTorch's layout (slower on CPU)")
    chat.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or mps")
    serve = commands.add_parser("serve", help="serve a model over OpenAI's API, with a web chat at /",
                                description="Serve a model over OpenAI's HTTP API (/v1/models, /v1/chat/completions, "
                                            "/v1/completions), many requests at once, with a web chat at /.")
    serve.add_argument("--model", help="a GGUF file, a Hugging Face Llama or GPT-2 folder or repository id, a "
                                       "chapter 4 or 5 run, gpt2 (default: SmolLM2-135M-Instruct)")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1: this "
                                                           "machine only; 0.0.0.0: every network)")
    serve.add_argument("--port", type=positive, default=8000, help="the port to listen on (default 8000)")
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: no key)")
    serve.add_argument("--max-batch", type=positive, default=16, help="requests decoded at once (default 16)")
    serve.add_argument("--max-waiting", type=checked(int, "a whole number >= 0", lambda n: n >= 0), default=64,
                       help="requests that may wait for a row; more are answered 503 (default 64)")
    serve.add_argument("--no-pack", action="store_true", help="keep the weights in PyTorch's layout (slower on CPU)")
    serve.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or mps")
    return parser.parse_args(argv)


# A Hugging Face repository id: owner/name, nothing before or after (a path such as ./models/x, /data/x or x/ is not)
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def open_model(name: str | None):
    """The ChatModel `--model` names: a path that exists; else, if it reads as owner/name, a Hugging Face
    repository id; else a path that is missing, which `load_chat_model` reports as such."""
    if name is not None and is_repo_id(name):
        return load_chat_model(download_llama_hf(name))
    return load_chat_model(name)


def is_repo_id(name: str) -> bool:
    """Whether `--model NAME` means a Hugging Face repository: no such path here, and it reads as owner/name."""
    return not Path(name).exists() and bool(REPO_ID.fullmatch(name)) and not name.endswith(".gguf")


def messages(interactive: bool):
    """The user's messages: prompted for at a terminal, else one per line of standard input."""
    if not interactive:
        for line in sys.stdin:
            if line.strip():
                yield line.strip()
        return
    while True:
        try:
            line = input("\n> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line.strip():
            yield line.strip()


def load(command: str, args: argparse.Namespace) -> tuple[ChatModel | None, int]:
    """(the model `--model` names, on `--device`, 0), or (None, the exit code) once a failure to load it is
    printed as one line: 2 for a model that cannot be had, 130 for Ctrl-C."""
    try:
        device = get_device(args.device)                   # a bad --device is said before the model loads
        chat_model = open_model(args.model)
        chat_model.model.to(device)
        return chat_model, 0
    except (DataUnavailableError, FileNotFoundError, ValueError) as err:
        print(f"{PROG} {command}: {err}", file=sys.stderr)
        return None, 2
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted while the model was loading", file=sys.stderr)
        return None, 130


def chat(args: argparse.Namespace) -> int:
    chat_model, failed = load("chat", args)
    if chat_model is None:
        return failed
    try:
        session = Chat(chat_model, system=args.system, temperature=args.temperature, top_k=args.top_k,
                       top_p=None if args.top_p >= 1 else args.top_p, max_new_tokens=args.max_new_tokens,
                       seed=args.seed)
    except ValueError as err:                              # no chat template, or no room for an answer
        print(f"{PROG} chat: {err}", file=sys.stderr)
        return 2
    if not args.no_pack:
        pack_for_decoding(chat_model.model)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting with the model; Ctrl-C stops an answer, Ctrl-D (or Ctrl-C here) leaves, /reset forgets.")
    try:
        for message in messages(interactive):
            answer(session, message)
    except UnicodeDecodeError as err:
        print(f"{PROG} chat: the input is not UTF-8 text ({err.reason}: {err.object[err.start:err.end]!r}); "
              f"type or send UTF-8", file=sys.stderr)
        return 2
    return 0


def answer(session: Chat, message: str) -> None:
    """One message: `/reset`, or an answer streamed to standard output, then its speed to standard error."""
    if message == "/reset":
        session.reset()
        print("(conversation forgotten)", file=sys.stderr)
        return
    try:
        turn = session.reply(message, on_text=lambda piece: print(piece, end="", flush=True))
    except ValueError as err:                              # too long for the context, or refused by the template
        print(f"({err})", file=sys.stderr)
        return
    print(" [interrupted]" if turn.interrupted else "")
    first = "" if turn.first_token_seconds is None else f", first after {1e3 * turn.first_token_seconds:.0f} ms"
    print(f"[{turn.tokens} tokens{first}, {turn.tokens_per_second:.1f} tokens/s]", file=sys.stderr, flush=True)


def served_name(model: str | None) -> str:
    """The name a served model goes by in the API: the default's, a repository id, or a file or folder's name."""
    if model is None:
        return "smollm2-135m-instruct"
    return model if is_repo_id(model) else Path(model).stem


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ch06_llama.server import create_app

    chat_model, failed = load("serve", args)
    if chat_model is None:
        return failed
    if not args.no_pack:
        pack_for_decoding(chat_model.model)
    name = served_name(args.model)
    app = create_app(chat_model, name, api_key=args.api_key, max_batch=args.max_batch, max_waiting=args.max_waiting)
    print(f"serving {name} at http://{args.host}:{args.port}/ (the web chat) and /v1 (OpenAI's API); Ctrl-C stops",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return serve(args) if args.command == "serve" else chat(args)


if __name__ == "__main__":
    sys.exit(main())
