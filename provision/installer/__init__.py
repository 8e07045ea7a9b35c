"""Building the volume: the install steps and what they use (Python, git, Forge's requirements, links)."""
