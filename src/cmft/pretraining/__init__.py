"""Pretraining: corpus, vocabulary, masking, packing and the MLM engine behind `cmft pretrain`."""
