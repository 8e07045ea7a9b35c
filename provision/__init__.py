"""forge-volume's provisioning toolkit: put Forge, its venv, extensions and models on a volume."""

__version__ = "0.1.0"
