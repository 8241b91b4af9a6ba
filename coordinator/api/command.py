"""`moe-swarm api`: the OpenAI-compatible gateway over a swarm, on uvicorn.

SIGTERM (or Ctrl-C) drains: new requests get 503, running and queued ones finish (up to
--drain-timeout), then the server exits 0; a second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
from types import FrameType

import uvicorn

from coordinator.api.admission import Limits
from coordinator.api.engine import Engine
from protos import tensors
from protos.plumbing.files import write_json_atomic


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains the engine before the server stops."""

    def __init__(self, config: uvicorn.Config, engine: Engine, drain_timeout: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.drain_timeout
            self.engine.draining = True  # new requests: 503
        else:  # a second signal: stop now
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and (self.engine.idle() or time.monotonic() > self.drain_deadline):
            self.should_exit = True
        return await super().on_tick(counter)


def run_api(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoTokenizer

    from coordinator.api.metrics import ApiMetrics
    from coordinator.api.params import RequestParser
    from coordinator.api.rendezvous import StepRendezvous
    from coordinator.api.server import Gateway, Served
    from coordinator.client import SwarmClient
    from coordinator.models.hf import checkpoint_info, load_swarm_model
    from protos.envelope import Identity

    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0.0 <= args.min_coverage <= 1.0:
        raise ValueError(f"--min-coverage is a fraction in [0, 1], got {args.min_coverage}")
    info = checkpoint_info(args.model, args.revision)
    tokenizer = AutoTokenizer.from_pretrained(info.checkpoint.path)
    identity = Identity.load_or_create(args.key_file) if args.key_file else None
    with SwarmClient(
        args.initial_peers, info.uids, timeout=args.timeout, fallback=args.fallback, identity=identity
    ) as client:
        rendezvous = StepRendezvous(client)
        dtype = tensors.dtype_from_name(args.dtype) if args.dtype else None
        model = load_swarm_model(info.checkpoint.path, rendezvous, dtype, info)
        context = _context_tokens(model.config)
        limits = Limits(
            max_active=args.max_active,
            max_queue=args.max_queue,
            kv_tokens=args.max_kv_tokens or args.max_active * context,
            prefill_chunk=args.prefill_chunk,
        )
        metrics = ApiMetrics(client.dispatcher.stats)
        engine = Engine(model, rendezvous, limits, metrics)
        names = tuple(dict.fromkeys([args.served_model_name or args.model, info.manifest.model_id]))
        served = Served(
            engine,
            RequestParser(tokenizer, names, context),
            tokenizer,
            _eos_ids(tokenizer, model),
            coverage=lambda: _coverage(client),
            min_coverage=args.min_coverage,
            max_body_bytes=_max_body_bytes(tokenizer, context),
        )
        config = uvicorn.Config(
            Gateway(served).app(),
            host=args.host,
            port=args.port,
            log_level="warning",
            lifespan="off",
            # past every request that can run or wait, plus some for /health, /metrics, /v1/models: 503 at once
            limit_concurrency=args.max_active + args.max_queue + 64,
        )
        server = DrainingServer(config, engine, args.drain_timeout)
        try:
            asyncio.run(_serve(server, args, names[0]))
        finally:
            engine.close()
    return 0


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so a taken port is one clear line, not uvicorn's exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


async def _serve(server: DrainingServer, args: argparse.Namespace, name: str) -> None:
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
        await asyncio.sleep(0.05)
    print(f"serving {name} on http://{host}:{port}/v1 (OpenAI API); metrics on /metrics", flush=True)
    if args.ready_file:
        write_json_atomic(args.ready_file, {"host": host, "port": port, "pid": os.getpid()})
    await task
    if server.drain_deadline is not None:
        print("drained: every request finished", flush=True)


def _coverage(client) -> tuple[int, int]:
    uids = client.swarm.uids
    return sum(1 for u in uids if client.swarm.replicas(u)), len(uids)


def _context_tokens(config) -> int:
    config = getattr(config, "text_config", None) or config
    return int(config.max_position_embeddings)


def _eos_ids(tokenizer, model) -> frozenset[int]:
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _max_body_bytes(tokenizer, context: int) -> int:
    """The largest body a valid request can be: a full context of the longest token, every
    character escaped as \\uXXXX (6 bytes), plus 64 KiB of fields."""
    longest = max((len(t) for t in tokenizer.get_vocab()), default=16)
    return context * longest * 6 + (64 << 10)

