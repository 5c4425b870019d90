"""Callbacks for the frameworks people train in: ``huggingface`` (transformers' Trainer) and
``lightning`` (Lightning's Trainer). Each imports its framework; install the ``hf`` or
``lightning`` extra. ``continual`` holds what they share."""
