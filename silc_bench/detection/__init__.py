"""Open-vocabulary detection (SILC Table 4): OWL-ViT / OWLv2 heads on any backbone (`owl.py`), their
training objective (`losses.py`) and trainer (`train.py`). Evaluation is the ov-det harness
(silc_bench/harness/ov_det.py); box AP is silc_bench/metrics/detection.py."""
