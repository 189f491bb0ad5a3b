"""PyTorch reference implementations (tests and GPU benchmarks only; importing needs torch)."""
