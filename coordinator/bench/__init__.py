"""Benchmarks, one home: `moe-swarm bench layer|generate|straggler|saturation|security` (a module
each, over the shared setup in harness.py), and tools run as `python -m coordinator.bench.<tool>`
(ab_layer, scale_costs; the peer-side peer.tools.cuda_experts) or `bash coordinator/bench/gpu_check.sh`.
Results and the commands that reproduce them: docs/benchmarks.md."""
