"""How well and how fast: the digits quality harness, the ablation table, the benchmark."""
