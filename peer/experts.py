"""`peer.experts.HostedExperts`, the import path of the toy backend (peer/backends/toy.py) that
coordinator/bench.py and bench/cuda_experts.py use."""

from .backends.toy import HostedExperts, LayerExperts, padded_span

__all__ = ["HostedExperts", "LayerExperts", "padded_span"]
