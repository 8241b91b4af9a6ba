"""Expert backends: the interface (base.py), the toy model's experts (toy.py), a Hugging Face
checkpoint's (hf.py), simulated faults around either (faults.py), and loading one (load.py)."""
