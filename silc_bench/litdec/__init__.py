"""LiT-Decoder (SILC Table 5): a text decoder trained on a frozen image encoder for classification,
captioning and question answering (`model.py`, `text.py`, `train.py`); evaluation is the
lit-decoder harness (silc_bench/harness/lit_decoder.py), scores silc_bench/metrics/text_answers.py."""
