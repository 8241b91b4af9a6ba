"""A tiny MoE and a tiny dense draft, trained once on this machine's Python sources, for
acceptance rates and demo text that mean something.

A random tiny model writes bytes and agrees with no draft, so speculative decoding figures
on it say nothing. These two are trained on the Python standard library's own sources
(text every machine that runs this has), on CPU, for a fixed number of steps from fixed
seeds: a Mixtral-style MoE (`MOE`: 8 MoE layers, 8 experts, top-2) and a Llama-style dense
draft (`DRAFT`) sharing its byte-level BPE tokenizer. Both are saved as ordinary Hugging
Face checkpoints under the cache folder and reused afterwards; the first call trains them
(a few CPU-minutes, at low priority, saying so on the console).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import torch

VOCAB = 1024
SEED = 0
CORPUS_BYTES = 3 * 1024 * 1024  # the first files of the standard library, in name order
SEQ = 128
BATCH = 16
MOE = dict(
    model_type="mixtral",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=8,
    num_experts_per_tok=2,
    router_aux_loss_coef=0.02,  # keeps every expert (and so every peer) in use
    output_router_logits=True,
    steps=300,
    lr=3e-3,
)
DRAFT = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    steps=300,
    lr=3e-3,
)
_COMMON = dict(
    vocab_size=VOCAB,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
Say = Callable[[str], None]


def corpus_files() -> list[Path]:
    """The standard library's top-level modules, in name order, up to CORPUS_BYTES."""
    files, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        if total >= CORPUS_BYTES:
            break
        files.append(path)
        total += path.stat().st_size
    if not files:
        raise RuntimeError(f"no Python sources found under {sysconfig.get_paths()['stdlib']} to train on")
    return files


def corpus_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in corpus_files())[:CORPUS_BYTES]


def train_tokenizer(text: str):
    """A byte-level BPE tokenizer (VOCAB tokens) trained on `text`; deterministic for a given text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = text.split("\n")
    tok.train_from_iterator(("\n".join(lines[i : i + 64]) for i in range(0, len(lines), 64)), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _config(spec: dict):
    from transformers import AutoConfig

    fields = {k: v for k, v in spec.items() if k not in ("model_type", "steps", "lr")}
    return AutoConfig.for_model(spec["model_type"], **_COMMON, **fields)


def train_model(spec: dict, ids: torch.Tensor, say: Say, label: str):
    """A model of `spec` trained for spec['steps'] AdamW steps on random windows of `ids` (seeded)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(_config(spec), experts_implementation="eager")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    steps = spec["steps"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec["lr"], total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(SEED + 1)
    started = time.monotonic()
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - SEQ - 1, (BATCH,), generator=gen)
        batch = torch.stack([ids[s : s + SEQ] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            say(f"  {label}: step {step + 1}/{steps}, loss {loss.item():.2f}, {time.monotonic() - started:.0f}s")
    return model.eval()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _lower_priority() -> None:
    with contextlib.suppress(OSError):
        os.nice(5)  # the cores are shared: training yields to interactive work


def build_trained(folder: Path, say: Say = _stderr) -> tuple[Path, Path]:
    """Train the tokenizer, the MoE and the draft, save them as HF checkpoints under `folder`."""
    say(f"training a tiny MoE and a draft on the Python standard library's sources (once, cached in {folder})")
    _lower_priority()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: on shared, busy cores OpenMP's spinning threads cost more than they give
    torch.set_flush_denormal(True)  # tiny gradients late in training must not fall onto the slow path
    try:
        text = corpus_text()
        tokenizer = train_tokenizer(text)
        ids = torch.tensor(tokenizer(text).input_ids, dtype=torch.long)
        say(f"  corpus: {len(text) / 1e6:.1f} MB of Python, {ids.numel()} tokens of a {VOCAB}-token BPE")
        paths = []
        for name, spec in (("moe", MOE), ("draft", DRAFT)):
            model = train_model(spec, ids, say, name)
            model.config.output_router_logits = False  # inference needs no aux loss
            tmp = folder / f"{name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            final = folder / name
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)  # a finished checkpoint appears whole, never half-written
            paths.append(final)
    finally:
        torch.set_num_threads(threads)
    return paths[0], paths[1]


def _folder(cache: Path) -> Path:
    return Path(cache) / f"trained-pystdlib-v1-s{SEED}"


def trained_ready(cache: Path = Path(".cache")) -> bool:
    """Both checkpoints are already in `cache`."""
    folder = _folder(cache)
    return all(
        (folder / n / "config.json").is_file() and (folder / n / "tokenizer.json").is_file() for n in ("moe", "draft")
    )


def ensure_trained(cache: Path = Path(".cache"), say: Say = _stderr) -> tuple[Path, Path]:
    """(MoE checkpoint, draft checkpoint), trained on first use and reused afterwards."""
    folder = _folder(cache)
    if trained_ready(cache):
        return folder / "moe", folder / "draft"
    folder.mkdir(parents=True, exist_ok=True)
    return build_trained(folder, say)
