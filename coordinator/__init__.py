"""The client side: swarm view, dispatch to remote experts, the RemoteMoE layer. Imports protos only."""
