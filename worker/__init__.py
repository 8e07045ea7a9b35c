"""forge-volume's RunPod serverless worker: boot Forge from the volume and proxy its API."""
