"""Trainers layer: the policy trainer (offline methods), the reward-model trainer and the online trainer, each a
Task on the shared engine; their settings (config.py) load nothing heavy."""
