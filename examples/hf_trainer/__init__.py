"""The BERT example on Hugging Face ``transformers.Trainer`` with :class:`wattlog.integrations.transformers.EnergyCallback`.

Run ``python -m examples.hf_trainer --help``; see ``examples/README.md``.
"""
