"""Loaders of published datasets (SCBench, LongMemEval, LoCoMo), one file per schema, and the
registry that recognises a file's schema (`registry.load_tasks`)."""
