"""Adapters between domainmix and the training frameworks; each module imports its framework lazily.

Import the module of the framework you use; ``import domainmix`` never imports any of them:

- :mod:`domainmix.integrations.torchdata`: ``StatefulDataLoader`` checkpoints that resume the sampler
  exactly, prefetch and weight changes included (extra ``domainmix[torchdata]``).
- :mod:`domainmix.integrations.hf_datasets`: domains from a column of a map-style Hugging Face
  ``Dataset`` in one call, and streaming ``IterableDataset`` sources sharded by rank (extra
  ``domainmix[hf]``).
- :mod:`domainmix.integrations.hf_trainer`: a Hugging Face ``Trainer`` on the domain sampler whose loss a
  controller weights, with exact resume from its checkpoints (extra ``domainmix[hf]``).
- :mod:`domainmix.integrations.accelerate`: Accelerate's device placement for a loader on the domain
  sampler without its re-sharding (extra ``domainmix[accelerate]``).
- :mod:`domainmix.integrations.lightning`: a callback that checkpoints, checks and logs the weighting of a
  ``LightningModule`` (extra ``domainmix[lightning]``).

Which combinations are tested is listed in ``docs/integrations.md``.
"""
