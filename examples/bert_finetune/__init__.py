"""BERT fine-tune with energy tracking, and pruning/quantisation efficiency sweeps.

Run ``python -m examples.bert_finetune --help``; see ``examples/README.md``.
"""
