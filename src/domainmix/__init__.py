"""domainmix: sampling weights and loss weights for multi-domain training."""
