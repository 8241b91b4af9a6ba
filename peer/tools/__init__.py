"""Tools a volunteer runs on their own machine: what its device gives the peer."""
