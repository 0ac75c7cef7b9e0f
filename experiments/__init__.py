"""The lab's commands: `python -m experiments.<name>`, one Hydra entry point per module."""
