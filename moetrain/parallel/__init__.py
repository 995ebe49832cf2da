"""Process groups and everything that touches DeepSpeed's MoE contract."""
