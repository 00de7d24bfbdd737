"""Post-training evaluation: what a trained model does on data that no training step or checkpoint
selection saw, with uncertainty. ``predictions`` scores a split; ``statistics`` holds the
autocorrelation-robust tests; ``skill_gates`` are the verification gates built on them; ``backtest``
is the test-period portfolio backtest."""
