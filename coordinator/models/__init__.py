"""Hugging Face MoE models on the swarm: the dense trunk runs here, routed experts remotely."""
