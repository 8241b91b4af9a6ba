"""The ExpertService a peer serves: validate -> open -> admit -> batch -> seal (servicer.py,
checks.py), the stream handler (stream.py) and the gRPC server around them (server.py)."""
