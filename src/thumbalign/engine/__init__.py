"""Engine layer: models and where tokens become log-probs, inference (batched log-probs, generation), the reference
cache, the reward-model module, checkpoints, the run folder and the training loop every trainer shares."""
