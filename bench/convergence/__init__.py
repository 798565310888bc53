"""Convergence benchmark (python -m bench.convergence): meshtrain vs single process vs dense DDP."""
