"""ace: ACE, the All-round Creator and Editor (arXiv 2410.00086), in PyTorch."""

__version__ = "0.1.0"
