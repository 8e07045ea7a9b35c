"""`forge-volume regions`: one lock made into identical network volumes in several RunPod datacenters,
attached to one serverless endpoint (REST API v2 client, planner, pods, record)."""
