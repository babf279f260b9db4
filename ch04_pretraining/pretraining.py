import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ch03_gpt_model.gpt import GPTConfig, GPTModel, generate
from shared.data import REGISTRY, fetch
from shared.device import autocast, choose_precision, get_device


class CharTokenizer:
    """One token per character: the vocabulary is the sorted set of characters of a text."""

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.id_of = {c: i for i, c in enumerate(self.chars)}

    @property
    def n_vocab(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.id_of[c] for c in text]
        except KeyError as missing:
            raise ValueError(f"character {missing} is not in this tokenizer's vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class GPT2Tokenizer:
    """GPT-2's BPE through tiktoken (the same ids as chapter 1's BPETokenizer.from_gpt2, in Rust)."""

    def __init__(self):
        import tiktoken

        self._encoding = tiktoken.get_encoding("gpt2")
        self.n_vocab = self._encoding.n_vocab
        self.eot = self._encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode(text, allowed_special={"<|endoftext|>"})

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._encoding.encode_ordinary_batch(texts)

    def decode(self, ids) -> str:
        return self._encoding.decode([int(i) for i in ids])


def make_tokenizer(kind: str, text: str = ""):
    """`char` (from the characters of `text`) or `gpt2`."""
    if kind == "char":
        return CharTokenizer(text)
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {kind!r}; use 'char' or 'gpt2'")


def read_corpus(data: str) -> str:
    """The text of a registered data file (`shared.data` name) or of a file path."""
    if data in REGISTRY:
        return fetch(data).read_text(encoding="utf-8")
    path = Path(data)
    if not path.is_file():
        raise FileNotFoundError(f"--data {data!r} is neither a registered data set "
                                f"({', '.join(sorted(REGISTRY))}) nor a file")
    return path.read_text(encoding="utf-8")


def train_val_split(ids, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The first 90 % of the token ids for training, the last 10 % for validation (as uint16/int32 arrays)."""
    ids = np.asarray(ids, dtype=np.uint16 if max(ids, default=0) < 2**16 else np.int32)
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def tokenize_to_memmap(text_path: Path, out_path: Path, tokenizer: GPT2Tokenizer,
                       chunk_bytes: int = 1 << 24, progress: bool = True) -> np.memmap:
    """Tokenize a large text file of documents separated by <|endoftext|> into a flat uint16 file.

    Done once: an existing `out_path` is reused. Streams the text in chunks (cut at document
    boundaries), writes to a temporary file and renames it, so an interrupted run leaves nothing behind.
    """
    from tqdm import tqdm

    out_path = Path(out_path)
    if not out_path.is_file():
        separator = "<|endoftext|>"
        fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(text_path, encoding="utf-8") as src, \
                    tqdm(total=Path(text_path).stat().st_size, unit="B", unit_scale=True,
                         desc=f"tokenizing {Path(text_path).name}", disable=not progress) as bar:
                pending = ""
                while True:
                    chunk = src.read(chunk_bytes)
                    pending += chunk
                    documents = pending.split(separator)
                    pending = documents.pop() if chunk else ""
                    for ids in tokenizer.encode_batch([d.strip() for d in documents if d.strip()]):
                        np.asarray(ids + [tokenizer.eot], dtype=np.uint16).tofile(out)
                    bar.update(len(chunk.encode("utf-8")))
                    if not chunk:
                        break
            os.replace(tmp, out_path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return np.memmap(out_path, dtype=np.uint16, mode="r")


class BatchSampler:
    """Random training windows, reproducible and resumable.

    Each step draws the start positions of a whole *global* batch from one generator; every process
    and every accumulation micro-step then takes its own slice. The same seed therefore gives the
    same global batches however they are split across processes and micro-steps.
    """

    def __init__(self, tokens, context_length: int, seed: int):
        if len(tokens) <= context_length:
            raise ValueError(f"{len(tokens)} tokens are too few for windows of {context_length} + 1")
        self.tokens, self.context_length = tokens, context_length
        self.generator = torch.Generator().manual_seed(seed)

    def next_starts(self, global_batch: int) -> torch.Tensor:
        """(global_batch,) start positions for the next step."""
        return torch.randint(len(self.tokens) - self.context_length, (global_batch,), generator=self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def get_batch(tokens, starts: torch.Tensor, context_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, each (len(starts), context_length), on `device`."""
    windows = np.stack([np.asarray(tokens[s:s + context_length + 1], dtype=np.int64) for s in starts.tolist()])
    windows = torch.from_numpy(windows)
    x, y = windows[:, :-1], windows[:, 1:]
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def lr_at(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up from 0 to `max_lr` over `warmup_steps`, then cosine decay to `min_lr` at `max_steps`."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float,
                        betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear weights, embeddings) only, not on biases or norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


@dataclass
class TrainConfig:
    """Everything a training run needs; the CLI's flags are these fields."""

    data: str = "tinyshakespeare"
    tokenizer: str = "char"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    context_length: int = 64
    dropout: float = 0.0
    bias: bool = True
    batch_size: int = 12            # sequences per micro-batch, per process
    grad_accum: int = 1             # micro-batches per optimizer step
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337
    out_dir: str = "runs/shakespeare-char"
    device: str = "auto"
    compile: bool = False
    time_budget_min: float = 0.0   # stop (with a checkpoint) after this many minutes; 0: no limit
    sample_tokens: int = 0          # print a sample of this many tokens at each evaluation

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, context_length=self.context_length, n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias)


CHECKPOINT_POINTER = "latest.json"


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_checkpoint(out_dir: str | Path, model: nn.Module, optimizer, step: int, cfg: TrainConfig,
                    sampler: BatchSampler, tokenizer_chars: str | None = None, keep: int = 2) -> Path:
    """Write weights (safetensors) and training state (optimizer, step, config, sampler and RNG state),
    each to a temporary file renamed into place, then point `latest.json` at them. Keeps `keep` checkpoints."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"ckpt-{step:07d}"
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    _atomic(out_dir / f"{tag}.safetensors", lambda tmp: save_file(weights, tmp))
    state = {"step": step, "config": asdict(cfg), "optimizer": optimizer.state_dict(),
             "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "tokenizer_chars": tokenizer_chars}
    _atomic(out_dir / f"{tag}.pt", lambda tmp: torch.save(state, tmp))
    pointer = json.dumps({"step": step, "weights": f"{tag}.safetensors", "state": f"{tag}.pt"})
    _atomic(out_dir / CHECKPOINT_POINTER, lambda tmp: Path(tmp).write_text(pointer))
    for old in sorted(out_dir.glob("ckpt-*.safetensors"))[:-keep]:
        old.unlink()
        old.with_suffix(".pt").unlink(missing_ok=True)
    return out_dir / f"{tag}.safetensors"


# The fields that must match for a checkpoint to be resumed with a new config.
_SHAPE_FIELDS = ("tokenizer", "n_layer", "n_head", "n_embd", "context_length", "bias", "data")


def load_checkpoint(out_dir: str | Path, cfg: TrainConfig | None = None) -> tuple[dict, dict]:
    """(weights, state) of the latest checkpoint in `out_dir`; loaded without unpickling objects.
    With `cfg`, a checkpoint of a different model shape or data is refused."""
    out_dir = Path(out_dir)
    pointer = out_dir / CHECKPOINT_POINTER
    if not pointer.is_file():
        raise FileNotFoundError(f"no checkpoint in {out_dir} (no {CHECKPOINT_POINTER}); "
                                f"train without --resume first")
    files = json.loads(pointer.read_text())
    weights = load_file(out_dir / files["weights"])
    state = torch.load(out_dir / files["state"], weights_only=True)
    if cfg is not None:
        saved = state["config"]
        different = [f"{name}: checkpoint {saved[name]!r}, now {getattr(cfg, name)!r}"
                     for name in _SHAPE_FIELDS if saved.get(name) != getattr(cfg, name)]
        if different:
            raise ValueError("the checkpoint was trained with another config: " + "; ".join(different))
    return weights, state


@torch.no_grad()
def estimate_loss(model: nn.Module, splits: dict, eval_iters: int, batch_size: int, context_length: int,
                  device, precision, seed: int = 0) -> dict[str, float]:
    """Mean loss over `eval_iters` batches of each split, on fixed windows (seeded): comparable across
    evaluations and runs."""
    was_training = model.training
    model.eval()
    losses = {}
    for name, tokens in splits.items():
        sampler = BatchSampler(tokens, context_length, seed)
        total = 0.0
        for _ in range(eval_iters):
            x, y = get_batch(tokens, sampler.next_starts(batch_size), context_length, device)
            with autocast(device, precision):
                total += model(x, y).item()
        losses[name] = total / eval_iters
    model.train(was_training)
    return losses


def measure_peak_flops(device, dtype=torch.float32, size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of large square matmuls on `device`: a practical 'peak' to compute MFU against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    (a @ b).sum().item()
    start = time.perf_counter()
    for _ in range(repeats):
        c = a @ b
    c.sum().item()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def distributed_context() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def load_data(cfg: TrainConfig):
    """(tokenizer, train tokens, val tokens) for the run's data and tokenizer.

    `tinystories` means the full TinyStories V2 files, tokenized once with GPT-2's BPE into uint16
    memory-mapped files in the data cache; anything else is read whole and split 90/10.
    """
    if cfg.data == "tinystories":
        if cfg.tokenizer != "gpt2":
            raise ValueError("TinyStories is tokenized with --tokenizer gpt2")
        tokenizer = GPT2Tokenizer()
        train_text, val_text = fetch("tinystories-train"), fetch("tinystories-valid")
        train_tokens = tokenize_to_memmap(train_text, train_text.with_suffix(".gpt2.bin"), tokenizer)
        val_tokens = tokenize_to_memmap(val_text, val_text.with_suffix(".gpt2.bin"), tokenizer)
        return tokenizer, train_tokens, val_tokens
    text = read_corpus(cfg.data)
    tokenizer = make_tokenizer(cfg.tokenizer, text)
    train_tokens, val_tokens = train_val_split(tokenizer.encode(text))
    return tokenizer, train_tokens, val_tokens


def train(cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print, data=None) -> dict:
    """Train a GPTModel as `cfg` says; returns the last evaluation and the model.

    Writes OUT_DIR/metrics.jsonl (one JSON object per evaluation) and checkpoints. Runs under torchrun
    as DDP (NCCL on CUDA, gloo on CPU). Ctrl-C saves a checkpoint and stops; a non-finite loss stops with
    TrainingDiverged and keeps the last good checkpoint.
    """
    rank, local_rank, world = distributed_context()
    ddp = world > 1
    device = get_device(cfg.device)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main = rank == 0
    log = log if main else (lambda message: None)
    precision = choose_precision(device)
    torch.manual_seed(cfg.seed)
    out_dir = Path(cfg.out_dir)

    tokenizer, train_tokens, val_tokens = data if data is not None else load_data(cfg)
    model = GPTModel(cfg.model_config(tokenizer.n_vocab)).to(device)
    optimizer = configure_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2))
    sampler = BatchSampler(train_tokens, cfg.context_length, cfg.seed)
    step = 0
    if resume:
        weights, state = load_checkpoint(out_dir, cfg)
        model.load_state_dict(weights, strict=False)        # the tied head comes with the embedding
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        log(f"resumed from step {step}")
    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.use_grad_scaler)

    metrics_path = out_dir / "metrics.jsonl"
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = [line for line in (metrics_path.read_text().splitlines() if metrics_path.is_file() and resume else [])
                if json.loads(line)["step"] < step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
    chars = tokenizer.chars if isinstance(tokenizer, CharTokenizer) else None
    global_batch = cfg.batch_size * cfg.grad_accum * world
    tokens_per_step = global_batch * cfg.context_length
    log(f"{raw_model.num_parameters():,} parameters on {device} ({precision.name}); {world} process(es), "
        f"{tokens_per_step:,} tokens per step")

    stop = {"requested": False}
    previous_handler = None
    if main and hasattr(signal, "SIGINT") and _in_main_thread():
        previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.update(requested=True))
    start_time, window_start, window_tokens, tokens_per_s = time.time(), time.time(), 0, 0.0
    last = {}
    try:
        while True:
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                losses = estimate_loss(raw_model, {"train": train_tokens, "val": val_tokens}, cfg.eval_iters,
                                       cfg.batch_size, cfg.context_length, device, precision, seed=cfg.seed)
                elapsed = time.time() - window_start
                tokens_per_s = window_tokens / elapsed if window_tokens else tokens_per_s
                last = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                        "lr": lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps),
                        "tokens_per_s": tokens_per_s, "elapsed_s": time.time() - start_time}
                if main:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                    log(f"step {step:5d}: train {losses['train']:.4f}, val {losses['val']:.4f}, "
                        f"{tokens_per_s:,.0f} tokens/s")
                    if cfg.sample_tokens:
                        prompt = torch.tensor([[int(val_tokens[0])]], device=device)
                        sample = generate(raw_model, prompt, cfg.sample_tokens, temperature=0.8, top_k=40,
                                          generator=torch.Generator(device=device).manual_seed(cfg.seed))
                        log("  sample: " + repr(tokenizer.decode(sample[0].tolist())))
                    save_checkpoint(out_dir, raw_model, optimizer, step, cfg, sampler, chars)
                window_start, window_tokens = time.time(), 0
            over_budget = cfg.time_budget_min and time.time() - start_time > 60 * cfg.time_budget_min
            if step >= cfg.max_steps or _agree(stop["requested"] or over_budget, ddp, device):
                if step < cfg.max_steps and main:
                    log(f"stopping at step {step} ({'interrupted' if stop['requested'] else 'time budget'}); "
                        f"checkpoint saved: resume with --resume")
                    save_checkpoint(out_dir, raw_model, optimizer, step, cfg, sampler, chars)
                break

            lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            starts = sampler.next_starts(global_batch)
            step_loss = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                piece = (micro * world + rank) * cfg.batch_size
                x, y = get_batch(train_tokens, starts[piece:piece + cfg.batch_size], cfg.context_length, device)
                sync = nullcontext() if (not ddp or micro == cfg.grad_accum - 1) else model.no_sync()
                with sync:
                    with autocast(device, precision):
                        loss = model(x, y) / cfg.grad_accum
                    scaler.scale(loss).backward()
                step_loss += loss.detach()
            if _agree(not torch.isfinite(step_loss).item(), ddp, device):
                raise TrainingDiverged(f"the loss became {step_loss.item()} at step {step}: training stopped. "
                                       f"The last good checkpoint is in {out_dir}; lower --lr or raise "
                                       f"--warmup-steps, then --resume")
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window_tokens += tokens_per_step
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    return {**last, "model": raw_model, "tokenizer": tokenizer, "interrupted": stop["requested"]}


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _agree(flag: bool, ddp: bool, device) -> bool:
    """True if `flag` is true on any process (so all processes stop together)."""
    if not ddp:
        return bool(flag)
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def fit_micro_batch(model_cfg: GPTConfig, memory_bytes: float, global_batch: int, bytes_per_activation: int = 2,
                    headroom: float = 0.8) -> tuple[int, int]:
    """(micro batch, accumulation steps) that fit a GPU with `memory_bytes` and multiply to `global_batch`.

    Memory = 16 bytes per parameter (fp32 weights, gradients, two Adam moments) + per sequence
    L * T * d * (34 + 5 h T / d) activation bytes at 16-bit (Korthikanti et al., 2022), scaled for fp32.
    """
    L, T, d, h = model_cfg.n_layer, model_cfg.context_length, model_cfg.n_embd, model_cfg.n_head
    n_params = 12 * L * d * d + (model_cfg.vocab_size + T) * d
    per_sequence = L * T * d * (34 + 5 * h * T / d) * bytes_per_activation / 2
    room = headroom * memory_bytes - 16 * n_params
    micro = 1
    while micro * 2 <= global_batch and (micro * 2) * per_sequence <= room:
        micro *= 2
    if per_sequence > room:
        raise ValueError(f"even one sequence does not fit in {memory_bytes / 2**30:.1f} GiB; "
                         f"use a smaller model or context")
    return micro, global_batch // micro


def scale_preset(scale: str, gpu_memory_bytes: float | None = None) -> TrainConfig:
    """The run each scale stands for: smoke (seconds), cpu (a small char-level GPT on Tiny Shakespeare,
    minutes), gpu (GPT-2 124M on TinyStories, bounded by a one-hour budget)."""
    if scale == "smoke":
        return TrainConfig(n_layer=2, n_head=2, n_embd=32, context_length=32, batch_size=8, max_steps=30,
                           warmup_steps=5, eval_interval=10, eval_iters=2, out_dir="runs/smoke")
    if scale == "cpu":
        return TrainConfig(n_layer=4, n_head=4, n_embd=128, context_length=64, batch_size=12, max_steps=2000,
                           warmup_steps=100, eval_interval=250, eval_iters=20, out_dir="runs/shakespeare-char")
    if scale == "gpu":
        model_cfg = GPTConfig()
        if gpu_memory_bytes is None:
            gpu_memory_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 16e9
        micro, accum = fit_micro_batch(model_cfg, gpu_memory_bytes, global_batch=64)
        return TrainConfig(data="tinystories", tokenizer="gpt2", n_layer=12, n_head=12, n_embd=768,
                           context_length=1024, batch_size=micro, grad_accum=accum, max_steps=5000, lr=6e-4,
                           min_lr=6e-5, warmup_steps=200, weight_decay=0.1, beta2=0.95, eval_interval=250,
                           eval_iters=20, time_budget_min=60, sample_tokens=64, out_dir="runs/gpt2-tinystories")
    raise ValueError(f"unknown scale {scale!r}; use smoke, cpu or gpu")


def hellaswag_rows(path: str | Path) -> list[dict]:
    """HellaSwag rows (one JSON object per line: ctx, endings, label)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


@torch.no_grad()
def ending_losses(model: nn.Module, context: list[int], endings: list[list[int]],
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """Total and mean next-token loss of each ending after `context`: two (n_endings,) tensors.

    The candidates are scored in one padded batch; sequences longer than the model's context keep
    their last `context_length` tokens.
    """
    limit = model.cfg.context_length
    rows = [(context + ending)[-limit:] for ending in endings]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)       # positions whose *next* token is an ending token
    for i, (row, ending) in enumerate(zip(rows, endings)):
        ids[i, :len(row)] = torch.tensor(row)
        scored[i, len(row) - len(ending) - 1:len(row) - 1] = True
    ids, scored = ids.to(device), scored.to(device)
    logits = model(ids)[:, :-1].float()
    losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none") * scored[:, :-1]
    totals = losses.sum(dim=1)
    return totals, totals / scored[:, :-1].sum(dim=1)


def evaluate_hellaswag(model: nn.Module, tokenizer, rows: list[dict], device) -> dict[str, float]:
    """Completion-style HellaSwag (as in Karpathy's build-nanogpt): the model picks the ending with the
    lowest loss; `acc` compares total losses, `acc_norm` per-token losses. Rows the tokenizer cannot
    encode (characters outside a char-level vocabulary) are skipped and counted."""
    was_training = model.training
    model.eval()
    correct = correct_norm = used = 0
    for row in rows:
        try:
            context = tokenizer.encode(row["ctx"])
            endings = [tokenizer.encode(" " + ending) for ending in row["endings"]]
        except ValueError:
            continue
        totals, means = ending_losses(model, context, endings, device)
        correct += int(totals.argmin().item() == int(row["label"]))
        correct_norm += int(means.argmin().item() == int(row["label"]))
        used += 1
    model.train(was_training)
    return {"acc": correct / max(used, 1), "acc_norm": correct_norm / max(used, 1), "n": used,
            "skipped": len(rows) - used}
