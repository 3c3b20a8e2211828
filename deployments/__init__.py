"""``prefect.yaml``, the deployment declarations, shipped as package data (``groundup.deployments``)."""
