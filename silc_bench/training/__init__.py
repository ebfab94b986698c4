"""What every silc-bench trainer shares (pretraining, CAT-Seg): `silc_bench.training.runtime`."""
