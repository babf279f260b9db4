"""The gpu path of chapters 3-6, run for real on one CUDA GPU in a few minutes, offline.

    python benchmarks/gpu_check.py                      # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --device cpu --tiny  # the same checks, tiny, on the CPU (tests/ runs this)

Each check runs a few dozen steps of the real code on synthetic data (no download, no data mirror) and
fails loudly if anything raises or comes out wrong:

- training through chapter 4's `train`: the precision `choose_precision` picks (bf16 where the tensor cores
  compute it, TF32 on), fused AdamW, then fp16 with a GradScaler forced (as a T4 would run), then
  `torch.compile`, then chapter 6's Llama; tokens/s, MFU (against the datasheet peak, where `peak_flops` has
  one) and peak memory for each;
- chapter 4b's modern recipe (its switches and Muon) against the baseline, two minutes each on the same tokens;
- fused attention: PyTorch's flash kernel runs, and equals the plain math kernel;
- the chunked loss (`linear_cross_entropy`) against `F.cross_entropy` at GPT-2's vocabulary: value,
  gradients and time; then both compiled (each must be one graph) under the run's autocast, time and memory;
- DDP with one process (NCCL on a GPU, gloo on the CPU), through the same `train`;
- a checkpoint saved and resumed on the device gives the uninterrupted run's losses exactly;
- KV-cache decoding of GPT-2 and Llama shapes gives the recomputed greedy tokens; int8 and 4-bit decoding
  where their kernels run;
- the chat: a random Llama with a byte-level tokenizer and the ChatML template answers, streaming.

On a machine without a CUDA GPU (and without `--device cpu`) it says so and exits 0. It exits 1 if any check
failed. The numbers are for reading, not for comparing with another run.
"""

import argparse
import copy
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ch01_tokenization.tokenization import BPETokenizer
from ch03_gpt_model.gpt import flops_per_token, generate, linear_cross_entropy, peak_flops
from ch04_pretraining import pretraining
from ch04_pretraining.config import TrainConfig
from ch04_pretraining.data import make_tokenizer, train_val_split
from ch04_pretraining.pretraining import train
from ch04_pretraining.recipe import RECIPE
from ch04_pretraining.runs import read_metrics
from ch06_llama.chat import Chat, ChatModel
from ch06_llama.decoding import Int4Linear, quantize_for_decoding, quantize_int4_for_decoding
from ch06_llama.layers import LlamaConfig
from ch06_llama.llama import LlamaModel
from shared.device import Precision
from shared.network import free_port

CHATML = Path(__file__).resolve().parent.parent / "shared" / "fixtures" / "chat_templates" / "smollm2-chatml.jinja"
WORDS = "the a cat dog sat ran on under mat tree and then it was big small red blue".split()


@dataclasses.dataclass
class Size:
    """How big the checks are: GPT-2 124M's shape on a GPU, a tiny model for the tests on a CPU."""

    gpt: dict
    llama: dict
    batch_size: int
    steps: int
    vocab: int             # the chunked-loss check's vocabulary
    loss_rows: int


GPU_SIZE = Size(gpt=dict(n_layer=12, n_head=12, n_embd=768, context_length=256),
                llama=dict(n_layer=12, n_head=12, n_kv_head=4, n_embd=768, ffn_hidden=2048, context_length=256,
                           rope_theta=10000.0, rope_scaling=None),
                batch_size=16, steps=30, vocab=50304, loss_rows=8192)
TINY_SIZE = Size(gpt=dict(n_layer=2, n_head=2, n_embd=32, context_length=32),
                 llama=dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=32, ffn_hidden=64, context_length=32,
                            rope_theta=10000.0, rope_scaling=None),
                 batch_size=4, steps=6, vocab=1000, loss_rows=256)


@dataclasses.dataclass
class Outcome:
    name: str
    ok: bool
    seconds: float
    detail: str


def synthetic_text(chars: int, seed: int = 0) -> str:
    """Sentences of a small vocabulary, with a pattern a model can learn: a word often repeats two later."""
    rng = np.random.default_rng(seed)
    words = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(words[-2] if len(words) > 2 and rng.random() < 0.3 else WORDS[rng.integers(len(WORDS))])
        if rng.random() < 0.1:
            words[-1] += ".\n"
    return " ".join(words)[:chars]


def char_data(chars: int):
    text = synthetic_text(chars)
    tokenizer = make_tokenizer("char", text)
    return (tokenizer, *train_val_split(tokenizer.encode(text)))


def peak_memory(device: torch.device) -> str:
    """The most memory PyTorch held on a GPU since the last reset, in words (not tracked on a CPU)."""
    return f"{torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MB" if device.type == "cuda" else "n/a"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def training_check(device, size: Size, out: Path, arch: str = "gpt", compile_model: bool = False,
                   force_fp16: bool = False, parallel: str = "ddp") -> str:
    """`train` a few dozen steps on the device; the loss must fall. Returns tokens/s, MFU and peak memory."""
    data = char_data(200_000 if device.type == "cuda" else 20_000)
    model = size.gpt if arch == "gpt" else size.llama
    cfg = TrainConfig(data="synthetic", tokenizer="char", arch=arch, model=model, batch_size=size.batch_size,
                      max_steps=size.steps, warmup_steps=2, lr=1e-3, min_lr=1e-4, eval_interval=size.steps,
                      eval_iters=2, log_interval=1, sample_tokens=0, device=str(device), compile=compile_model,
                      parallel=parallel, out_dir=str(out))
    choose = pretraining.choose_precision
    precision = Precision(torch.float16, True) if force_fp16 and device.type == "cuda" else choose(device)
    pretraining.choose_precision = lambda dev: precision       # fp16 with a GradScaler is what a T4 runs
    reset_peak_memory(device)
    try:
        result = train(cfg, overwrite=True, data=data, log=lambda line: None, progress=False)
    finally:
        pretraining.choose_precision = choose
    rows = read_metrics(out)
    if not result["val_loss"] < rows[0]["val_loss"] or not math.isfinite(result["val_loss"]):
        raise AssertionError(f"the loss did not fall: {rows[0]['val_loss']:.3f} -> {result['val_loss']:.3f}")
    name = "mixed" if precision.dtype is not None else ("tf32" if device.type == "cuda" else "fp32")
    trained = result["model"]
    per_token = flops_per_token(trained.cfg) if arch == "gpt" else 6 * trained.num_parameters()
    peak, source = peak_flops(device, name)
    mfu = f"MFU {result['tokens_per_s'] * per_token / peak:.1%}" if math.isfinite(peak) else source
    return (f"{precision.name}, {result['tokens_per_s']:,.0f} tokens/s, {mfu}, peak memory {peak_memory(device)}, "
            f"loss {rows[0]['val_loss']:.2f} -> {result['val_loss']:.2f}")


def recipe_check(device, size: Size, out: Path) -> str:
    """Chapter 4b's modern recipe (its switches and Muon) against the baseline (GPT-2 with AdamW), each trained for
    the same time on the same tokens: two minutes on a GPU, a few steps elsewhere. Both losses must fall."""
    data = char_data(2_000_000 if device.type == "cuda" else 20_000)
    minutes = 2.0 if device.type == "cuda" else 0.0
    results = {}
    for name, arch, switches, optimizer in [("baseline", "gpt", {}, "adamw"), ("modern", "modern", RECIPE, "muon")]:
        cfg = TrainConfig(data="synthetic", tokenizer="char", arch=arch, model={**size.gpt, **switches},
                          optimizer=optimizer, batch_size=size.batch_size, max_steps=100_000 if minutes else size.steps,
                          time_budget_min=minutes, warmup_steps=2 if not minutes else 50, lr=2e-3, min_lr=2e-4,
                          eval_interval=size.steps if not minutes else 200, eval_iters=4, log_interval=10,
                          sample_tokens=0, device=str(device), out_dir=str(out / name))
        result = train(cfg, overwrite=True, data=data, log=lambda line: None, progress=False)
        first = read_metrics(out / name)[0]["val_loss"]
        if not result["val_loss"] < first:
            raise AssertionError(f"{name}: the loss did not fall: {first:.3f} -> {result['val_loss']:.3f}")
        results[name] = result
    baseline, modern = results["baseline"], results["modern"]
    return (f"in the same time: baseline {baseline['step']} steps to validation loss {baseline['val_loss']:.3f}, "
            f"modern {modern['step']} steps to {modern['val_loss']:.3f} "
            f"({modern['tokens_per_s'] / baseline['tokens_per_s']:.2f}x the baseline's tokens/s)")


def attention_check(device, size: Size) -> str:
    """PyTorch's flash attention kernel runs here (bf16 on a GPU) and equals the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(4, 12, 512, 64, device=device, dtype=dtype) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_kernel(SDPBackend.MATH):
        math_kernel = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    error = ((flash.float() - math_kernel.float()).norm() / math_kernel.float().norm()).item()
    if error > 1e-2:
        raise AssertionError(f"flash attention differs from the math kernel by {error:.2e}")
    return f"flash equals math to {error:.1e} ({dtype})"


def timed(run, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def loss_check(device, size: Size) -> str:
    """The chunked loss against F.cross_entropy at GPT-2's vocabulary: the same value and gradients."""
    torch.manual_seed(0)
    hidden = torch.randn(size.loss_rows, 768, device=device, requires_grad=True)
    weight = (torch.randn(size.vocab, 768, device=device) * 0.02).requires_grad_()
    targets = torch.randint(0, size.vocab, (size.loss_rows,), device=device)
    results = {}
    for name, loss_of in [("chunked", lambda: linear_cross_entropy(hidden, weight, targets)),
                          ("whole", lambda: F.cross_entropy(hidden @ weight.t(), targets))]:
        hidden.grad = weight.grad = None
        loss_of().backward()                                                    # warm-up
        hidden.grad = weight.grad = None
        reset_peak_memory(device)
        seconds = timed(lambda loss_of=loss_of: loss_of().backward(), device)
        value = loss_of().item()
        results[name] = (value, hidden.grad.clone(), weight.grad.clone(), seconds, peak_memory(device))
    (value, grad_h, grad_w, chunked_s, chunked_mb), (ref, ref_h, ref_w, whole_s, whole_mb) = \
        results["chunked"], results["whole"]
    if abs(value - ref) > 1e-3 * abs(ref) or not torch.allclose(grad_h, ref_h, rtol=1e-3, atol=1e-6) \
            or not torch.allclose(grad_w, ref_w, rtol=1e-3, atol=1e-6):
        raise AssertionError(f"the chunked loss differs: {value} against {ref}")
    return (f"equal value and gradients; forward+backward {1e3 * chunked_s:.1f} ms chunked against "
            f"{1e3 * whole_s:.1f} ms whole, peak memory {chunked_mb} against {whole_mb}")


def compiled_loss_check(device, size: Size) -> str:
    """The training path's loss at GPT-2's vocabulary: compiled, under the run's autocast (bfloat16 where
    supported, else float16), chunked against F.cross_entropy on the whole logits. Both compile into one graph;
    the time and peak memory of a forward and backward of each, side by side."""
    precision = pretraining.choose_precision(device)
    dtype = precision.dtype or torch.bfloat16
    torch.manual_seed(0)
    hidden = torch.randn(size.loss_rows, 768, device=device, requires_grad=True)
    weight = (torch.randn(size.vocab, 768, device=device) * 0.02).requires_grad_()
    targets = torch.randint(0, size.vocab, (size.loss_rows,), device=device)
    losses = {"chunked": torch.compile(linear_cross_entropy, fullgraph=True),
              "whole": torch.compile(lambda h, w, t: F.cross_entropy(h @ w.t(), t.long()), fullgraph=True)}
    results = {}
    for name, loss_fn in losses.items():
        def step(loss_fn=loss_fn):
            hidden.grad = weight.grad = None
            with torch.autocast(device.type, dtype=dtype):
                loss = loss_fn(hidden, weight, targets)
            loss.backward()
            return loss
        step()                                                                     # compiles
        reset_peak_memory(device)
        seconds = min(timed(step, device) for _ in range(3))
        results[name] = (step().item(), seconds, peak_memory(device))
    (chunked, chunked_s, chunked_mb), (whole, whole_s, whole_mb) = results["chunked"], results["whole"]
    if abs(chunked - whole) > 1e-2 * abs(whole):
        raise AssertionError(f"the compiled chunked loss differs: {chunked} against {whole}")
    return (f"{dtype}, one graph each; forward+backward {1e3 * chunked_s:.1f} ms chunked against "
            f"{1e3 * whole_s:.1f} ms whole ({whole_s / chunked_s:.2f}x), peak memory {chunked_mb} against "
            f"{whole_mb}")


def ddp_check(device, size: Size, out: Path, parallel: str = "ddp") -> str:
    """Chapter 4's data-parallel path with one process: `train` joins a process group of one and trains, its
    model copied (`parallel="ddp"`) or sharded (`"fsdp"`, which writes a sharded checkpoint)."""
    import torch.distributed as dist

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    saved = {key: os.environ.get(key) for key in env}
    joined, join = [], pretraining.join_processes

    def recording_join(device, local_rank):
        device = join(device, local_rank)
        joined.append(dist.get_backend())
        return device

    os.environ.update(env)
    pretraining.join_processes = recording_join
    try:
        detail = training_check(device, size, out, parallel=parallel)
    finally:
        pretraining.join_processes = join
        if dist.is_initialized():
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if not joined:
        raise AssertionError("train did not join a process group")
    if parallel == "fsdp" and not list(out.glob("ckpt-*.dcp")):
        raise AssertionError("the sharded run wrote no sharded checkpoint")
    return f"{joined[0]}, {detail}"


def resume_check(device, size: Size, out: Path) -> str:
    """Stopped at a checkpoint and resumed on the device, a run gives the uninterrupted run's losses."""
    data = char_data(20_000)
    cfg = TrainConfig(data="synthetic", tokenizer="char", model=size.gpt, batch_size=size.batch_size, max_steps=12,
                      warmup_steps=2, eval_interval=4, eval_iters=2, log_interval=2, sample_tokens=0,
                      device=str(device), out_dir=str(out / "full"))
    quiet = dict(log=lambda line: None, progress=False, data=data)
    train(cfg, **quiet)
    stopped = out / "stopped"
    shutil.copytree(out / "full", stopped)
    latest = pretraining.checkpoint_paths(stopped, 8)
    (stopped / "latest.json").write_text(
        f'{{"step": 8, "weights": "{latest[0].name}", "state": "{latest[1].name}"}}')
    train(dataclasses.replace(cfg, out_dir=str(stopped)), resume=True, **quiet)
    full, resumed = ([row["val_loss"] for row in read_metrics(folder)] for folder in (out / "full", stopped))
    if full != resumed:
        raise AssertionError(f"resumed losses {resumed} differ from the uninterrupted run's {full}")
    return f"{len(full)} evaluations equal: {[round(v, 4) for v in full]}"


def decoding_check(device, size: Size) -> str:
    """Greedy tokens with the KV cache equal those recomputed from scratch, for GPT-2 and Llama shapes; int8
    and 4-bit decoding run where their kernels do."""
    from ch03_gpt_model.gpt import GPTConfig, GPTModel

    torch.manual_seed(0)
    models = {"gpt": GPTModel(GPTConfig(vocab_size=512, **size.gpt)),
              "llama": LlamaModel(LlamaConfig(vocab_size=512, **size.llama))}
    prompt = torch.randint(0, 512, (2, 8), device=device)
    said = []
    for name, model in models.items():
        model = model.to(device).eval()
        with torch.no_grad():
            cached = generate(model, prompt, 24, temperature=0)
            recomputed = generate(model, prompt, 24, temperature=0, use_cache=False)
            if not torch.equal(cached, recomputed):
                raise AssertionError(f"{name}: the cached tokens differ from the recomputed ones")
            seconds = timed(lambda model=model: generate(model, prompt[:1], 64, temperature=0), device)
            said.append(f"{name} {64 / seconds:,.0f} tokens/s")
            if name == "llama":
                int8 = quantize_for_decoding(copy.deepcopy(model))
                generate(int8, prompt, 8, temperature=0)
                said.append("int8 runs")
                if device.type == "cpu" and Int4Linear.available():
                    generate(quantize_int4_for_decoding(copy.deepcopy(model)), prompt, 8, temperature=0)
                    said.append("4-bit runs")
    return "cached = recomputed; " + ", ".join(said)


def chat_check(device, size: Size) -> str:
    """A random Llama with a byte-level tokenizer and the ChatML template answers two turns, keeping its cache."""
    tokenizer = BPETokenizer(special_tokens={"<|im_start|>": 256, "<|im_end|>": 257})
    torch.manual_seed(0)
    model = LlamaModel(LlamaConfig(vocab_size=258, **{**size.llama, "context_length": 512})).to(device).eval()
    chat = Chat(ChatModel(model, tokenizer, CHATML.read_text(encoding="utf-8"), 257, {}), temperature=0,
                max_new_tokens=16, reuse_cache=True)
    pieces = []
    turns = [chat.reply(message, on_text=pieces.append) for message in ("Hello!", "And again?")]
    if not all(turn.tokens > 0 for turn in turns) or not pieces:
        raise AssertionError("the chat gave no answer")
    first_ms = 1e3 * turns[1].first_token_seconds
    return f"two turns, {sum(t.tokens for t in turns)} tokens streamed, second turn's first token {first_ms:.0f} ms"


def run_checks(device: torch.device, size: Size, only: list[str] | None = None,
               skip: list[str] | None = None) -> list[Outcome]:
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    checks = {
        "train GPT, default precision, fused AdamW": lambda: training_check(device, size, work / "default"),
        "train GPT, fp16 + GradScaler (as a T4)": lambda: training_check(device, size, work / "fp16",
                                                                          force_fp16=True),
        "train GPT, torch.compile": lambda: training_check(device, size, work / "compile", compile_model=True),
        "train Llama": lambda: training_check(device, size, work / "llama", arch="llama"),
        "modern recipe against the baseline": lambda: recipe_check(device, size, work / "recipe"),
        "flash attention": lambda: attention_check(device, size),
        "chunked loss": lambda: loss_check(device, size),
        "chunked loss, compiled, mixed precision": lambda: compiled_loss_check(device, size),
        "DDP, one process": lambda: ddp_check(device, size, work / "ddp"),
        "FSDP, one process": lambda: ddp_check(device, size, work / "fsdp", parallel="fsdp"),
        "checkpoint and resume": lambda: resume_check(device, size, work / "resume"),
        "KV-cache decoding": lambda: decoding_check(device, size),
        "chat": lambda: chat_check(device, size),
    }
    outcomes = []
    for name, check in checks.items():
        if (only and not any(part in name for part in only)) or (skip and any(part in name for part in skip)):
            continue
        start = time.perf_counter()
        try:
            detail, ok = check(), True
        except Exception as err:                       # every failure is reported, then the next check runs
            detail, ok = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=4)}", False
        outcomes.append(Outcome(name, ok, time.perf_counter() - start, detail))
        print(f"{'ok  ' if ok else 'FAIL'} {name:44s} {outcomes[-1].seconds:6.1f} s  {detail}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the point), or cpu to run the checks here")
    parser.add_argument("--tiny", action="store_true", help="tiny models and few steps (the tests use this)")
    parser.add_argument("--only", nargs="*", help="run only the checks whose name contains one of these")
    parser.add_argument("--skip", nargs="*", help="leave out the checks whose name contains one of these")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing to check (`--device cpu --tiny` runs the checks on the CPU)")
        return 0
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{where}, torch {torch.__version__}")
    start = time.perf_counter()
    outcomes = run_checks(device, TINY_SIZE if args.tiny else GPU_SIZE, args.only, args.skip)
    failed = [o.name for o in outcomes if not o.ok]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} checks passed in {time.perf_counter() - start:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
