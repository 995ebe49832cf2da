"""moetrain: Mixture-of-Experts training with expert parallelism and StableMoE two-stage routing."""

__version__ = "0.1.0"
