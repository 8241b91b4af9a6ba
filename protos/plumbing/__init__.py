"""Plumbing both sides run, outside the wire contract: CLI configuration (flags, env, config
files), atomic file writes, the DHT node factory and the dial-back reachability service."""
