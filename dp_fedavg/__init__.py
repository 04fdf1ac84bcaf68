"""DP-FedAvg: process, sampling, accounting, execution and training loop."""
