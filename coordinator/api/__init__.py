"""The OpenAI-compatible gateway (`moe-swarm api`): HTTP in front, continuous batching behind.

params (request -> validated generation request) -> engine (admission, the step loop; each
step one forward per active sequence, their expert calls merged by the rendezvous into one
layer call per MoE layer) -> sequence (sampling, stops, text) -> server (JSON or SSE).
"""
