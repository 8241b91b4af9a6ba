"""The ExpertService a peer serves: validate -> open -> admit -> batch -> seal (servicer.py,
steps.py), its settings (settings.py), the stream handler (stream.py) and the gRPC server
around them (server.py)."""
